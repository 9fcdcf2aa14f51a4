"""`tokenfuse show`: which input patches or words each remaining token stands for, layer by layer.

The merge decisions are the ones the exported model makes: the model runs with the settings from
its manifest (or the same options as export), each merging layer records its TokenMerge slots,
and composing them layer by layer maps every input token to the token that holds it.
"""

from __future__ import annotations

import html
from pathlib import Path

import numpy as np
import torch

from ..exporter.errors import UsageError
from ..exporter.files import atomic_outputs
from ..exporter.manifest import Manifest
from ..exporter.registry import all_knobs
from ..exporter.settings import MergeOptions
from .preprocess import Preprocessor

MANIFEST_OPTIONS = ("min_tokens", "metric")  # and every method knob (the registry's)


def options_from_manifest(manifest: Manifest) -> tuple[dict, dict]:
    """(how to load the model, MergeOptions fields) as an export manifest records them."""
    settings = manifest.settings
    load = {"weights": settings.get("weights"), "random_init": settings.get("random_init", False), "seq_len": settings.get("seq_len") or settings.get("max_seq_len"), "tower": settings.get("tower", "vision")}
    options = {key: settings[key] for key in (*MANIFEST_OPTIONS, *all_knobs()) if key in settings}
    options.update(method=manifest.method, r=settings.get("r"), prop_attn=settings.get("proportional_attention"))
    if settings.get("requested_schedule"):
        options["schedule"] = tuple(settings["requested_schedule"])
    return load, options



def layer_maps(slots: list[torch.Tensor], schedule: tuple[int, ...], tokens: int) -> list[torch.Tensor]:
    """For each layer, the token each input token belongs to after it ([B, N0] per layer).

    `slots` holds one dst_slot per merging layer (in order), as TokenState.slots records them."""
    merging = iter(slots)
    batch = slots[0].shape[0] if slots else 1
    current, maps, n = None, [], tokens
    for n_out in schedule:
        if n_out < n:
            dst = next(merging)
            current = dst if current is None else dst.gather(-1, current)
        maps.append(current if current is not None else torch.arange(tokens).expand(batch, tokens))
        n = n_out
    return maps


