"""Serving preprocessing (tokenfuse.engines.preprocess) equals the model's own: timm's eval
transform (timm.data.create_transform) and the Hugging Face image processors, on non-square images."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import transformers
from PIL import Image

from tokenfuse.engines.preprocess import Preprocessor
from tokenfuse.exporter import load_model
from tokenfuse.exporter.adapters import adapter_for
from tokenfuse.exporter.adapters.hf_vit import HfViT

SIZES = [(300, 200), (181, 333), (97, 64), (640, 481)]  # (width, height): wide, tall, upscaled, odd


def _images():
    """Noise with a smooth ramp: interpolation differences show at every pixel."""
    rng = np.random.default_rng(0)
    images = []
    for width, height in SIZES:
        ramp = np.linspace(0, 255, width)[None, :, None] * np.linspace(0.2, 1, height)[:, None, None]
        pixels = np.clip(ramp + rng.normal(0, 40, (height, width, 3)), 0, 255).astype(np.uint8)
        images.append(Image.fromarray(pixels))
    return images


IMAGES = _images()


def _ours(spec: dict, picture) -> np.ndarray:
    return Preprocessor(spec).pixels(picture)


@pytest.mark.parametrize("overlay", [
    {},  # vit_tiny_patch16_224's own: crop_pct 0.9, bicubic (224 / 0.9 -> 248, not 249)
    {"crop_pct": 0.875, "interpolation": "bilinear", "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)},
    {"crop_pct": 0.95, "crop_mode": "squash", "interpolation": "bicubic"},
    {"crop_pct": 1.0, "interpolation": "nearest"},
], ids=["default", "imagenet-bilinear", "squash", "nearest"])
def test_timm_models_get_timms_eval_transform(overlay):
    from timm.data import create_transform, resolve_data_config

    model = timm.create_model("vit_tiny_patch16_224", depth=1, pretrained_cfg_overlay=overlay)
    spec = adapter_for(model).preprocess()
    transform = create_transform(**resolve_data_config({}, model=model))  # pretrained_cfg's 224 = the model's
    if not overlay:
        assert spec["resize"] == {"shortest_edge": 248}
    for picture in IMAGES:
        want = transform(picture).numpy()
        got = _ours(spec, picture)
        assert got.shape == want.shape == (3, 224, 224)
        assert np.abs(got - want).max() <= 1e-5, picture.size


def _pil_processors():
    """Every Hugging Face PIL-backend processor for the image encoders tokenfuse or its users
    pair with ViT-style models, as available in this transformers."""
    names = ["ViTImageProcessorPil", "CLIPImageProcessorPil", "SiglipImageProcessorPil", "BitImageProcessorPil",
             "DeiTImageProcessorPil", "BeitImageProcessorPil"]
    return [name for name in names if hasattr(transformers, name)]


@pytest.fixture(scope="module")
def vit_224(tmp_path_factory):
    """A small HF ViT taking 224 x 224 (patch 32) in a directory the processors are saved into."""
    path = tmp_path_factory.mktemp("vit224")
    config = transformers.ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, image_size=224, patch_size=32)
    transformers.ViTModel(config).save_pretrained(path)
    return path


def _compare(processor, adapter, tolerance):
    spec = adapter.preprocess()
    worst = 0.0
    for picture in IMAGES:
        want = processor(images=picture, return_tensors="np")["pixel_values"][0]
        got = _ours(spec, picture)
        assert got.shape == want.shape
        worst = max(worst, float(np.abs(got - want).max()))
    assert worst <= tolerance, (type(processor).__name__, worst)
    return spec


@pytest.mark.parametrize("name", _pil_processors())
def test_hf_processor_configs_are_followed(vit_224, name):
    """The processor's own configuration, saved as preprocessor_config.json beside the model."""
    assert len(_pil_processors()) >= 2
    processor = getattr(transformers, name)()
    processor.save_pretrained(vit_224)
    model = transformers.ViTModel.from_pretrained(vit_224)
    spec = _compare(processor, HfViT(model, f"hf:{vit_224}"), 1e-5)
    if name == "ViTImageProcessorPil":  # squashed to 224 x 224, bilinear, no crop
        assert spec["resize"] == {"height": 224, "width": 224} and spec["crop"] is None and spec["interpolation"] == "bilinear"


def test_legacy_integer_sizes(vit_224):
    """Old configs store sizes as integers: the shortest edge when there is a centre crop."""
    (vit_224 / "preprocessor_config.json").write_text(
        '{"image_processor_type": "CLIPImageProcessor", "do_resize": true, "size": 256, "do_center_crop": true, "crop_size": 224, '
        '"resample": 3, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.25, 0.25, 0.25]}')
    processor = transformers.CLIPImageProcessorPil.from_pretrained(vit_224)
    model = transformers.ViTModel.from_pretrained(vit_224)
    spec = _compare(processor, HfViT(model, f"hf:{vit_224}"), 1e-5)
    assert spec["resize"] == {"shortest_edge": 256} and spec["crop"] == [224, 224]


@pytest.mark.parametrize("name", ["ViTImageProcessor", "CLIPImageProcessor"])
def test_hf_default_torchvision_processors_agree_closely(vit_224, name):
    """transformers' default processors resize with torchvision (antialiased tensors), not PIL: the
    same steps, a rounding apart (measured: at most two 1/255 steps of a pixel, over the std)."""
    processor = getattr(transformers, name)()
    processor.save_pretrained(vit_224)
    model = transformers.ViTModel.from_pretrained(vit_224)
    _compare(processor, HfViT(model, f"hf:{vit_224}"), 2 / 255 / min(processor.image_std) + 1e-5)


@pytest.mark.parametrize("which, processor", [("vit", "ViTImageProcessorPil"), ("clip-vision", "CLIPImageProcessorPil")])
def test_directories_without_a_processor_config_get_the_familys_processor(hf_dirs, which, processor):
    adapter = load_model(f"hf:{hf_dirs[which]}")
    size = adapter.image_size[0]
    if which == "vit":
        reference = transformers.ViTImageProcessorPil(size={"height": size, "width": size})
    else:
        reference = transformers.CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    _compare(reference, adapter, 1e-5)
