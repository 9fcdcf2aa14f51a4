"""The method registry: a method with one knob is one `register` call, and then the CLI's flags,
the manifest, `show`'s options, the budget planner and the plugin lowering's refusal all know it."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from gates import assert_validated_exactly
from reference import reference_plan
from tokenfuse.cli import main, parser
from tokenfuse.engines.show import options_from_manifest
from tokenfuse.exporter import Manifest, methods, registry
from tokenfuse.exporter.methods import MethodConfig, match
from tokenfuse.exporter.registry import Knob, MergeMethod
from tokenfuse.exporter.settings import MergeOptions


def _decide_phase(sim, r, protected, free, rule, *, cls_attn, valid):
    """ToMe's bipartite matching with A on the positions of parity `phase` (0: ToMe itself)."""
    pos = methods.positions(sim)
    is_a = free & (pos % 2 == rule.phase)
    is_b = free & (pos % 2 != rule.phase)
    return methods.bipartite_match(sim, r, protected, is_a, is_b, pos)


TOY = MergeMethod(
    "phased", _decide_phase, "ToMe with a choice of which parity is A",
    knobs=(Knob("phase_parity", 0, "which positions are A (0 or 1)", choices=(0, 1)),),
    rule_defaults={"phase": 0},
    layer_rule=lambda knobs, layer, num_layers: {"phase": knobs["phase_parity"]},
)


@pytest.fixture
def toy(monkeypatch):
    monkeypatch.setattr(registry, "_METHODS", dict(registry._METHODS))
    return registry.register(TOY)


def test_a_registered_method_decides_through_match(toy):
    metric = torch.randn(3, 31, 8, generator=torch.Generator().manual_seed(0))
    as_tome = match(MethodConfig("phased"), metric, 9, protected=1)
    want = reference_plan("tome", metric.double().numpy(), 9, protected=1)  # parity 0 is ToMe
    assert np.array_equal(as_tome.dst_slot.numpy(), want)
    swapped = match(MethodConfig("phased", phase_parity=1), metric, 9, protected=1).dst_slot
    assert sorted(set(swapped[0].tolist())) == list(range(31 - 9)) and not torch.equal(swapped, as_tome.dst_slot)


def test_its_knob_is_checked_and_other_methods_ignore_it(toy):
    with pytest.raises(ValueError, match="--phase-parity 2: choose one of 0, 1"):
        MethodConfig("phased", phase_parity=2)
    assert MethodConfig("tome", phase_parity=1).knobs == {}
    assert MethodConfig("phased", margin=0.5).knobs == {"phase_parity": 0}
    with pytest.raises(Exception, match="unknown option"):
        MergeOptions(method="phased", parity=1)


def test_a_knob_name_means_one_thing(monkeypatch):
    monkeypatch.setattr(registry, "_METHODS", dict(registry._METHODS))
    clash = MergeMethod("other", _decide_phase, knobs=(Knob("margin", 0.5),))
    with pytest.raises(ValueError, match="differs"):
        registry.register(clash)
    assert "other" not in registry.method_names()


def test_the_cli_offers_it_and_the_export_records_its_knob(toy, tmp_path, capsys):
    help_text = parser().parse_args(["export", "--model", "m", "-o", "x.onnx"])  # parses: the flags exist
    assert help_text.phase_parity is None and help_text.method == "pitome"
    out = tmp_path / "phased.onnx"
    code = main(["export", "--model", "timm:vit_tiny_patch16_224", "--random-init", "--method", "phased", "--phase-parity", "1",
                 "--r", "8", "--seed", "0", "-o", str(out)])
    assert code == 0, capsys.readouterr().err
    manifest = json.loads(out.with_suffix(".json").read_text())
    assert manifest["method"] == "phased" and manifest["settings"]["phase_parity"] == 1
    assert_validated_exactly(manifest)
    assert manifest["schedule"][0] == 197 - 8
    assert "margin" not in manifest["settings"]  # only the method's own knobs
    assert options_from_manifest(Manifest.from_json(manifest))[1]["phase_parity"] == 1


