"""The user's own items (images or texts) as models take them, for tune and bench."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..exporter.errors import UsageError
from .batching import stack
from .preprocess import Preprocessor
from .runtime import put_rows

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}


@dataclass
class Dataset:
    """Raw items as the user has them: image bytes or texts, labels where given."""

    kind: str  # image | text
    items: list  # bytes (images) or str (texts)
    names: list[str]
    labels: list[str] | None = None


def read_data(path: str | Path) -> Dataset:
    """A folder of images (class subfolders give labels), a text file (one text per line, or
    fastText `__label__X text` lines) or JSONL (`text`, optional `label`)."""
    path = Path(path)
    if path.is_dir():
        return _read_images(path)
    if not path.is_file():
        raise UsageError(f"--data {path}: no such file or folder")
    text = _read_text(path)
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        raise UsageError(f"--data {path}: the file holds no texts; give one text per line, JSONL or a folder of images")
    if path.suffix == ".jsonl":
        return _read_jsonl(path, lines)
    if all(line.startswith("__label__") for line in lines):
        labels, texts = zip(*(line.split(None, 1) if " " in line.strip() else (line.strip(), "") for line in lines))
        return Dataset("text", [t.strip() for t in texts], [f"line {i + 1}" for i in range(len(lines))], [l[len("__label__"):] for l in labels])
    return Dataset("text", [line.strip() for line in lines], [f"line {i + 1}" for i in range(len(lines))])


def _read_text(path: Path) -> str:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise UsageError(f"--data {path}: cannot read it ({exc.strerror})")
    if b"\0" in data[:4096]:
        raise UsageError(f"--data {path}: a binary file; give a text file (one text per line), JSONL or a folder of images")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1")  # older corpora (e.g. gensim's pang_lee_polarity.cor)


def _read_jsonl(path: Path, lines: list[str]) -> Dataset:
    texts, labels = [], []
    for number, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UsageError(f"--data {path}: line {number} is not JSON ({exc.msg}); each line must be an object with 'text'")
        if not isinstance(row, dict) or not isinstance(row.get("text"), str):
            raise UsageError(f"--data {path}: line {number} has no string 'text'; each line must be an object with 'text' (and optionally 'label')")
        texts.append(row["text"])
        labels.append(None if row.get("label") is None else str(row["label"]))
    if any(label is None for label in labels) and not all(label is None for label in labels):
        missing = labels.index(None) + 1
        raise UsageError(f"--data {path}: line {missing} has no 'label' while others do; label every line or none")
    return Dataset("text", texts, [f"line {i + 1}" for i in range(len(texts))], None if labels[0] is None else labels)


def _read_images(folder: Path) -> Dataset:
    """Images directly in `folder` (no labels), or in one subfolder per class (ImageFolder)."""
    classes = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    files = [(p, None) for p in sorted(folder.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES]
    if classes and not files:
        files = [(p, c.name) for c in classes for p in sorted(c.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES]
    if not files:
        raise UsageError(f"--data {folder}: no PNG or JPEG images in it or in its class subfolders")
    items = []
    for file, _ in files:
        try:
            items.append(file.read_bytes())
        except OSError as exc:
            raise UsageError(f"--data {file}: cannot read it ({exc.strerror})")
    labels = [label for _, label in files]
    return Dataset("image", items, [str(f.relative_to(folder)) for f, _ in files], None if labels[0] is None else labels)


def model_inputs(data: Dataset, preprocess: dict) -> tuple[dict[str, np.ndarray], int]:
    """All items as one batch of model inputs (preprocessed once, as the manifest says; the texts of a
    length-adaptive model, each at its own bucket's width, zero-padded to the widest, as serve
    stacks them), and how many texts were cut at the model's sequence length."""
    if preprocess.get("kind") != data.kind:
        raise UsageError(f"the model takes {preprocess.get('kind')} input and --data holds {data.kind}s")
    prep = Preprocessor(preprocess)
    rows = []
    for name, item in zip(data.names, data.items):
        try:
            rows.append(prep.image(item) if data.kind == "image" else prep.text(item))
        except ValueError as exc:
            raise UsageError(f"--data: {name}: {exc}")
    truncated = 0
    if data.kind == "text":
        lengths = [len(ids) for ids in prep.tokenizer(data.items)["input_ids"]]
        truncated = sum(length > preprocess["seq_len"] for length in lengths)
    return {name: stack([row[name] for row in rows]) for name in rows[0]}, truncated


def run_batched(runner, feeds: dict[str, np.ndarray], batch: int) -> dict[str, np.ndarray]:
    """`feeds` through `runner` in batches of `batch`, the outputs put back together; per-token
    outputs zero-padded to the widest batch's (a length-adaptive model's batches differ in width)."""
    count = len(next(iter(feeds.values())))
    parts = [(np.arange(i, min(i + batch, count)), runner.run({k: v[i : i + batch] for k, v in feeds.items()})) for i in range(0, count, batch)]
    return put_rows(parts, count)
