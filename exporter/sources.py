"""Where a model's weights come from: timm's pretrained weights, a Hugging Face hub id or a local
directory, a --weights file, or explicitly random weights.

Hub downloads go through huggingface_hub, so its cache (HF_HUB_CACHE) is read first and its
offline switch (HF_HUB_OFFLINE=1) is honoured; a missing download is a one-line error that says
how to get the model without the network.
"""

from __future__ import annotations

import re
from pathlib import Path

from .errors import UsageError

# hub id: ORG/NAME, as the Hub spells repository names
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")
# what a model directory needs from a hub repository (not its ONNX/OpenVINO/other-framework copies)
HUB_FILES = ["*.json", "*.txt", "*.model", "*.safetensors", "pytorch_model*.bin"]


def check_weight_choice(weights: str | None, random_init: bool):
    if weights and random_init:
        raise UsageError("--weights and --random-init exclude each other: give a state dict, or ask for random weights")


def _unavailable(error: Exception) -> str:
    from huggingface_hub import constants

    reason = "offline, HF_HUB_OFFLINE=1" if constants.HF_HUB_OFFLINE else type(error).__name__
    return f"not in the Hugging Face cache {constants.HF_HUB_CACHE} and cannot be downloaded ({reason})"


def _download_errors() -> tuple[type[Exception], ...]:
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled

    # OSError covers a failed connection and urllib's URLError (timm's URL-hosted weights)
    return LocalEntryNotFoundError, OfflineModeIsEnabled, HfHubHTTPError, OSError


def hf_directory(name: str) -> Path:
    """A local directory as given, else the hub id's snapshot (from the cache, or downloaded)."""
    if Path(name).is_dir() or not HUB_ID.match(name):
        return Path(name)
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(name, allow_patterns=HUB_FILES))
    except _download_errors() as exc:
        raise UsageError(
            f"hf:{name}: no local directory {name!r}, and the hub model {name} is {_unavailable(exc)}; "
            f"download it once online (hf download {name}) or name a local directory hf:DIR"
        )


def load_timm_pretrained(name: str, model):
    """timm's own pretrained model for `name` (as timm.create_model(name, pretrained=True)), after
    `model` (the same architecture, random) passed the support check, so nothing unsupported downloads."""
    import timm
    from timm.models._builder import _resolve_pretrained_source

    source, location = _resolve_pretrained_source(model.pretrained_cfg or {})
    if not source:
        raise UsageError(f"timm:{name}: timm has no pretrained weights for this model; pass --weights FILE or --random-init")
    try:
        return timm.create_model(name, pretrained=True)
    except _download_errors() as exc:
        where = location[0] if isinstance(location, tuple) else location
        raise UsageError(
            f"timm:{name}: its pretrained weights ({where}) are {_unavailable(exc)}; "
            "download them once online, or pass --weights FILE (a state dict) or --random-init (random weights)"
        )
