"""The SimilarityEnergyMerge plugin on a machine without a GPU: the library compiles with nvcc,
loads into TensorRT-RTX, its build-time interface answers (C++ check), the node's CPU reference
equals the exporter's PyTorch merge and an independent NumPy reference, `--lowering plugin`
exports validate in ONNX Runtime, and an engine build stops where plugins/README.md says."""

from __future__ import annotations

import ctypes
import functools
import json
import os
import re
import shutil
import struct
import subprocess
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from gates import assert_validated_exactly
from requires import import_or_skip, skip_or_fail
from reference import reference_plan
from tokenfuse import plugins
from tokenfuse.cli import main
from tokenfuse.engines.build import build_engine, parse_with_plugin
from tokenfuse.exporter import export
from tokenfuse.exporter.errors import UsageError
from tokenfuse.exporter import methods
from tokenfuse.exporter.methods import LayerRule, MethodConfig, max_removable
from tokenfuse.exporter.plugin_lowering import (
    DOMAIN, OP_TYPE, MergeNode, as_function, input_names, kernel_fields, output_names, reference, reference_model,
)
from tokenfuse.exporter.registry import get_method

pytestmark = pytest.mark.xdist_group("plugin")  # one pytest-xdist worker makes the plugin library once

RULES = [
    LayerRule("tome"),
    LayerRule("crossget"),
    LayerRule("turbo", turbo_weight=12.5),
    LayerRule("pitome", margin=0.675, variant="plain"),
    LayerRule("pitome", margin=0.45, alpha=0.5, variant="bsm"),
    LayerRule("pitome", margin=0.6, variant="text"),
]
RULE_IDS = ["tome", "crossget", "turbo", "pitome-plain", "pitome-bsm", "pitome-text"]
REPO = Path(__file__).resolve().parents[1]
# docs/cli.md "What it writes": ViT-B/16 pitome 0.9 with --lowering plugin.
PLUGIN_LOWERED_VIT_B_NODES = 976


def build_library(build_dir: Path, **options) -> Path:
    """The plugin library compiled with the kernel-lens headers (the test skips without cmake or nvcc; fails under CI)."""
    if plugins.cmake_path() is None:
        skip_or_fail("no cmake (scripts/setup.sh installs the cmake wheel into .venv)")
    try:
        plugins.nvcc_path()
    except UsageError as error:
        skip_or_fail(str(error))
    return plugins.build(build_dir, log=lambda *_: None, **options)


@pytest.fixture(scope="session")
def library(tmp_path_factory) -> Path:
    """The plugin library for one target architecture: what these tests check does not depend on
    the targets, and one compiles in a third of the time of all seven (test_library_holds_code_for_every_target)."""
    return build_library(tmp_path_factory.mktemp("plugin-build"), architectures="75-real")


_FIELD_BUFFERS: list[np.ndarray] = []  # a PluginField points into its array without keeping it alive


def _fields(trt, attributes: dict):
    fields = []
    for name, value in attributes.items():
        if isinstance(value, str):
            data, kind = np.frombuffer(value.encode(), np.int8).copy(), trt.PluginFieldType.CHAR
        elif isinstance(value, int):
            data, kind = np.array([value], np.int32), trt.PluginFieldType.INT32
        else:
            data, kind = np.array([value], np.float32), trt.PluginFieldType.FLOAT32
        _FIELD_BUFFERS.append(data)
        fields.append(trt.PluginField(name, data, kind))
    return trt.PluginFieldCollection(fields)


def test_library_exports_the_loading_entry_points(library):
    loaded = ctypes.CDLL(str(library))
    for symbol in ("getCreators", "setLoggerFinder", "tokenfuseMergeFloat", "tokenfuseMergeHalf", "tokenfuseMergeWorkspaceSize",
                   "tokenfuseMergeLaunchPlan"):
        assert hasattr(loaded, symbol), symbol
    loaded.tokenfuseMergeWorkspaceSize.restype = ctypes.c_size_t
    # similarities [2,197,197] fp32, PiToMe's partial sums [2,197,8] fp32, three int32 [2,197] membership arrays,
    # the counters [1 + 2 * 2], each 256-byte aligned
    assert loaded.tokenfuseMergeWorkspaceSize(2, 197, 64) == 310528 + 12800 + 3 * 1792 + 256


