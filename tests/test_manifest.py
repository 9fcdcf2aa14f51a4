"""The typed export manifest: what export writes reads back whole, and a manifest that is not
one, or is from a newer tokenfuse, is refused with one message."""

from __future__ import annotations

import json

import pytest

from tokenfuse.cli import main
from tokenfuse.exporter.errors import UsageError
from tokenfuse.exporter.manifest import SCHEMA_VERSION, Manifest

WRITTEN = {"schema_version": SCHEMA_VERSION, "model": "timm:vit_tiny_patch16_224", "family": "timm-vit", "method": "tome",
           "inputs": [{"name": "pixel_values", "dtype": "float32", "shape": ["batch", 3, 224, 224]}],
           "outputs": [{"name": "logits", "dtype": "float32", "shape": ["batch", 1000]}],
           "settings": {"r": 13}, "schedule": [184, 171], "a_key_from_later": {"kept": True}}


def test_round_trip_keeps_every_key(tmp_path):
    manifest = Manifest.from_json(WRITTEN)
    assert manifest.method == "tome" and manifest.schedule == [184, 171] and not manifest.length_adaptive
    assert manifest.extra == {"a_key_from_later": {"kept": True}}
    (tmp_path / "m.json").write_text(json.dumps(manifest.to_json()))
    again = Manifest.read(tmp_path / "m.onnx")  # the .onnx names the .json beside it
    assert again == manifest and {k: v for k, v in again.to_json().items() if k in WRITTEN} == WRITTEN


def test_a_manifest_from_before_the_schema_version_reads_as_version_1():
    old = {k: v for k, v in WRITTEN.items() if k != "schema_version"}
    assert Manifest.from_json(old).schema_version == 1


@pytest.mark.parametrize("data, message", [
    ({**WRITTEN, "schema_version": SCHEMA_VERSION + 1}, "newer than this tokenfuse reads"),
    ({k: v for k, v in WRITTEN.items() if k != "method"}, "no method"),
    ([1, 2], "a JSON object"),
])
def test_what_is_not_a_manifest_is_refused(data, message):
    with pytest.raises(UsageError, match=message):
        Manifest.from_json(data, "m.json")


def test_the_engine_commands_refuse_a_foreign_manifest_in_one_line(tmp_path, capsys):
    """Given as a manifest, someone else's JSON is refused; beside an .onnx it is not taken for one
    (a graph from elsewhere may have a .json of its own), and a broken tokenfuse manifest is refused."""
    (tmp_path / "m.onnx").write_bytes(b"")
    (tmp_path / "m.json").write_text(json.dumps({"name": "something else"}))
    assert main(["show", "--manifest", str(tmp_path / "m.json"), "--text", "a cat", "-o", str(tmp_path / "o.html")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a tokenfuse export manifest (no model, family, method, inputs, outputs)" in err[0]
    assert Manifest.beside(tmp_path / "m.onnx") is None
    assert main(["triton-repo", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "repo")]) == 2
    assert "no manifest beside it" in capsys.readouterr().err
    (tmp_path / "m.json").write_text(json.dumps({"tokenfuse_version": "0.1.0", "model": "x"}))
    assert main(["triton-repo", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "repo")]) == 2
    assert "not a tokenfuse export manifest (no family, method, inputs, outputs)" in capsys.readouterr().err
    assert not (tmp_path / "repo").exists() and not (tmp_path / "o.html").exists()
