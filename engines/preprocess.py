"""Raw images or texts to model inputs, as the export manifest's `preprocess` entry says.

The image steps are those of the model's own preprocessing, so a served model sees what it saw in
training: timm's eval transform (resize the shortest edge to floor(size / crop_pct), centre crop)
or the Hugging Face image processor of the model directory (resize to a shortest edge or squash to
height x width, optional centre crop), each with its interpolation, rescale factor, mean and std.
The adapters write the entry (`Adapter.preprocess`); tests/test_preprocess.py checks it against
timm's and Hugging Face's own transforms.
"""

from __future__ import annotations

import io

import numpy as np

from ..exporter.errors import UsageError


def resized_size(width: int, height: int, resize: dict) -> tuple[int, int]:
    """(width, height) after `resize`: {"shortest_edge": s} keeps the aspect ratio (the long edge
    truncated, as torchvision and Hugging Face do); {"height": h, "width": w} squashes."""
    if "shortest_edge" in resize:
        edge = resize["shortest_edge"]
        if width <= height:
            return edge, int(edge * height / width)
        return int(edge * width / height), edge
    return resize["width"], resize["height"]


def crop_box(width: int, height: int, crop: tuple[int, int], offset: str) -> tuple[int, int, int, int]:
    """The centre crop's (left, top, right, bottom). torchvision (timm) rounds the offset half to
    even, Hugging Face floors it."""
    crop_height, crop_width = crop
    if crop_width > width or crop_height > height:
        raise ValueError(f"the image is {width}x{height} after resizing, smaller than the {crop_width}x{crop_height} crop")
    if offset == "round":
        left, top = int(round((width - crop_width) / 2.0)), int(round((height - crop_height) / 2.0))
    else:
        left, top = (width - crop_width) // 2, (height - crop_height) // 2
    return left, top, left + crop_width, top + crop_height


class Preprocessor:
    """Raw images or texts to model inputs, as the export manifest's `preprocess` says."""

    def __init__(self, spec: dict | None):
        self.spec = spec or {}
        self.kind = self.spec.get("kind")
        self.tokenizer = None
        if self.kind == "image" and self.spec.get("unsupported"):
            raise UsageError(f"this model's preprocessing ({self.spec['unsupported']}) is not implemented by tokenfuse; "
                             "preprocess the images yourself and run the model with tokenfuse.engines.load")
        if self.kind == "text":
            if not self.spec.get("tokenizer"):
                raise UsageError("this text model's manifest names no tokenizer directory; export it from a directory with one")
            from transformers import AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(self.spec["tokenizer"], local_files_only=True)

    def image(self, data: bytes) -> dict[str, np.ndarray]:
        from PIL import Image, UnidentifiedImageError

        try:
            picture = Image.open(io.BytesIO(data))
            kind = picture.format
            picture.load()
        except (UnidentifiedImageError, OSError, ValueError):
            raise ValueError("not a readable PNG or JPEG image")
        if kind not in ("PNG", "JPEG"):
            raise ValueError(f"{kind} images are not accepted; send PNG or JPEG")
        return {"pixel_values": self.pixels(picture)[None]}

    def pixels(self, picture) -> np.ndarray:
        """A PIL image to the model's [channels, height, width] float32 input."""
        from PIL import Image

        spec = self.spec
        picture = picture.convert("L" if len(spec["mean"]) == 1 else "RGB")
        if spec.get("resize"):
            resample = Image.Resampling[spec["interpolation"].upper()]
            target = resized_size(*picture.size, spec["resize"])
            if target != picture.size:
                picture = picture.resize(target, resample)
        if spec.get("crop"):
            picture = picture.crop(crop_box(*picture.size, spec["crop"], spec.get("crop_offset", "floor")))
        height, width = spec["size"]
        if picture.size != (width, height):
            raise ValueError(f"preprocessing gives {picture.size[0]}x{picture.size[1]} pixels, the model takes {width}x{height}")
        array = np.asarray(picture, dtype=np.float32).reshape(height, width, -1) * np.float32(spec.get("rescale", 1 / 255))
        array = (array - np.array(spec["mean"], np.float32)) / np.array(spec["std"], np.float32)
        return array.transpose(2, 0, 1).astype(np.float32)

    def text(self, text: str) -> dict[str, np.ndarray]:
        """One text as [1, length] ids and mask, cut at the model's length and padded to it (not
        padded for a length-adaptive model, whose runner pads each bucket)."""
        padding = "do_not_pad" if self.spec.get("length_adaptive") else "max_length"
        encoded = self.tokenizer(text, padding=padding, truncation=True, max_length=self.spec["seq_len"], return_tensors="np")
        return {"input_ids": encoded["input_ids"].astype(np.int64), "attention_mask": encoded["attention_mask"].astype(np.int64)}
