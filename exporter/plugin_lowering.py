"""The plugin lowering: each merge step as one `tokenfuse::SimilarityEnergyMerge` node.

TensorRT's ONNX parser turns the node into the tokenfuse plugin (plugin name = op_type,
`plugin_namespace` / `plugin_version` attributes, the other attributes become plugin fields).
Every node also has an ONNX local function of the same name (one overload per node) whose body is
this module's reference implementation exported as standard ops, so ONNX Runtime, or TensorRT
without the plugin library, still runs the file.

Node: inputs x [B,N,C], metric [B,N,D], size [B,N,1] fp32, for turbo the CLS attention row
[B,N] fp32, when `padded` the padding mask [B,N] fp32 (1 = real token), when `causal` the frozen
token (one-hot [B,N] fp32, CLIP text's EOS) and the causal positions [B,N] fp32; outputs merged x
[B,K,C], merged size [B,K,1] fp32, each input token's slot [B,N] int32, when `padded` the merged
mask [B,K] fp32 and when `causal` the merged positions [B,K] fp32. Attributes: method, K,
protected, margin, alpha, variant, turbo_weight (a `LayerRule`), padded, causal (0 or 1).
"""

from __future__ import annotations

import contextlib
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch

from .methods import KERNEL_VARIANT_CODES, LayerRule, match_step
from .registry import get_method

DOMAIN = "tokenfuse"
OP_TYPE = "SimilarityEnergyMerge"
VERSION = "1"
MIN_IR_VERSION = 10  # function overloads
# The kernels' per-layer fields, with the value each takes for a method that does not use it.
KERNEL_FIELDS = {"margin": 0.9, "alpha": 1.0, "variant": "plain", "turbo_weight": 30.0}


def kernel_fields(rule: LayerRule) -> dict:
    """`rule` as the kernels' fields (the node's attributes besides method, K, protected and flags)."""
    return {key: rule.values.get(key, default) for key, default in KERNEL_FIELDS.items()}


def kernel_params(rule: LayerRule, batch: int, n: int, out_tokens: int, channels: int, dim: int, protected: int) -> np.ndarray:
    """MergeParams (similarityEnergyMergeKernels.h) as 11 int32 words, the floats by their bits:
    the one binding of a rule to the kernels, for the CPU emulation and the GPU check alike."""
    fields = kernel_fields(rule)
    words = np.zeros(11, dtype=np.int32)
    words[:8] = [get_method(rule.name).kernel_code, KERNEL_VARIANT_CODES[fields["variant"]], batch, n, out_tokens, channels, dim, protected]
    words[8:11] = np.array([fields["margin"], fields["alpha"], fields["turbo_weight"]], dtype=np.float32).view(np.int32)
    return words


@dataclass(frozen=True)
class MergeNode:
    """One node's attributes."""

    rule: LayerRule
    out_tokens: int  # K
    protected: int
    padded: bool = False  # a padding mask comes in and goes out (text encoders)
    causal: bool = False  # a frozen token and causal positions come in, positions go out (CLIP text)

    def __post_init__(self):
        if self.causal and not self.padded:
            raise ValueError("a causal merge node (frozen token, positions) also takes the padding mask")
        if get_method(self.rule.name).kernel_code is None:
            raise ValueError(f"the tokenfuse plugin has no kernel for {self.rule.name}")
        # Float attributes are float32 (ONNX FLOAT, the plugin's fields): every lowering computes with those.
        rule = self.rule
        as32 = {k: float(np.float32(v)) for k, v in rule.values.items() if isinstance(v, float)}
        object.__setattr__(self, "rule", rule.replace(**as32))

    def attributes(self) -> dict:
        return {
            "method": self.rule.name,
            "K": self.out_tokens,
            "protected": self.protected,
            **kernel_fields(self.rule),
            "padded": int(self.padded),
            "causal": int(self.causal),
        }

    @classmethod
    def from_node(cls, node: onnx.NodeProto) -> "MergeNode":
        """Read a node's attributes back (what the plugin's creator does with its fields)."""
        a = {attr.name: onnx.helper.get_attribute_value(attr) for attr in node.attribute}
        text = {k: v.decode() if isinstance(v, bytes) else v for k, v in a.items()}
        name = text["method"]
        rule = LayerRule(name, **{key: text[key] for key in get_method(name).rule_defaults})
        return cls(rule, int(a["K"]), int(a["protected"]), bool(a.get("padded", 0)), bool(a.get("causal", 0)))


def reference(node: MergeNode, x, metric, size, cls_attn=None, valid=None, frozen=None, positions=None):
    """What the node computes: match, then the size-weighted merge; slots as int32. The masks
    (`valid`, `frozen`) and positions are fp32 [B,N] tensors, as the node takes them."""
    valid = None if valid is None else valid > 0.5
    frozen = None if frozen is None else frozen > 0.5
    plan = match_step(node.rule, metric, x.shape[1] - node.out_tokens, protected=node.protected, cls_attn=cls_attn,
                      valid=valid, frozen=frozen)
    merged, merged_size, merged_valid, merged_positions = plan.apply(x, size, valid, positions)
    outputs = (merged, merged_size, plan.dst_slot.to(torch.int32))
    if valid is not None:
        outputs += (merged_valid.to(torch.float32),)
    return outputs if positions is None else (*outputs, merged_positions)


_recorded: list | None = None  # (node, x, metric) of each node traced, while `recording()`


