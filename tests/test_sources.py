"""Weights and names as users write them: timm's pretrained weights and hf:ORG/NAME come from the
Hugging Face cache (a cache this test writes, laid out as huggingface_hub lays one out, with the
network off), --random-init asks for random weights, and every way to fail is one line, exit 2."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tokenfuse.cli import main
from tokenfuse.exporter import load_model

REVISION = "0123456789abcdef0123456789abcdef01234567"
TIMM_NAME = "vit_tiny_patch16_224"
HUB_ID = "tokenfuse-test/tiny-bert"


def cache_repo(cache: Path, repo_id: str) -> Path:
    """An empty snapshot of `repo_id` in `cache` (models--ORG--NAME/snapshots/<rev>, refs/main)."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(REVISION)
    snapshot = repo / "snapshots" / REVISION
    snapshot.mkdir(parents=True)
    return snapshot


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory, hf_dirs):
    """timm's hub repository for vit_tiny_patch16_224 (seeded random weights standing in for the real
    ones) and a BERT directory under a hub id."""
    import timm
    from safetensors.torch import save_file

    cache = tmp_path_factory.mktemp("hub")
    torch.manual_seed(7)
    model = timm.create_model(TIMM_NAME)
    timm_repo = model.pretrained_cfg["hf_hub_id"]
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, cache_repo(cache, timm_repo) / "model.safetensors")
    shutil.copytree(hf_dirs["bert"], cache_repo(cache, HUB_ID), dirs_exist_ok=True)
    return {"cache": cache, "timm_state": model.state_dict(), "timm_repo": timm_repo}


@pytest.fixture
def use_cache(monkeypatch):
    """Point this process's huggingface_hub at a cache (it reads HF_HUB_CACHE once, on import)."""
    from huggingface_hub import constants

    def point(cache: Path):
        monkeypatch.setenv("HF_HUB_CACHE", str(cache))
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))

    return point


def _same_weights(model: torch.nn.Module, state: dict) -> bool:
    mine = model.state_dict()
    return mine.keys() == state.keys() and all(torch.equal(mine[k], state[k]) for k in state)


def test_timm_name_loads_pretrained_weights_from_the_cache(hub_cache, use_cache):
    import timm

    use_cache(hub_cache["cache"])
    adapter = load_model(f"timm:{TIMM_NAME}")
    assert _same_weights(adapter.model, hub_cache["timm_state"])
    assert _same_weights(timm.create_model(TIMM_NAME, pretrained=True), hub_cache["timm_state"])  # as timm itself loads them
    random = load_model(f"timm:{TIMM_NAME}", random_init=True)
    assert not torch.equal(random.model.pos_embed, hub_cache["timm_state"]["pos_embed"])


def test_random_init_is_the_same_every_time_and_leaves_the_global_generator_alone():
    """--random-init is timm's initialisation under torch seed 0: runs (and tests) reproduce."""
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    first = load_model(f"timm:{TIMM_NAME}", random_init=True).model.state_dict()
    assert torch.equal(torch.rand(1), before)  # the caller's random stream is untouched
    second = load_model(f"timm:{TIMM_NAME}", random_init=True).model
    assert _same_weights(second, first)
    torch.manual_seed(0)
    import timm

    assert _same_weights(timm.create_model(TIMM_NAME, pretrained=False), first)


def test_hub_id_loads_from_the_cache(hub_cache, hf_dirs, use_cache):
    from transformers import BertModel

    use_cache(hub_cache["cache"])
    adapter = load_model(f"hf:{HUB_ID}", seq_len=16)
    assert adapter.directory == hub_cache["cache"] / f"models--{HUB_ID.replace('/', '--')}" / "snapshots" / REVISION
    assert _same_weights(adapter.model, BertModel.from_pretrained(hf_dirs["bert"]).state_dict())


def test_cli_reads_the_cache_from_the_environment_with_the_network_off(hub_cache, tmp_path):
    """A fresh process, as a user runs it: HF_HUB_CACHE and HF_HUB_OFFLINE=1 in the environment."""
    env = {**os.environ, "HF_HUB_CACHE": str(hub_cache["cache"]), "HF_HUB_OFFLINE": "1"}
    tokenfuse = str(Path(sys.executable).parent / "tokenfuse")
    runs = {
        "bert": ["--model", f"hf:{HUB_ID}", "--seq-len", "16", "--method", "pitome", "--r", "0.8", "--seed", "0"],
        "vit": ["--model", f"timm:{TIMM_NAME}", "--method", "none", "--no-validate"],
    }
    for name, args in runs.items():
        out = tmp_path / f"{name}.onnx"
        result = subprocess.run([tokenfuse, "export", *args, "-o", str(out)], env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr
        manifest = json.loads(out.with_suffix(".json").read_text())
        assert manifest["settings"]["source"] == args[1] and manifest["settings"]["random_init"] is False
    assert str(hub_cache["cache"]) in json.loads((tmp_path / "bert.json").read_text())["model"]


ERRORS = {
    "timm weights not cached": (["--model", f"timm:{TIMM_NAME}"], ("not in the Hugging Face cache", "--weights", "--random-init")),
    "hub id not cached": (["--model", "hf:nobody/nothing"], ("not in the Hugging Face cache", "local directory")),
    "timm model without pretrained weights": (["--model", "timm:vit_base_patch16_gap_224"], ("no pretrained weights", "--random-init")),
    "weights and random init together": (["--model", f"timm:{TIMM_NAME}", "--weights", "{weights}", "--random-init"], ("exclude",)),
    "random init of an hf model": (["--model", "hf:{bert}", "--random-init"], ("--random-init is for timm",)),
}


@pytest.mark.parametrize("case", sorted(ERRORS))
def test_error_paths_one_line_exit_2_nothing_written(case, hf_dirs, use_cache, tmp_path, capsys):
    from huggingface_hub import constants

    assert constants.HF_HUB_OFFLINE  # the network is off for the whole suite (conftest)
    use_cache(tmp_path / "empty-cache")
    weights = tmp_path / "w.pth"
    torch.save({}, weights)
    args, phrases = ERRORS[case]
    out = tmp_path / "out" / "m.onnx"
    code = main(["export", *[a.format(weights=weights, bert=hf_dirs["bert"]) for a in args], "-o", str(out)])
    err = capsys.readouterr().err
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tokenfuse: error:"), err
    assert all(phrase in err for phrase in phrases), err
    assert not out.parent.exists()