def fatbin_entries(data: bytes) -> list[tuple[str, int]]:
    """(kind, sm) of every image in a binary's CUDA fat binaries (header magic 0xBA55ED50)."""
    magic, entries = struct.pack("<I", 0xBA55ED50), []
    start = data.find(magic)
    while start != -1:
        header_size, total = struct.unpack_from("<HQ", data, start + 6)
        offset, end = start + header_size, start + header_size + total
        while offset < end:
            kind, _, entry_header, size = struct.unpack_from("<HHIQ", data, offset)
            entries.append(({1: "ptx", 2: "cubin"}.get(kind, str(kind)), struct.unpack_from("<I", data, offset + 28)[0]))
            offset += entry_header + size
        start = data.find(magic, end)
    return entries


def test_library_holds_code_for_the_target_asked_for(library):
    assert sorted(set(fatbin_entries(library.read_bytes()))) == [("cubin", 75)]


@pytest.mark.slow  # the default build for every target: 20-30 s
def test_library_holds_code_for_every_target(tmp_path):
    """sm_75 .. sm_90 machine code (sm_87 = Jetson Orin) plus PTX, as the CMake project asks."""
    entries = fatbin_entries(build_library(tmp_path).read_bytes())
    assert sorted(set(entries)) == [("cubin", sm) for sm in (75, 80, 86, 87, 89, 90)] + [("ptx", 90)]


KERNELS_SOURCE = REPO / "plugins" / "similarityEnergyMergePlugin" / "similarityEnergyMergeKernels.cu"
# The kernel's launch bound (kBlockThreads) allows 65536 / 384 registers per thread; its arrays live in
# dynamic shared memory, sized per launch (SharedLayout), so its static shared memory is two words.
LAUNCH_BOUND_REGISTERS = 65536 // 384
STATIC_SHARED_LIMIT = 64


def kernel_resources(ptxas_output: str) -> dict[str, dict[str, int]]:
    """Per kernel, from `nvcc --resource-usage`: stack frame (local memory), spill stores and loads,
    registers and static shared memory, in bytes."""
    kernels, name = {}, None
    for line in ptxas_output.splitlines():
        if (match := re.search(r"Compiling entry function '(\w+)'", line)):
            name = match.group(1)
            kernels[name] = {}
        elif name and (match := re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)):
            kernels[name].update(stack=int(match.group(1)), spill_stores=int(match.group(2)), spill_loads=int(match.group(3)))
        elif name and (match := re.search(r"Used (\d+) registers", line)):
            smem = re.search(r"(\d+) bytes smem", line)
            kernels[name].update(registers=int(match.group(1)), smem=int(smem.group(1)) if smem else 0)
    return kernels


