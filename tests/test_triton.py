"""`tokenfuse triton-repo`: the config parses with Triton's own schema and matches the model."""

from __future__ import annotations

import hashlib
import json

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from tokenfuse.cli import main
from tokenfuse.engines.build import sidecar_path
from tokenfuse.engines.triton import write_repository
from tokenfuse.exporter.errors import UsageError

pytestmark = pytest.mark.xdist_group("vit-ti")  # one pytest-xdist worker makes the shared ViT-Ti export and engine once


@pytest.fixture(scope="module")
def exported(shared_exports):
    """ViT-Ti and MiniLM, pitome r=0.9 (conftest's shared exports)."""
    return shared_exports.get("vit-ti", "pitome")[0], shared_exports.get("minilm", "pitome")[0]


def _parse(folder):
    return text_format.Parse((folder / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())


@pytest.mark.parametrize("which", [0, 1])
def test_onnx_repository_matches_the_model(exported, tmp_path, which):
    model = exported[which]
    manifest = json.loads(model.with_suffix(".json").read_text())
    [folder] = write_repository(model, tmp_path / "repo", max_batch=16, instances=2)
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


@pytest.fixture(scope="module")
def vit_engine(shared_exports):
    """The ViT-Ti tome export built for batch 1:2:4 (conftest's shared engine)."""
    return shared_exports.engine("vit-ti", "tome")[0]


def test_engine_repository_uses_the_plan_and_its_profile(vit_engine, tmp_path):
    engine = vit_engine
    [folder] = write_repository(engine, tmp_path / "repo")
    config = _parse(folder)
    assert config.platform == "tensorrt_plan" and config.max_batch_size == 4
    assert (folder / "1" / "model.plan").read_bytes() == engine.read_bytes()
    assert [t.name for t in config.output] == ["logits", "last_hidden_state", "token_sizes"]
    assert list(config.output[1].dims) == [60, 192]  # r=0.9: 197 tokens -> 60


def test_refusals_leave_nothing(exported, tmp_path, capsys):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(UsageError, match="not empty"):
        write_repository(exported[0], tmp_path / "full")
    assert main(["triton-repo", str(tmp_path / "missing.onnx"), "-o", str(tmp_path / "r")]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert not (tmp_path / "r").exists()
    assert main(["triton-repo", str(exported[0]), "-o", str(tmp_path / "ok"), "--kind", "cpu"]) == 0
    assert _parse(tmp_path / "ok" / exported[0].stem).instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_CPU


def test_an_engines_plugin_library_is_copied_and_preloaded(vit_engine, tmp_path):
    """An engine whose sidecar names a plugin library (as `tokenfuse build` writes it for a
    --lowering plugin model): the library is copied into the repository and its README preloads it."""
    engine = tmp_path / "vit.engine"
    engine.write_bytes(vit_engine.read_bytes())
    library = tmp_path / "libtokenfuse_plugins.so"
    library.write_bytes(b"\x7fELF stand-in for the plugin library")
    sidecar = json.loads(sidecar_path(vit_engine).read_text())
    sidecar["plugin_library"] = {"path": str(library), "sha256": hashlib.sha256(library.read_bytes()).hexdigest()}
    sidecar_path(engine).write_text(json.dumps(sidecar))
    [folder] = write_repository(engine, tmp_path / "repo")
    assert (folder / "plugins" / library.name).read_bytes() == library.read_bytes()
    readme = (tmp_path / "repo" / "README.md").read_text()
    assert f"LD_PRELOAD=$PWD/repo/{folder.name}/plugins/{library.name} tritonserver --model-repository" in readme