def token_maps(adapter, settings, inputs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """Run the model with `settings` and map every input token to its token after each layer."""
    with torch.no_grad():
        _, state = adapter.run(settings, inputs)
    return layer_maps(state.slots, settings.schedule, adapter.shape().tokens)


def default_layers(schedule: tuple[int, ...], tokens: int, count: int = 4) -> list[int]:
    """Up to `count` merging layers, evenly spread, always the last."""
    previous = (tokens,) + tuple(schedule[:-1])
    merging = [layer for layer, (n_in, n_out) in enumerate(zip(previous, schedule)) if n_out < n_in]
    if len(merging) <= count:
        return merging
    picks = np.linspace(0, len(merging) - 1, count).round().astype(int)
    return [merging[i] for i in picks]


def palette(count: int) -> np.ndarray:
    """Distinct-looking colours, the same for every run."""
    return np.random.default_rng(0).uniform(0.15, 0.95, (max(count, 1), 3))


def show(model, source, output: str | Path, *, layers: list[int] | None = None, manifest: dict | None = None,
         weights=None, random_init: bool = False, seq_len=None, tower: str = "vision", **options) -> dict:
    """Draw what merged into what for one image (PNG) or text (HTML or PNG); returns the maps.

    `model` is a spec or an Adapter; `source` an image file (a Path) or a text (a str). Settings come from
    `manifest` when given (its model is loaded unless an Adapter is passed), else from `options`.
    """
    from ..exporter import load_model

    output = Path(output)
    if manifest is not None:
        manifest = manifest if isinstance(manifest, Manifest) else Manifest.from_json(manifest)
        load, options = options_from_manifest(manifest)
        weights, random_init, seq_len, tower = load["weights"], load["random_init"], load["seq_len"], load["tower"]
        model = manifest.model if model is None else model
    if model is None:
        raise UsageError("give --model or --manifest")
    if output.suffix not in (".png", ".html"):
        raise UsageError(f"-o {output}: write a .png (image or text) or an .html (text)")
    image = _read_image(source) if isinstance(source, Path) else None
    adapter = load_model(model, weights=weights, random_init=random_init, seq_len=seq_len, tower=tower) if isinstance(model, str) else model
    settings, _ = MergeOptions(**options).resolve(adapter)
    if manifest is not None and list(settings.schedule) != list(manifest.schedule):
        raise UsageError("the manifest's schedule differs from what its settings give this model; export it again with this tokenfuse")
    preprocess = adapter.preprocess()
    prep = Preprocessor(preprocess)
    if (image is None) != (preprocess["kind"] == "text"):
        raise UsageError(f"{adapter.name} takes {preprocess['kind']} input; give --{'image' if image is None else 'text'}")
    if image is not None:
        if output.suffix != ".png":
            raise UsageError(f"-o {output}: an image is drawn as a .png")
        try:
            feeds = prep.image(image)
        except ValueError as exc:
            raise UsageError(f"--image {source}: {exc}")
    else:
        feeds = prep.text(source)
    inputs = {name: torch.from_numpy(value) for name, value in feeds.items()}
    maps = token_maps(adapter, settings, inputs)
    layers = default_layers(settings.schedule, adapter.shape().tokens) if layers is None else layers
    bad = [layer for layer in layers if not 0 <= layer < len(maps)]
    if bad or not layers:
        raise UsageError(f"--layers {bad or layers}: give layers 0..{len(maps) - 1}" + ("" if layers else "; this model merges in no layer"))
    chosen = {layer: maps[layer][0].numpy() for layer in layers}
    with atomic_outputs(output) as (temp,):
        if preprocess["kind"] == "image":
            draw_image(feeds["pixel_values"][0], preprocess, chosen, settings.protected, temp, adapter.name, settings.method.name)
        else:
            words = prep.tokenizer.convert_ids_to_tokens(feeds["input_ids"][0].tolist())
            real = int(feeds["attention_mask"][0].sum())
            if output.suffix == ".html":
                temp.write_text(text_html(words[:real], chosen, adapter.name, settings.method.name))
            else:
                draw_text(words[:real], chosen, temp, adapter.name, settings.method.name)
    return {"layers": layers, "maps": chosen, "schedule": list(settings.schedule), "protected": settings.protected}


def _read_image(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise UsageError(f"--image {path}: cannot read it ({exc.strerror})")


def patch_grid(labels: np.ndarray, protected: int, height: int, width: int) -> np.ndarray:
    """The patch tokens' labels as the [rows, cols] grid of the image."""
    patches = labels[protected:]
    rows = int(round((len(patches) * height / width) ** 0.5))
    if rows == 0 or len(patches) % rows:
        raise UsageError(f"{len(patches)} patch tokens do not form a grid for a {height}x{width} image")
    return patches.reshape(rows, -1)


def colour_patches(image: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """The image with each merged token's patches in its own colour and borders between tokens;
    a token that stands for one patch stays as it is."""
    height, width = image.shape[:2]
    cell = (height // grid.shape[0], width // grid.shape[1])
    labels = np.kron(grid, np.ones(cell, dtype=grid.dtype))
    members = np.bincount(grid.ravel())
    colours = palette(len(members))
    merged = members[labels] > 1
    out = image.copy()
    out[merged] = 0.45 * out[merged] + 0.55 * colours[labels[merged]]
    edge = np.zeros(labels.shape, bool)
    edge[:, 1:] |= labels[:, 1:] != labels[:, :-1]
    edge[1:, :] |= labels[1:, :] != labels[:-1, :]
    out[edge] = 0.1
    return out


def draw_image(pixels: np.ndarray, preprocess: dict, maps: dict, protected: int, path: Path, name: str, method: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mean, std = np.array(preprocess["mean"]), np.array(preprocess["std"])
    image = np.clip(pixels.transpose(1, 2, 0) * std + mean, 0, 1)
    image = np.repeat(image, 3, axis=2) if image.shape[2] == 1 else image
    scale = max(1, 224 // image.shape[0])  # draw small images large enough to see the borders
    image = np.kron(image, np.ones((scale, scale, 1)))
    fig, axes = plt.subplots(1, len(maps) + 1, figsize=(2.6 * (len(maps) + 1), 3.0))
    axes[0].imshow(image)
    axes[0].set_title("input", fontsize=9)
    for ax, (layer, labels) in zip(axes[1:], maps.items()):
        grid = patch_grid(labels, protected, *image.shape[:2])
        ax.imshow(colour_patches(image, grid))
        kept = len(np.unique(grid))
        ax.set_title(f"after layer {layer}: {kept} patch tokens", fontsize=9)
    for ax in axes:
        ax.axis("off")
    fig.suptitle(f"{Path(name).name}, {method}: patches of one token in one colour", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)


def word_groups(words: list[str], labels: np.ndarray) -> dict[int, list[int]]:
    """Token -> the positions of the real words it holds."""
    groups: dict[int, list[int]] = {}
    for position in range(len(words)):
        groups.setdefault(int(labels[position]), []).append(position)
    return groups


def _hex(colour) -> str:
    return "#" + "".join(f"{int(c * 255):02x}" for c in colour)


def text_html(words: list[str], maps: dict, name: str, method: str) -> str:
    parts = ["<!doctype html><meta charset='utf-8'><title>tokenfuse show</title><body style='font-family:sans-serif'>",
             f"<h3>{html.escape(Path(name).name)}, {html.escape(method)}: words of one token in one colour</h3>"]
    for layer, labels in maps.items():
        groups = word_groups(words, labels)
        colours = palette(int(labels.max()) + 1)
        parts.append(f"<h4>after layer {layer}: {len(groups)} tokens hold the {len(words)} words</h4><p style='line-height:2'>")
        for position, word in enumerate(words):
            token = int(labels[position])
            style = f"background:{_hex(colours[token])};" if len(groups[token]) > 1 else ""
            parts.append(f"<span title='token {token}' style='{style}padding:2px;margin:1px;border:1px solid #999'>{html.escape(word)}</span>")
        parts.append("</p><ul>")
        for token, members in sorted(groups.items()):
            if len(members) > 1:
                parts.append(f"<li>token {token}: {html.escape(' + '.join(words[i] for i in members))}</li>")
        parts.append("</ul>")
    parts.append("</body>")
    return "\n".join(parts)


def draw_text(words: list[str], maps: dict, path: Path, name: str, method: str, per_line: int = 90):
    """The words of each layer as boxes, one colour per merged token, wrapped at `per_line` characters."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = []  # (layer, [(word, token, merged)]) per line
    for layer, labels in maps.items():
        groups = word_groups(words, labels)
        line, width = [], 0
        for position, word in enumerate(words):
            token = int(labels[position])
            if width + len(word) + 1 > per_line and line:
                rows.append((layer, line))
                line, width = [], 0
            line.append((word, token, len(groups[token]) > 1))
            width += len(word) + 1
        rows.append((layer, line))
    fig, ax = plt.subplots(figsize=(per_line * 0.095, 0.34 * (len(rows) + 2 * len(maps)) + 0.5))
    y, shown = 0, None
    for layer, line in rows:
        if layer != shown:
            y += 1.4
            kept = len(word_groups(words, maps[layer]))
            ax.text(0, -y, f"after layer {layer}: {kept} tokens hold the {len(words)} word pieces", fontsize=9, weight="bold", va="center")
            y += 1.1
            shown = layer
        colours = palette(int(maps[layer].max()) + 1)
        x = 0
        for word, token, merged in line:
            box = dict(facecolor=colours[token] if merged else "white", edgecolor="#999", pad=1.5)
            ax.text(x, -y, word, family="monospace", fontsize=8, va="center", bbox=box)
            x += len(word) + 1
        y += 1
    ax.set_xlim(-1, per_line + 1)
    ax.set_ylim(-y - 0.5, 0.5)
    ax.axis("off")
    ax.set_title(f"{Path(name).name}, {method}: words of one token in one colour", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)
