"""The CLI: the headline command works; every bad input gets one line, a non-zero exit, no files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from gates import assert_validated_exactly
from tokenfuse.cli import main


def _run(args, tmp_path, capsys):
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.xdist_group("vit-b-pitome")  # test_export's tests of this export share it
def test_headline_command_through_the_installed_entry_point(shared_exports):
    """conftest runs the README's headline command (with --random-init) to make ViT-B's pitome export."""
    out, manifest = shared_exports.get("vit-b", "pitome")
    result = shared_exports.headline_run
    assert result.args[1:] == [*shared_exports.HEADLINE_ARGS, "-o", str(out)] and Path(result.args[0]).name == "tokenfuse"
    for piece in ("tokens in", "FLOPs ratio 0.565", "PiToMe paper", "0.538", "[1/3]", "[2/3]", "[3/3]"):
        assert piece in result.stdout
    assert manifest == json.loads(out.with_suffix(".json").read_text())
    assert_validated_exactly(manifest)
    assert manifest["schedule"][-1] == 60
    assert sorted(p.name for p in out.parent.iterdir()) == ["vit.json", "vit.onnx"]


def test_export_no_validate_and_options_reach_the_manifest(tmp_path, capsys):
    out = tmp_path / "m.onnx"
    code, stdout, _ = _run(
        ["export", "--model", "timm:deit_tiny_distilled_patch16_224", "--random-init", "--method", "tome", "--r", "13",
         "--no-prop-attn", "--metric", "hidden", "--no-validate", "-o", str(out)], tmp_path, capsys)
    assert code == 0
    manifest = json.loads(out.with_suffix(".json").read_text())
    assert manifest["validation"] is None and "skipped" in stdout
    assert manifest["settings"]["protected_tokens"] == 2
    assert manifest["settings"]["proportional_attention"] is False and manifest["settings"]["metric"] == "hidden"
    assert manifest["schedule"][-1] == 198 - 12 * 13


@pytest.fixture
def files(tmp_path):
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"not a checkpoint")
    import torch

    wrong = tmp_path / "wrong.pth"
    torch.save({"foo": torch.zeros(3)}, wrong)
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2Model"]}))
    return {"corrupt": str(corrupt), "wrong": str(wrong), "gpt2": str(gpt2), "missing": str(tmp_path / "nope")}


BAD = {
    "unknown timm model": ["--model", "timm:vit_nonexistent_model"],
    "unsupported timm architecture": ["--model", "timm:resnet18"],
    "unsupported hf architecture": ["--model", "hf:{gpt2}"],
    "missing hf dir": ["--model", "hf:{missing}"],
    "unknown source": ["--model", "torchvision:vit_b_16"],
    "no source prefix": ["--model", "vit_base_patch16_224"],
    "too large integer r": ["--model", "timm:vit_tiny_patch16_224", "--random-init", "--r", "120"],
    "r of one": ["--model", "timm:vit_tiny_patch16_224", "--random-init", "--r", "1.0"],
    "r of zero": ["--model", "timm:vit_tiny_patch16_224", "--random-init", "--r", "0"],
    "r not a number": ["--model", "timm:vit_tiny_patch16_224", "--random-init", "--r", "lots"],
    "short schedule": ["--model", "timm:vit_tiny_patch16_224", "--random-init", "--schedule", "180,160"],
    "bad schedule": ["--model", "timm:vit_tiny_patch16_224", "--random-init", "--schedule", "180,x"],
    "min tokens under protected": ["--model", "timm:vit_tiny_patch16_224", "--random-init", "--min-tokens", "1"],
    "corrupt weights": ["--model", "timm:vit_tiny_patch16_224", "--weights", "{corrupt}"],
    "mismatched weights": ["--model", "timm:vit_tiny_patch16_224", "--weights", "{wrong}"],
    "missing weights": ["--model", "timm:vit_tiny_patch16_224", "--weights", "{missing}"],
    "unknown method": ["--model", "timm:vit_tiny_patch16_224", "--random-init", "--method", "fastest"],
    "low opset": ["--model", "timm:vit_tiny_patch16_224", "--random-init", "--opset", "13"],
    "bad margin": ["--model", "timm:vit_tiny_patch16_224", "--random-init", "--margin", "1.5"],
    "seq len too long": ["--model", "hf:{minilm}", "--seq-len", "4096"],
    "tower of a non-CLIP model": ["--model", "hf:{minilm}", "--tower", "text"],
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_one_line_nonzero_nothing_written(case, files, minilm_path, tmp_path, capsys):
    args = [a.format(**files, minilm=minilm_path) for a in BAD[case]]
    out = tmp_path / "out" / "model.onnx"
    code, _, err = _run_or_exit(["export", *args, "-o", str(out)], capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tokenfuse: error:"), err
    assert "Traceback" not in err
    assert not out.parent.exists() or not any(out.parent.iterdir())


def _run_or_exit(args, capsys):
    """main's return code, or the exit code of an argument error (argparse exits)."""
    try:
        code = main(args)
    except SystemExit as exc:
        code = exc.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_argparse_errors_are_one_line_with_exit_2(tmp_path):
    """Through the process, as a user sees it: one line that points to --help, exit code 2."""
    result = subprocess.run([sys.executable, "-m", "tokenfuse.cli", "export", "--model", "timm:x", "--r", "1.5", "-o", "a.onnx"],
                            capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "tokenfuse: error: argument --r: --r 1.5: a fraction is the share of tokens kept per layer and must be in (0, 1); "
        "give an integer (e.g. 13) for tokens removed per layer; see tokenfuse export --help"]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args", [
    ["export", "--model", "timm:x", "--method", "fastest", "-o", "a.onnx"],
    ["export", "--model", "timm:x"],
    ["build", "m.onnx", "-o", "x.engine", "--batch", "9:1:2"],
    ["plugin"],
    [],
])
def test_every_argument_error_is_one_line_pointing_to_help(args, capsys):
    code, _, err = _run_or_exit(args, capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tokenfuse: error: ") and lines[0].endswith("--help"), err


def test_wrong_output_suffix_refused(tmp_path, capsys):
    code, _, err = _run(["export", "--model", "timm:vit_tiny_patch16_224", "--random-init", "-o", str(tmp_path / "model.trt")], tmp_path, capsys)
    assert code == 2 and "must end in .onnx" in err
    assert list(tmp_path.iterdir()) == []


def test_failed_validation_leaves_no_partial_files(tmp_path, monkeypatch, capsys):
    """A real validation failure: a weight perturbed after tracing, so the ONNX file no longer
    computes what the PyTorch model does. One line, exit 2, nothing written, no temporaries left."""
    import tempfile

    import torch

    from tokenfuse.exporter import onnx_export

    trace = onnx_export.trace

    def trace_then_perturb(adapter, *args, **kwargs):
        traced = trace(adapter, *args, **kwargs)
        weight = adapter.model.blocks[0].mlp.fc2.weight
        with torch.no_grad():  # random, not a constant a LayerNorm would take out again
            weight.add_(0.05 * torch.randn(weight.shape, generator=torch.Generator().manual_seed(0)))
        return traced

    monkeypatch.setattr(onnx_export, "trace", trace_then_perturb)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "temporaries"))
    (tmp_path / "temporaries").mkdir()
    out = tmp_path / "out"
    out.mkdir()
    code, _, err = _run(["export", "--model", "timm:vit_tiny_patch16_224", "--random-init", "--seed", "0", "-o", str(out / "m.onnx")], tmp_path, capsys)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tokenfuse: error: validation failed: ") and "max_abs_error" in lines[0], err
    assert lines[0].endswith("nothing written")
    assert list(out.iterdir()) == []
    assert not list((tmp_path / "temporaries").glob("tokenfuse-*"))  # the export's work directory is gone
