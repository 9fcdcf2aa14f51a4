"""`tokenfuse triton-repo`: the config parses with Triton's own schema and matches the model."""

from __future__ import annotations

import json

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from tokenfuse.cli import main
from tokenfuse.engines.build import build_engine
from tokenfuse.engines.triton import write_repository
from tokenfuse.exporter import export
from tokenfuse.exporter.errors import UsageError


@pytest.fixture(scope="module")
def exported(tmp_path_factory, minilm_path):
    root = tmp_path_factory.mktemp("triton")
    vit, text = root / "vit.onnx", root / "minilm.onnx"
    export("timm:vit_tiny_patch16_224", vit, random_init=True, method="tome", r=13, validate=False, log=lambda *_: None)
    export(f"hf:{minilm_path}", text, method="pitome", r=0.9, seq_len=64, validate=False, log=lambda *_: None)
    return vit, text


def _parse(folder):
    return text_format.Parse((folder / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())


@pytest.mark.parametrize("which", [0, 1])
def test_onnx_repository_matches_the_model(exported, tmp_path, which):
    model = exported[which]
    manifest = json.loads(model.with_suffix(".json").read_text())
    folder = write_repository(model, tmp_path / "repo", max_batch=16, instances=2)
    config = _parse(folder)
    assert config.name == model.stem and config.platform == "onnxruntime_onnx" and config.max_batch_size == 16
    assert (folder / "1" / "model.onnx").read_bytes() == model.read_bytes()
    types = {"float32": model_config_pb2.TYPE_FP32, "int64": model_config_pb2.TYPE_INT64}
    for declared, actual in ((config.input, manifest["inputs"]), (config.output, manifest["outputs"])):
        assert [t.name for t in declared] == [t["name"] for t in actual]
        for tensor, spec in zip(declared, actual):
            assert tensor.data_type == types[spec["dtype"]] and list(tensor.dims) == spec["shape"][1:]
    assert config.dynamic_batching.max_queue_delay_microseconds == 5000 and 16 in config.dynamic_batching.preferred_batch_size
    assert config.instance_group[0].count == 2 and config.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_GPU
    assert "tritonserver --model-repository" in (tmp_path / "repo" / "README.md").read_text()


def test_engine_repository_uses_the_plan_and_its_profile(exported, tmp_path):
    engine = tmp_path / "vit.engine"
    build_engine(exported[0], engine, batch=(1, 4, 8), log=lambda *_: None)
    folder = write_repository(engine, tmp_path / "repo")
    config = _parse(folder)
    assert config.platform == "tensorrt_plan" and config.max_batch_size == 8
    assert (folder / "1" / "model.plan").read_bytes() == engine.read_bytes()
    assert [t.name for t in config.output] == ["logits", "last_hidden_state", "token_sizes"]
    assert list(config.output[1].dims) == [197 - 12 * 13, 192]


def test_refusals_leave_nothing(exported, tmp_path, capsys):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(UsageError, match="not empty"):
        write_repository(exported[0], tmp_path / "full")
    assert main(["triton-repo", str(tmp_path / "missing.onnx"), "-o", str(tmp_path / "r")]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert not (tmp_path / "r").exists()
    assert main(["triton-repo", str(exported[0]), "-o", str(tmp_path / "ok"), "--kind", "cpu"]) == 0
    assert _parse(tmp_path / "ok" / "vit").instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_CPU