@pytest.mark.parametrize("sm", [75, 80, 86, 87, 89, 90])
def test_kernels_use_no_local_memory_and_fit_their_launch(sm, tmp_path):
    """ptxas on each target the library ships: the one fused kernel (fp32 and fp16) without a stack
    frame (local memory) or spills, its registers within its launch bounds and no static shared
    memory beyond its flag."""
    try:
        nvcc = plugins.nvcc_path()
    except UsageError as error:
        skip_or_fail(str(error))
    done = subprocess.run([str(nvcc), "-O3", "-std=c++17", "--expt-relaxed-constexpr", "-cubin", f"-arch=sm_{sm}", "--resource-usage",
                           "-I", str(KERNELS_SOURCE.parent), str(KERNELS_SOURCE), "-o", str(tmp_path / "kernels.cubin")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    kernels = kernel_resources(done.stdout + done.stderr)
    assert len(kernels) == 2 and all("mergeStepKernel" in name for name in kernels), list(kernels)  # fp32 and fp16
    for name, used in kernels.items():
        assert used["stack"] == used["spill_stores"] == used["spill_loads"] == 0, (name, used)
        assert 0 < used["registers"] <= LAUNCH_BOUND_REGISTERS and used["smem"] <= STATIC_SHARED_LIMIT, (name, used)


def test_loads_into_tensorrt_rtx_and_creates_every_method(library):
    trt = import_or_skip("tensorrt_rtx")
    registry = trt.get_plugin_registry()
    assert registry.load_library(str(library)) is not None
    creator = registry.get_creator(OP_TYPE, "1", DOMAIN)
    assert creator is not None
    assert [f.name for f in creator.field_names] == ["method", "variant", "K", "protected", "margin", "alpha", "turbo_weight",
                                                     "padded", "causal"]
    for rule in RULES:
        node = MergeNode(rule, out_tokens=150, protected=1)
        plugin = creator.create_plugin("check", _fields(trt, node.attributes()), trt.TensorRTPhase.BUILD)
        assert plugin is not None, rule
        core = plugin.get_capability_interface(trt.PluginCapabilityType.CORE)
        assert (core.plugin_name, core.plugin_version, core.plugin_namespace) == (OP_TYPE, "1", DOMAIN)
        assert plugin.get_capability_interface(trt.PluginCapabilityType.BUILD).num_outputs == 3
    assert creator.create_plugin("bad", _fields(trt, {"method": "median", "K": 3}), trt.TensorRTPhase.BUILD) is None
    # text encoders: the padding mask (BERT), plus the frozen token and causal positions (CLIP text)
    for padded, causal, outputs in ((1, 0, 4), (1, 1, 5)):
        node = MergeNode(RULES[0], out_tokens=20, protected=1, padded=bool(padded), causal=bool(causal))
        plugin = creator.create_plugin("text", _fields(trt, node.attributes()), trt.TensorRTPhase.BUILD)
        assert plugin is not None and plugin.get_capability_interface(trt.PluginCapabilityType.BUILD).num_outputs == outputs
    refused = {"method": "tome", "K": 3, "padded": 0, "causal": 1}
    assert creator.create_plugin("bad", _fields(trt, refused), trt.TensorRTPhase.BUILD) is None


def test_build_interface_answers_correctly(library, tmp_path):
    """tests/cpp/plugin_check.cpp calls the plugin's C++ interfaces directly (TensorRT-RTX's Python
    bindings cannot call a C++ plugin's build methods, and its network has no addPluginV3)."""
    headers = plugins._kernel_lens_headers()
    assert headers is not None
    if shutil.which("g++") is None:
        skip_or_fail("no g++ to compile tests/cpp/plugin_check.cpp")
    program = tmp_path / "plugin_check"
    # cuda_runtime_api.h, for the headers: CUDA_HOME's, the toolkit's or the PyPI wheel's beside its nvcc
    roots = [os.environ.get("CUDA_HOME") or "/usr/local/cuda", plugins.nvcc_path().resolve().parents[1]]
    cuda_include = next((Path(root, "include") for root in roots if Path(root, "include", "cuda_runtime_api.h").is_file()), None)
    if cuda_include is None:
        skip_or_fail(f"cuda_runtime_api.h not found under {roots}")
    subprocess.run(["g++", "-std=c++17", "-O1", "-Wall", "-isystem", str(headers), "-I", str(cuda_include),
                    str(REPO / "tests" / "cpp" / "plugin_check.cpp"), "-ldl", "-o", str(program)], check=True)
    done = subprocess.run([str(program), str(library)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout
    lines = done.stdout.splitlines()
    assert lines[-1] == "0 failed"
    assert sum(line.startswith("ok ") for line in lines) == 6 * 22 + 7 + 8  # 22 per method, 7 shared, 8 text


def _inputs(rule: LayerRule, seed: int, n=197, c=48, d=16, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, n, c, generator=g).to(dtype)
    metric = torch.randn(3, n, d, generator=g).to(dtype)
    size = torch.randint(1, 4, (3, n, 1), generator=g).float()
    cls_attn = torch.rand(3, n, generator=g).softmax(-1) if rule.name == "turbo" else None
    return x, metric, size, cls_attn


def _numpy_plan(node: MergeNode, metric: np.ndarray, cls_attn: np.ndarray | None):
    """The independent NumPy reference's slots and decision margin, given the node's attributes as
    one layer's knobs."""
    fields = kernel_fields(node.rule)
    variant = {"plain": "plain", "text": "text", "bsm": "bsm-early"}[fields["variant"]]
    return reference_plan(
        node.rule.name, metric.astype(np.float64), metric.shape[1] - node.out_tokens, protected=node.protected, layer=0,
        num_layers=2 if variant == "bsm-early" else 1, margin=fields["margin"], alpha=fields["alpha"], pitome_variant=variant,
        cls_attn=None if cls_attn is None else cls_attn.astype(np.float64), turbo_alpha=fields["turbo_weight"] / 30.0,
        return_info=True,
    )


WIDE_GAP = 1e-5  # fp32 and fp64 may order two decision keys closer than this differently


def _wide_gap_inputs(node: MergeNode, seed: int, n: int, batch=3, c=48, d=16):
    """Inputs whose every decision has a margin of at least WIDE_GAP in the float64 reference, so
    that the fp32 node must agree with it exactly: each batch element is redrawn (the attempt is
    part of the seed) until it has. At N = 49 about half the PiToMe draws qualify; at 197 almost
    none do (196 energies all ranked)."""
    elements = []
    for b in range(batch):
        for attempt in range(100):
            rng = np.random.default_rng([seed, b, attempt])
            metric = rng.standard_normal((1, n, d)).astype(np.float32)
            logits = rng.standard_normal((1, n))
            cls_attn = (np.exp(logits) / np.exp(logits).sum()).astype(np.float32) if node.rule.name == "turbo" else None
            if _numpy_plan(node, metric, cls_attn)[1]["min_gap"] > WIDE_GAP:
                elements.append((metric, cls_attn))
                break
        else:
            raise AssertionError(f"no wide-gap draw for {node.rule} in 100 attempts")
    rng = np.random.default_rng([seed, 99])
    metric = torch.from_numpy(np.concatenate([m for m, _ in elements]))
    cls_attn = None if node.rule.name != "turbo" else torch.from_numpy(np.concatenate([a for _, a in elements]))
    x = torch.from_numpy(rng.standard_normal((batch, n, c)).astype(np.float32))
    size = torch.from_numpy(rng.integers(1, 4, (batch, n, 1)).astype(np.float32))
    return x, metric, size, cls_attn


def _run_function(node: MergeNode, x, metric, size, cls_attn, opset=18, text=()):
    """The node exactly as an exported model holds it: a custom node plus its local function.
    `text`: the fp32 padding mask[, frozen token and positions] after the other inputs."""
    names, outputs = input_names(node), output_names(node)
    function = as_function(reference_model(node, x, metric, opset), "layer0")
    call = onnx.helper.make_node(OP_TYPE, names, outputs, domain=DOMAIN, overload="layer0",
                                 **node.attributes(), plugin_namespace=DOMAIN, plugin_version="1")
    elem = onnx.helper.np_dtype_to_tensor_dtype(x.numpy().dtype)
    values = [x, metric, size] + ([cls_attn] if cls_attn is not None else []) + list(text)
    types = {"merged_x": elem, "slots": onnx.TensorProto.INT32}
    graph = onnx.helper.make_graph(
        [call], "node",
        [onnx.helper.make_tensor_value_info(n, elem if n in ("x", "metric") else onnx.TensorProto.FLOAT, None) for n in names],
        [onnx.helper.make_tensor_value_info(n, types.get(n, onnx.TensorProto.FLOAT), None) for n in outputs],
    )
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", opset), onnx.helper.make_opsetid(DOMAIN, 1)],
                                   functions=[function], ir_version=10)
    node_again = MergeNode.from_node(call)
    assert node_again == node
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {n: v.numpy() for n, v in zip(names, values)})


@pytest.mark.parametrize("rule", RULES, ids=RULE_IDS)
@pytest.mark.parametrize("seed", [0, 1])
def test_node_reference_equals_pytorch_and_numpy(rule, seed):
    n, protected = 49, 1 + seed  # a 7 x 7 patch grid and its CLS token (and a distillation token)
    removed = (n - protected) // 2 if rule.name == "pitome" else 15  # pitome at its most
    node = MergeNode(rule, out_tokens=n - removed, protected=protected)
    x, metric, size, cls_attn = _wide_gap_inputs(node, seed, n)
    got_x, got_size, got_slots = _run_function(node, x, metric, size, cls_attn)
    want_x, want_size, want_slots = reference(node, x, metric, size, cls_attn)
    assert got_slots.dtype == np.int32 and got_slots.shape == (3, n)
    np.testing.assert_array_equal(got_slots, want_slots.numpy())
    np.testing.assert_allclose(got_x, want_x.numpy(), atol=1e-5)
    np.testing.assert_allclose(got_size, want_size.numpy())
    slots, info = _numpy_plan(node, metric.numpy(), None if cls_attn is None else cls_attn.numpy())
    assert info["min_gap"] > WIDE_GAP
    np.testing.assert_array_equal(got_slots, slots)


@pytest.mark.parametrize("rule", RULES, ids=RULE_IDS)
@pytest.mark.parametrize("causal", [False, True], ids=["padded", "causal"])
def test_text_node_reference_equals_pytorch(rule, causal):
    """With a padding mask (BERT), and with CLIP text's frozen EOS and causal positions too."""
    n, protected = 40, 1
    removed = max_removable(rule.name, n, protected + causal) // 2
    node = MergeNode(rule, out_tokens=n - removed, protected=protected, padded=True, causal=causal)
    x, metric, size, cls_attn = _inputs(rule, 5, n=n)
    lengths = torch.tensor([[n], [n // 2], [7]])
    pos = torch.arange(n)
    text = [(pos < lengths).float()] + ([(pos == lengths - 1).float(), pos.float().expand(3, n)] if causal else [])
    got = _run_function(node, x, metric, size, cls_attn, text=text)
    want = reference(node, x, metric, size, cls_attn, *text)
    assert len(got) == len(want) == 4 + causal
    np.testing.assert_array_equal(got[2], want[2].numpy())
    np.testing.assert_allclose(got[0], want[0].numpy(), atol=1e-5)
    for g, w in zip(got[1:], want[1:]):
        np.testing.assert_allclose(g, w.numpy())
    # the frozen token alone in the last slot; padding never shares a slot with a real token
    if causal:
        assert (got[2][np.arange(3), lengths[:, 0] - 1] == node.out_tokens - 1).all()
    real = (pos < lengths).numpy()
    for b in range(3):
        assert not set(got[2][b][real[b]]) & set(got[2][b][~real[b]])


def test_node_reference_in_fp16():
    node = MergeNode(LayerRule("pitome", margin=0.9), out_tokens=120, protected=1)
    x, metric, size, _ = _inputs(node.rule, 3, dtype=torch.float16)
    got_x, got_size, got_slots = _run_function(node, x, metric, size, None)
    want_x, want_size, want_slots = reference(node, x, metric, size)
    assert got_x.dtype == np.float16 and got_size.dtype == np.float32
    assert (got_slots == want_slots.numpy()).mean() > 0.95  # fp16 keys may round differently
    same = (got_slots == want_slots.numpy()).all(-1)
    np.testing.assert_allclose(got_x[same].astype(np.float32), want_x[same].float().numpy(), atol=2e-3)


def test_layer_rules_match_the_per_layer_knobs():
    cfg = MethodConfig(name="pitome", margin=0.9, pitome_variant="bsm-early", turbo_alpha=2.0, turbo_beta=0.5, turbo_gamma=1.0)
    assert cfg.for_layer(3, 12) == LayerRule("pitome", margin=0.9 - 0.9 * 3 / 12, alpha=1.0, variant="bsm")
    assert cfg.for_layer(6, 12).variant == "plain"
    turbo = MethodConfig(name="turbo", turbo_alpha=2.0, turbo_beta=0.5, turbo_gamma=1.0)
    assert turbo.for_layer(3, 12) == LayerRule("turbo", turbo_weight=0.5**2 * 2.0 * 30)


def test_kernel_codes_and_constants_equal_the_exporters():
    """The C++ sources' method and variant codes (the header's enums, the plugin's attribute names)
    and the constants the kernels decide with are the exporter's (methods.py), read from the files."""
    import re

    folder = REPO / "plugins" / "similarityEnergyMergePlugin"
    header, kernels = (folder / "similarityEnergyMergeKernels.h").read_text(), (folder / "similarityEnergyMergeKernels.cu").read_text()
    plugin = (folder / "similarityEnergyMergePlugin.cpp").read_text()

    def enum(name: str) -> dict[str, int]:
        body = re.search(rf"enum class {name} : int32_t\s*{{(.*?)}};", header, re.S).group(1)
        return {key.lower(): int(value) for key, value in re.findall(r"k(\w+) = (\d+)", body)}

    def named(table: str, enum_name: str) -> dict[str, int]:
        body = re.search(rf"Named const {table}\[\] = {{(.*?)}};", plugin, re.S).group(1)
        return {name: enum(enum_name)[key.lower()] for name, key in re.findall(rf'"(\w+)", int32_t\({enum_name}::k(\w+)\)', body)}

    codes = {name: get_method(name).kernel_code for name in methods.METHODS if get_method(name).kernel_code is not None}
    assert named("kMethods", "MergeMethod") == codes == {m: c for m, c in enum("MergeMethod").items()}
    assert named("kVariants", "PitomeVariant") == methods.KERNEL_VARIANT_CODES
    assert set(codes) == set(methods.METHODS) - {"none"}

    def constant(name: str) -> float:
        return float(re.search(rf"constexpr float {name} = ([-0-9.e]+)f;", kernels).group(1))

    assert constant("kBig") == methods.BIG and constant("kNonFiniteSimilarity") == methods.NON_FINITE_SIMILARITY
    assert constant("kPadBonus") == methods.PAD_BONUS and constant("kMixedPenalty") == methods.MIXED_PENALTY
    assert constant("kPaddingWeight") == methods.PADDING_WEIGHT


@pytest.mark.slow  # a ViT-B export, 25-35 s: docs/cli.md's node count
def test_vit_b_plugin_export_validates_and_records_the_lowering(tmp_path):
    path = tmp_path / "vit.onnx"
    manifest = export("timm:vit_base_patch16_224", path, random_init=True, method="pitome", r=0.9, lowering="plugin", seed=0, log=lambda *_: None)
    model = onnx.load(str(path))
    nodes = [n for n in model.graph.node if n.op_type == OP_TYPE]
    assert len(nodes) == 12 and manifest["plugin"]["nodes"] == 12
    assert len(model.graph.node) == PLUGIN_LOWERED_VIT_B_NODES  # the README's figure
    assert manifest["lowering"] == "plugin"
    assert_validated_exactly(manifest)
    attributes = {a.name: onnx.helper.get_attribute_value(a) for a in nodes[0].attribute}
    assert attributes["plugin_namespace"] == b"tokenfuse" and attributes["plugin_version"] == b"1"
    assert attributes["K"] == manifest["schedule"][0] and attributes["method"] == b"pitome"
    assert len(model.functions) == 12 and {f.overload for f in model.functions} == {n.overload for n in nodes}
    assert not any(o.name.startswith("merge_slots") for o in model.graph.output)
    json.loads(path.with_suffix(".json").read_text())  # written beside it


@pytest.fixture(scope="module")
def small_plugin_exports(hf_dirs, tmp_path_factory):
    """Each vision method exported with the plugin lowering from a small Hugging Face ViT (65 tokens,
    3 layers), validated, on first use."""
    root = tmp_path_factory.mktemp("plugin-exports")

    @functools.cache
    def exported(method):
        path = root / f"{method}.onnx"
        return path, export(f"hf:{hf_dirs['vit']}", path, method=method, r=0.9, lowering="plugin", seed=0, log=lambda *_: None)

    return exported


@pytest.mark.parametrize("method", ["tome", "pitome", "crossget", "turbo"])
def test_vision_methods_export_with_the_plugin_lowering(small_plugin_exports, method):
    """One plugin node per layer, validated in ONNX Runtime through the node's ONNX function."""
    path, manifest = small_plugin_exports(method)
    assert_validated_exactly(manifest)
    nodes = [n for n in onnx.load(str(path)).graph.node if n.op_type == OP_TYPE]
    assert len(nodes) == manifest["plugin"]["nodes"] == 3
    assert {onnx.helper.get_attribute_value(a) for n in nodes for a in n.attribute if a.name == "method"} == {method.encode()}


def test_fp16_plugin_export_validates(tmp_path):
    manifest = export("timm:vit_tiny_patch16_224", tmp_path / "m.onnx", random_init=True, method="pitome", lowering="plugin", dtype="fp16", seed=0, log=lambda *_: None)
    assert manifest["dtype"] == "fp16" and manifest["validation"]["passed"]
    # half precision flips near-ties (raw agreement below 1), which the gate excuses
    validation = manifest["validation"]
    assert validation["merge_agreement_raw"] < 1.0 and validation["near_ties_excused"] > 0 and validation["max_rel_error"] <= 5e-3, validation


def test_tensorrt_rtx_stops_where_documented(small_plugin_exports, library, tmp_path):
    """TensorRT-RTX 1.7 without a GPU parses up to the first plugin node, finds and creates the
    plugin, then aborts inside its ONNX parser. If a later release gets further, the engine must
    build with the plugin layer in it. (A small HF ViT: parsing ViT-B's 330 MB twice took 20 s.)"""
    path, _ = small_plugin_exports("pitome")
    done = parse_with_plugin(path, library)
    log = done.stdout + done.stderr
    assert "Successfully created plugin: SimilarityEnergyMerge" in log
    out = tmp_path / "vit.engine"
    if done.returncode == 0:
        sidecar = build_engine(path, out, batch=(1, 2, 4), plugins=str(library), log=lambda *_: None)
        assert out.is_file() and sidecar["plugin_library"]["path"] == str(library)
    else:
        assert done.returncode == -6 and "terminate called" in log
        with pytest.raises(UsageError, match="aborted .* while importing the SimilarityEnergyMerge plugin node"):
            build_engine(path, out, batch=(1, 2, 4), plugins=str(library), log=lambda *_: None)
        assert not out.exists()


def test_cli_plugin_path_and_refusals(library, small_plugin_exports, monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("TOKENFUSE_PLUGIN_DIR", str(library.parent))
    assert main(["plugin", "path"]) == 0
    assert capsys.readouterr().out.strip() == str(library)
    monkeypatch.setenv("TOKENFUSE_PLUGIN_DIR", str(tmp_path / "empty"))
    assert main(["plugin", "path"]) == 2
    assert "run: tokenfuse plugin build" in capsys.readouterr().err
    # a model with plugin nodes and no library built: build says what to do
    assert main(["build", str(small_plugin_exports("pitome")[0]), "-o", str(tmp_path / "x.engine")]) == 2
    assert "no plugin library was found; run `tokenfuse plugin build`" in capsys.readouterr().err
    assert not (tmp_path / "x.engine").exists()


def test_plugin_build_names_what_is_missing(monkeypatch, tmp_path):
    monkeypatch.setattr(plugins, "_kernel_lens_headers", lambda: None)
    monkeypatch.delenv("TENSORRT_ROOT", raising=False)
    with pytest.raises(UsageError, match="TensorRT headers .* not found"):
        plugins.build(tmp_path, architectures="75-real", log=lambda *_: None)
    assert not (tmp_path / plugins.LIBRARY_NAME).exists()
    monkeypatch.setattr(plugins, "cmake_path", lambda: None)
    with pytest.raises(UsageError, match="cmake not found"):
        plugins.build(tmp_path, log=lambda *_: None)


@pytest.mark.parametrize("model", ["bert", "clip-text"])
@pytest.mark.parametrize("method", ["tome", "pitome", "crossget", "turbo"])
def test_text_encoders_export_with_the_plugin_lowering(hf_dirs, model, method, tmp_path):
    """BERT (padding mask) and CLIP text (plus the frozen EOS and causal positions) validate in
    ONNX Runtime with one plugin node per merging layer."""
    tower = {"tower": "text"} if model == "clip-text" else {}
    path = tmp_path / "t.onnx"
    seq_len = 48 if method == "turbo" else 24  # Turbo merges only layers of 40 tokens or more
    manifest = export(f"hf:{hf_dirs[model]}", path, method=method, r=0.8, seq_len=seq_len, lowering="plugin", seed=0,
                      log=lambda *_: None, **tower)
    assert_validated_exactly(manifest)
    assert manifest["plugin"]["nodes"] > 0
    nodes = [n for n in onnx.load(str(path)).graph.node if n.op_type == OP_TYPE]
    attributes = {a.name: onnx.helper.get_attribute_value(a) for a in nodes[0].attribute}
    assert attributes["padded"] == 1 and attributes["causal"] == int(model == "clip-text")
    assert len(nodes[0].input) == 3 + (method == "turbo") + 1 + 2 * (model == "clip-text")


def test_lowering_refusals(tmp_path):
    with pytest.raises(UsageError, match="needs a merge method"):
        export("timm:vit_tiny_patch16_224", tmp_path / "n.onnx", random_init=True, method="none", lowering="plugin", log=lambda *_: None)
    with pytest.raises(UsageError, match="--lowering 'graph'"):
        export("timm:vit_tiny_patch16_224", tmp_path / "n.onnx", random_init=True, lowering="graph", log=lambda *_: None)
    assert not list(tmp_path.iterdir())