@contextlib.contextmanager
def recording():
    """Collect the nodes a trace emits, in order, with example inputs for their function bodies."""
    global _recorded
    _recorded = []
    try:
        yield _recorded
    finally:
        _recorded = None


class _MergeOp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, metric, size, cls_attn, valid, frozen, positions, node):
        if _recorded is not None:
            _recorded.append((node, x.detach().clone(), metric.detach().clone()))
        return reference(node, x, metric, size, cls_attn, valid, frozen, positions)

    @staticmethod
    def symbolic(g, x, metric, size, cls_attn, valid, frozen, positions, node):
        given = {"x": x, "metric": metric, "size": size, "cls_attn": cls_attn, "valid": valid, "frozen": frozen,
                 "positions": positions}
        a = node.attributes()
        outputs = g.op(
            f"{DOMAIN}::{OP_TYPE}",
            *[given[name] for name in input_names(node)],
            method_s=a["method"],
            K_i=a["K"],
            protected_i=a["protected"],
            margin_f=a["margin"],
            alpha_f=a["alpha"],
            variant_s=a["variant"],
            turbo_weight_f=a["turbo_weight"],
            padded_i=a["padded"],
            causal_i=a["causal"],
            plugin_namespace_s=DOMAIN,
            plugin_version_s=VERSION,
            outputs=len(output_names(node)),
        )
        # Output types and static sizes, which TorchScript cannot infer for a custom op.
        batch, n, channels = x.type().varyingSizes() or (None, None, None)
        outputs[0].setType(x.type().with_sizes([batch, node.out_tokens, channels]))
        outputs[1].setType(size.type().with_sizes([batch, node.out_tokens, 1]))
        outputs[2].setType(size.type().with_dtype(torch.int32).with_sizes([batch, n]))
        for extra in outputs[3:]:  # merged mask, merged positions
            extra.setType(size.type().with_sizes([batch, node.out_tokens]))
        return outputs


def merge_op(node: MergeNode, x, metric, size, cls_attn=None, valid=None, frozen=None, positions=None):
    """The merge as one traceable op: (merged x, merged size, slots[, merged mask[, merged positions]]),
    the masks and positions as fp32."""
    as32 = [None if t is None else t.to(torch.float32) for t in (valid, frozen, positions)]
    return _MergeOp.apply(x, metric, size, cls_attn, *as32, node)


class _Reference(torch.nn.Module):
    def __init__(self, node: MergeNode):
        super().__init__()
        self.node = node

    def forward(self, *inputs):
        return reference(self.node, **dict(zip(input_names(self.node), inputs)))


def input_names(node: MergeNode) -> list[str]:
    return (["x", "metric", "size"] + (["cls_attn"] if get_method(node.rule.name).needs_cls_attn else [])
            + (["valid"] if node.padded else []) + (["frozen", "positions"] if node.causal else []))


def output_names(node: MergeNode) -> list[str]:
    return (["merged_x", "merged_size", "slots"] + (["merged_valid"] if node.padded else [])
            + (["merged_positions"] if node.causal else []))


def reference_model(node: MergeNode, x: torch.Tensor, metric: torch.Tensor, opset: int) -> onnx.ModelProto:
    """The reference implementation of one node as a standalone ONNX model (dynamic batch)."""
    batch, n = x.shape[:2]
    inputs = [x, metric, torch.ones(batch, n, 1)]
    if get_method(node.rule.name).needs_cls_attn:
        inputs.append(torch.rand(batch, n).softmax(-1))
    if node.padded:
        inputs.append(torch.ones(batch, n))
    if node.causal:
        inputs += [(torch.arange(n) == n - 1).float().expand(batch, n), torch.arange(n).float().expand(batch, n)]
    names = input_names(node)
    with tempfile.TemporaryDirectory(prefix="tokenfuse-node-") as work, warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        path = Path(work, "node.onnx")
        torch.onnx.export(
            _Reference(node), tuple(inputs), str(path), dynamo=False, opset_version=opset, input_names=names,
            output_names=output_names(node), dynamic_axes={name: {0: "batch"} for name in names + output_names(node)},
        )
        return onnx.load(str(path))


def as_function(model: onnx.ModelProto, overload: str) -> onnx.FunctionProto:
    """A standalone model's graph as the local function `tokenfuse::SimilarityEnergyMerge`."""
    constants = [
        onnx.helper.make_node("Constant", [], [init.name], value=init) for init in model.graph.initializer
    ]
    return onnx.helper.make_function(
        DOMAIN, OP_TYPE,
        inputs=[v.name for v in model.graph.input],
        outputs=[v.name for v in model.graph.output],
        nodes=constants + list(model.graph.node),
        opset_imports=list(model.opset_import),
        overload=overload,
    )


def attach_functions(model: onnx.ModelProto, recorded: list, opset: int) -> None:
    """Give every plugin node of `model` its reference function."""
    nodes = [n for n in model.graph.node if n.op_type == OP_TYPE and n.domain == DOMAIN]
    if len(nodes) != len(recorded):
        raise RuntimeError(f"traced {len(recorded)} merge steps but the graph has {len(nodes)} {OP_TYPE} nodes")
    for index, (onnx_node, (node, x, metric)) in enumerate(zip(nodes, recorded)):
        overload = f"layer{index}"
        onnx_node.overload = overload
        model.functions.append(as_function(reference_model(node, x, metric, opset), overload))
    if not any(o.domain == DOMAIN for o in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid(DOMAIN, 1))
    model.ir_version = max(model.ir_version, MIN_IR_VERSION)
