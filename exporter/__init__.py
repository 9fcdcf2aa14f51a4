"""Merge methods, token budgets, model adapters and the ONNX exporter.

    from tokenfuse.exporter import patch, export
    model = patch(timm.create_model("vit_base_patch16_224"), method="pitome", r=0.9)
    manifest = export("timm:vit_base_patch16_224", "vit.onnx", method="pitome", r=0.9)  # timm's pretrained weights
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from .adapters import Adapter, adapter_for, load_model
from .buckets import UNMERGED_UP_TO, export_length_adaptive
from .errors import UsageError
from .manifest import Manifest
from .methods import METHODS, MethodConfig, TokenMerge, match
from .registry import Knob, MergeMethod, get_method, method_names, register
from .onnx_export import DEFAULT_OPSET, export_onnx
from .settings import MergeOptions

LOWERINGS = ("onnx", "plugin")

__all__ = ["patch", "export", "load_model", "match", "MethodConfig", "MergeOptions", "TokenMerge", "METHODS", "UsageError",
           "Knob", "MergeMethod", "register", "Manifest"]


def patch(model: torch.nn.Module, method: str = "pitome", r: float | int | None = 0.9, **options) -> torch.nn.Module:
    """Merge-enable `model` in place (as ToMe's apply_patch does) and return it.

    Budgets are computed from the token count of each input, so text models take any length.
    `options` are MergeOptions fields (schedule, min_tokens, prop_attn, margin, ...).
    """
    adapter = adapter_for(model)
    merge_options = MergeOptions(method=method, r=r, **options)
    base = type(model)

    class Merged(base):
        def forward(self, *args, **kwargs):
            inputs = adapter.bind(*args, **kwargs)
            settings, _ = merge_options.resolve(adapter.for_inputs(inputs))
            outputs, _ = adapter.run(settings, inputs)
            return adapter.patched_result(outputs)

    Merged.__name__ = Merged.__qualname__ = f"TokenMerged{base.__name__}"
    model.__class__ = Merged
    model._tokenfuse = merge_options
    return model


def export(model: str | Adapter, output: str | Path, *, method: str = "pitome", r=None, schedule=None,
           weights: str | None = None, random_init: bool = False, seq_len: int | None = None, tower: str = "vision", opset: int = DEFAULT_OPSET,
           dtype: str = "fp32", validate: bool = True, seed: int | None = None, lowering: str = "onnx", log=print,
           max_seq_len: int | None = None, unmerged_up_to: int = UNMERGED_UP_TO, buckets=None, always_merge: bool = False,
           **options) -> dict:
    """What `tokenfuse export` does: load, plan the budget, export, validate, write .onnx + .json.

    Given an Adapter, its model is converted in place to `dtype`. `random_init` asks for random
    weights (timm models). `lowering` is how each merge is written: standard ONNX ops, or one
    SimilarityEnergyMerge node for the TensorRT plugin. A text model named without `seq_len` (or
    given `max_seq_len`) is exported length-adaptive: one graph per length bucket up to
    `max_seq_len` (default: the model's; bucket lengths `buckets`, default buckets.LENGTHS), texts of
    at most `unmerged_up_to` tokens unmerged, and so are those too short for the merges in their bucket
    to pay for its padding unless `always_merge` (buckets.py).
    """
    if lowering not in LOWERINGS:
        raise UsageError(f"--lowering {lowering!r}: choose {' or '.join(LOWERINGS)}")
    adapter = model if isinstance(model, Adapter) else load_model(model, weights=weights, random_init=random_init, seq_len=seq_len, tower=tower)
    if lowering == "plugin" and method == "none":
        raise UsageError("--lowering plugin needs a merge method; --method none has no merge to lower")
    if lowering == "plugin" and method in method_names() and get_method(method).kernel_code is None:
        raise UsageError(f"--lowering plugin: the tokenfuse plugin has no kernel for {method}; export it with --lowering onnx")
    if lowering == "plugin" and any(view.position_bias is not None for view in adapter.views()):
        raise UsageError(f"--lowering plugin does not carry relative positions ({adapter.name} has a relative position bias, "
                         "e.g. MPNet); export it with --lowering onnx")
    merge_options = MergeOptions(method=method, r=r, schedule=tuple(schedule) if schedule else None, **options)
    adaptive = adapter.is_text and adapter.length_adaptive and seq_len is None and (isinstance(model, str) or max_seq_len is not None)
    for flag, value in (("--max-seq-len", max_seq_len), ("--buckets", buckets), ("--always-merge", always_merge or None)):
        if value is not None and not adaptive:
            if not adapter.is_text:
                raise UsageError(f"{flag} is for text models; {adapter.name} takes images")
            if seq_len is not None:
                raise UsageError(f"{flag} is for length-adaptive text exports; give --seq-len or {flag}, not both")
            raise UsageError(f"{flag} is for length-adaptive exports (BERT-family models); {adapter.name} is exported at one fixed length")
    extra = {
        "r": r,
        "requested_schedule": list(schedule) if schedule else None,
        "min_tokens": merge_options.min_tokens,
        "weights": str(Path(weights).resolve()) if weights else None,
        "random_init": random_init,
        "source": model if isinstance(model, str) else adapter.name,  # as named; "model" is where it was loaded from
        "tower": tower,
    }
    if adaptive:
        return export_length_adaptive(adapter, merge_options, Path(output), longest=max_seq_len, lowering=lowering, unmerged_up_to=unmerged_up_to,
                                      opset=opset, dtype=dtype, validate=validate, seed=seed, extra=extra, log=log, ladder=buckets,
                                      always_merge=always_merge)
    settings, report = merge_options.resolve(adapter)
    settings = dataclasses.replace(settings, lowering=lowering)
    log(report.table())
    if adapter.is_text:
        extra["seq_len"] = adapter.shape().tokens
    return export_onnx(adapter, settings, report, Path(output), opset=opset, dtype=dtype, run_validation=validate, seed=seed, extra=extra, log=log)