def test_the_plugin_lowering_refuses_a_method_without_a_kernel(toy, tmp_path, capsys):
    out = tmp_path / "out" / "phased.onnx"
    code = main(["export", "--model", "timm:vit_tiny_patch16_224", "--random-init", "--method", "phased", "--lowering", "plugin",
                 "-o", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "no kernel for phased" in err[0] and "--lowering onnx" in err[0]
    assert not out.parent.exists() or not any(out.parent.iterdir())


# ---- model families ----------------------------------------------------------------------------

def test_the_supported_model_tables_are_the_families_own():
    from pathlib import Path

    from tokenfuse.exporter.adapters import supported_models_table

    root = Path(__file__).resolve().parents[1]
    assert supported_models_table("docs/") in (root / "README.md").read_text()
    assert supported_models_table("") in (root / "docs" / "models.md").read_text()


def test_a_family_is_its_adapter_alone(monkeypatch, tmp_path):
    """A family defined anywhere (here: a timm ViT subclass with its own adapter) is found by
    `patch`, exported, listed in the table and in the unsupported-model error, with no other edit."""
    import timm
    from timm.models.vision_transformer import VisionTransformer

    from tokenfuse.exporter import adapters, export, patch
    from tokenfuse.exporter.adapters.timm_vit import TimmViT
    from tokenfuse.exporter.errors import UsageError

    adapters.families()  # the built-in ones first, so the fixture's copy holds them
    monkeypatch.setattr(adapters, "_FAMILIES", list(adapters._FAMILIES))

    class SmallViT(VisionTransformer):
        pass

    class SmallViTFamily(TimmViT):
        family = "small-vit"
        models = "a `SmallViT` module"
        description = "a timm ViT subclass"
        output_names = "as timm's"

        @classmethod
        def accepts(cls, model):
            return isinstance(model, SmallViT)

    model = SmallViT(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, num_classes=5).eval()
    assert adapters.family_of(model) is SmallViTFamily  # TimmViT accepts it too: the subclass wins
    assert adapters.family_of(timm.create_model("vit_tiny_patch16_224", depth=1)) is TimmViT
    assert "| a `SmallViT` module | a timm ViT subclass | as timm's |" in adapters.supported_models_table()
    with pytest.raises(UsageError, match="a SmallViT module"):
        adapters.adapter_for(torch.nn.Linear(2, 2))

    manifest = export(adapters.adapter_for(model), tmp_path / "small.onnx", method="tome", r=2, seed=0, log=lambda *_: None)
    assert manifest["family"] == "small-vit"
    assert_validated_exactly(manifest)
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = model(images)
        merged = patch(model, method="tome", r=2)(images)
    assert merged.shape == plain.shape and type(model).__name__ == "TokenMergedSmallViT"


# ---- runtime backends --------------------------------------------------------------------------

def test_backends_are_chosen_by_suffix_and_name_their_triton_platform(tmp_path, capsys):
    from pathlib import Path

    from tokenfuse.engines.runtime import BACKENDS, OrtRunner, TrtRunner, backend_for, load
    from tokenfuse.exporter.errors import UsageError

    assert backend_for(Path("m.onnx")) is OrtRunner and backend_for(Path("m.plan")) is TrtRunner is backend_for(Path("m.engine"))
    assert {b.triton_platform for b in BACKENDS} == {"onnxruntime_onnx", "tensorrt_plan"}
    assert len({b.flag for b in BACKENDS}) == len(BACKENDS)
    odd = tmp_path / "m.tflite"
    odd.write_bytes(b"")
    with pytest.raises(UsageError, match=r"\.onnx \(onnxruntime\) or \.engine/\.plan \(tensorrt\)"):
        load(odd)
    assert main(["bench", str(tmp_path / "m.onnx"), "--backend", "trt"]) == 2
    assert "--backend trt does not run a .onnx file; ort runs .onnx; trt runs .engine/.plan" in capsys.readouterr().err
