"""The CLI: the headline command works; every bad input gets one line, a non-zero exit, no files."""

from __future__ import annotations

from contextlib import nullcontext
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tokenfuse.cli import main


def _run(args, tmp_path, capsys):
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_headline_command_through_the_installed_entry_point(tmp_path):
    out = tmp_path / "vit.onnx"
    result = subprocess.run(
        [str(Path(sys.executable).parent / "tokenfuse"), "export", "--model", "timm:vit_base_patch16_224", "--random-init", "--method", "pitome", "--r", "0.9", "-o", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    for piece in ("tokens in", "FLOPs ratio 0.565", "PiToMe paper", "0.538", "[1/3]", "[2/3]", "[3/3]"):
        assert piece in result.stdout
    manifest = json.loads(out.with_suffix(".json").read_text())
    assert manifest["validation"]["passed"] and manifest["schedule"][-1] == 60
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vit.json", "vit.onnx"]


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
    with pytest.raises(SystemExit) if case in ("unknown method", "r of one", "r of zero", "r not a number", "bad schedule") else nullcontext():
        code, _, err = _run(["export", *args, "-o", str(out)], tmp_path, capsys)
        assert code != 0
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("tokenfuse: error:"), err
        assert "Traceback" not in err
    assert not out.parent.exists() or not any(out.parent.iterdir())


def test_argparse_errors_are_one_line_with_exit_2(tmp_path):
    result = subprocess.run([sys.executable, "-m", "tokenfuse.cli", "export", "--model", "timm:x", "--r", "1.5", "-o", str(tmp_path / "a.onnx")],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert "must be in (0, 1)" in result.stderr and "Traceback" not in result.stderr


def test_wrong_output_suffix_refused(tmp_path, capsys):
    code, _, err = _run(["export", "--model", "timm:vit_tiny_patch16_224", "--random-init", "-o", str(tmp_path / "model.trt")], tmp_path, capsys)
    assert code == 2 and "must end in .onnx" in err
    assert list(tmp_path.iterdir()) == []


def test_failed_export_leaves_no_partial_files(tmp_path, monkeypatch, capsys):
    """A failure after tracing (here: validation) removes the temporaries and writes nothing."""
    from tokenfuse.exporter import onnx_export

    def failing(*args, **kwargs):
        return {"max_abs_error": 1.0, "max_rel_error": 1.0, "cosine_min": 0.5, "merge_agreement": 0.0,
                "free_running_max_abs_error": 1.0, "passed": False, "failures": ["max_abs_error 1 (at most 0.001)"]}

    monkeypatch.setattr(onnx_export, "validate", failing)
    code, _, err = _run(["export", "--model", "timm:vit_tiny_patch16_224", "--random-init", "-o", str(tmp_path / "m.onnx")], tmp_path, capsys)
    assert code == 2 and "validation failed" in err and len(err.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []
