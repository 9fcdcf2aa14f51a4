"""Model adapters: one way to name a model (`timm:NAME`, `hf:PATH`), one way to create it.

An adapter is thin: it says how a family embeds its inputs, exposes each block as a BlockView and
turns the final tokens into outputs. The merge logic lives in `encoder` and `methods`.
"""

from __future__ import annotations

import copy
import importlib
import pkgutil
from dataclasses import dataclass
from pathlib import Path

import torch

from ..budgets import Shape
from ..encoder import BlockView, MergeSettings, TokenState, run_encoder
from ..errors import UsageError

def _hf_size(size, square: bool) -> dict | None:
    """A Hugging Face size entry as a dict: legacy integers mean a square when `square`, else the
    shortest edge (as ViTImageProcessor and CLIPImageProcessor read them)."""
    if size is None or isinstance(size, dict):
        return {k: v for k, v in (size or {}).items() if v is not None} or None
    return {"height": size, "width": size} if square else {"shortest_edge": size}


def _resample_name(resample: int) -> str:
    """PIL's resampling filter number (as Hugging Face stores it) to its name."""
    from PIL import Image

    return Image.Resampling(resample).name.lower()


def unsupported(what: str) -> UsageError:
    return UsageError(f"{what} is not supported; supported models: " + "; ".join(f.models.replace("`", "") for f in families()))


@dataclass(frozen=True)
class InputSpec:
    name: str
    shape: tuple  # "batch" marks the dynamic axis
    dtype: torch.dtype


class Adapter:
    """How tokenfuse runs one model family. A subclass that sets `family` is one (registered as
    it is defined); `models`, `description` and `output_names` make its row of the supported-model
    table, which the README shows and the error for an unsupported model lists."""

    family = ""
    models = ""  # how its models are named (`--model`), in Markdown
    description = ""  # {docs} stands for the docs folder in links
    output_names = ""
    metric = "keys"  # what similarity is measured on, by default
    prop_attn = True  # proportional attention by default (off for MAE-style models)
    pooling = None  # a text encoder's `embedding` pooling (pooling.Pooling), recorded in the manifest

    def __init__(self, model: torch.nn.Module, name: str):
        self.model = model
        self.name = name

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "family" in cls.__dict__:
            _FAMILIES.append(cls)

    # --- described by each family ---
    protected: int = 1

    @classmethod
    def accepts(cls, model: torch.nn.Module) -> bool:
        raise NotImplementedError

    @classmethod
    def from_config(cls, path: str, config, seq_len: int | None, tower: str) -> "Adapter | None":
        """The adapter for a Hugging Face directory that this family recognises by its config
        (CLIP's towers); None: families are recognised by the modules a model has."""
        return None

    @classmethod
    def wrap(cls, model: torch.nn.Module) -> "Adapter":
        return cls(model, type(model).__name__)

    def shape(self) -> Shape:
        raise NotImplementedError

    def views(self) -> list[BlockView]:
        raise NotImplementedError

    def input_specs(self) -> list[InputSpec]:
        raise NotImplementedError

    def random_inputs(self, batch: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def natural_inputs(self, batch: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Inputs with the statistics of real ones (validation checks its gates where users are)."""
        raise NotImplementedError

    def embed(self, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, TokenState]:
        raise NotImplementedError

    def outputs(self, x: torch.Tensor, state: TokenState) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def preprocess(self) -> dict:
        """How raw inputs become model inputs (recorded in the manifest for serving)."""
        raise NotImplementedError

    # --- shared ---
    @property
    def directory(self) -> Path | None:
        """The local directory of an hf: model."""
        return Path(self.name[3:]) if self.name.startswith("hf:") else None

    def hf_preprocess(self, kind: str, default_mean, default_std, defaults: dict | None = None) -> dict:
        """Image or text preprocessing from the model directory's processor files.

        Images follow the directory's preprocessor_config.json as the Hugging Face image processors
        do (do_resize, size as shortest_edge or height/width, do_center_crop and crop_size,
        resample, rescale_factor, image_mean/std); where it is missing, `defaults` (the same keys)
        or ViTImageProcessor's defaults at the model's input size (squash, bilinear)."""
        import json

        if kind == "text":
            has_tokenizer = self.directory is not None and any(
                (self.directory / f).is_file() for f in ("tokenizer.json", "vocab.txt", "vocab.json")
            )
            return {"kind": "text", "tokenizer": str(self.directory) if has_tokenizer else None, "seq_len": self.shape().tokens}
        config_file = self.directory / "preprocessor_config.json" if self.directory else None
        height, width = self.input_specs()[0].shape[2:]
        processor = {"size": {"height": height, "width": width}, "resample": 2, **(defaults or {})}
        if config_file and config_file.is_file():
            processor.update(json.loads(config_file.read_text()))
        crop = _hf_size(processor.get("crop_size"), square=True) if processor.get("do_center_crop") else None
        resize = _hf_size(processor.get("size"), square=crop is None) if processor.get("do_resize", True) else None
        spec = {
            "kind": "image",
            "size": [height, width],
            "resize": resize,
            "crop": [crop["height"], crop["width"]] if crop else None,
            "crop_offset": "floor",
            "interpolation": _resample_name(processor.get("resample", 2)),
            "rescale": processor.get("rescale_factor", 1 / 255) if processor.get("do_rescale", True) else 1.0,
            "mean": list(processor.get("image_mean", default_mean))[: self.channels],
            "std": list(processor.get("image_std", default_std))[: self.channels],
        }
        if not processor.get("do_normalize", True):
            spec["mean"], spec["std"] = [0.0] * self.channels, [1.0] * self.channels
        if resize is not None and not ({"shortest_edge"} == set(resize) or {"height", "width"} == set(resize)):
            spec["unsupported"] = f"Hugging Face size {processor.get('size')}"
        return spec

    @property
    def is_text(self) -> bool:
        return any(spec.dtype == torch.int64 for spec in self.input_specs())

    def bind(self, *args, **kwargs) -> dict[str, torch.Tensor]:
        """Inputs by name from a forward call (for patched PyTorch models)."""
        names = [spec.name for spec in self.input_specs()]
        inputs = dict(zip(names, args))
        inputs.update({k: v for k, v in kwargs.items() if k in names and v is not None})
        if "attention_mask" in names and "attention_mask" not in inputs:
            inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
        missing = [n for n in names if n not in inputs]
        if missing:
            raise UsageError(f"{self.name}: missing input(s) {', '.join(missing)}")
        return inputs

    def for_inputs(self, inputs: dict[str, torch.Tensor]) -> "Adapter":
        """This adapter, sized for `inputs` (text models take any length in PyTorch)."""
        for spec in self.input_specs():
            got = tuple(inputs[spec.name].shape[1:])
            if got != tuple(spec.shape[1:]):
                raise UsageError(f"{self.name}: input {spec.name} has shape [B, {', '.join(map(str, got))}], expected {list(spec.shape)}")
        return self

    def patched_result(self, outputs: dict[str, torch.Tensor]):
        """What a patched model's forward returns: the family's usual result."""
        return outputs

    def run(self, settings: MergeSettings, inputs: dict[str, torch.Tensor], replay=None):
        """Outputs (an ordered dict) and the final TokenState, which holds each layer's merge slots.

        `replay` (one dst_slot per merging layer) applies given merge decisions instead of deciding.
        """
        dtype = next(self.model.parameters()).dtype
        inputs = {k: v.to(dtype) if v.is_floating_point() else v for k, v in inputs.items()}
        x, state = self.embed(inputs)
        state.replay = replay
        x = run_encoder(self.views(), x, state, settings)
        outputs = self.outputs(x, state)
        # inputs and outputs stay fp32 whatever the model computes in
        return {k: v.float() if v.is_floating_point() else v for k, v in outputs.items()}, state


class ImageAdapter(Adapter):
    """Vision encoders: `pixel_values` [batch, channels, height, width]."""

    image_size: tuple[int, int]
    channels: int = 3

    def input_specs(self):
        return [InputSpec("pixel_values", ("batch", self.channels, *self.image_size), torch.float32)]

    def random_inputs(self, batch, generator):
        return {"pixel_values": torch.randn(batch, self.channels, *self.image_size, generator=generator)}

    def natural_inputs(self, batch, generator):
        """Photograph-like pixels, normalised as the model's preprocessing does: a 1/f amplitude
        spectrum (smooth areas and edges at every scale), correlated channels and, in every other
        image, a flat region (sky, a wall, a studio background) whose patches are identical."""
        pixels = natural_pixels(batch, self.channels, self.image_size, generator)
        spec = self.preprocess()
        mean = torch.tensor(spec.get("mean") or [0.5] * self.channels).view(1, -1, 1, 1)
        std = torch.tensor(spec.get("std") or [0.5] * self.channels).view(1, -1, 1, 1)
        return {"pixel_values": (pixels - mean) / std}


class TextAdapter(Adapter):
    """Text encoders: exported at fixed sequence lengths (one, or one per length bucket), any
    length when patched in PyTorch."""

    seq_len: int
    length_limit: int  # the most positions the model has
    length_adaptive = True  # exported as length buckets unless a --seq-len is given

    def set_seq_len(self, seq_len: int | None, default: int, limit: int):
        self.length_limit = limit
        self.seq_len = self.checked_length(seq_len or default, "--seq-len")

    def checked_length(self, length: int, flag: str) -> int:
        if not 2 <= length <= self.length_limit:
            raise UsageError(f"{flag} {length} must be in [2, {self.length_limit}] for {self.name}")
        return length

    @property
    def max_seq_len(self) -> int:
        """The longest input the model is used at: sentence-transformers' max_seq_length where the
        directory has one (what its users truncate to), else every position the model has."""
        import json

        config = self.directory / "sentence_bert_config.json" if self.directory else None
        if config and config.is_file():
            return min(self.length_limit, int(json.loads(config.read_text()).get("max_seq_length") or self.length_limit))
        return self.length_limit

    def with_seq_len(self, length: int) -> "TextAdapter":
        """The same model at another (static) sequence length; the weights are shared."""
        sized = copy.copy(self)
        sized.seq_len = length
        return sized

    def for_inputs(self, inputs):
        return self.with_seq_len(inputs["input_ids"].shape[1])

    def input_specs(self):
        return text_spec(self.seq_len)

    def natural_inputs(self, batch, generator):
        """Token ids as the model's tokenizer gives them: its special tokens around a body of
        vocabulary ids drawn with Zipf's law (frequent ids first, as WordPiece and BPE vocabularies
        roughly are), lengths log-uniform from a 3-token query to the full length, then padding."""
        vocab = self.vocabulary()
        body = vocab.body_ids[_zipf(len(vocab.body_ids), (batch, self.seq_len), generator)]
        room = self.seq_len - len(vocab.prefix) - len(vocab.suffix)
        low, high = torch.tensor(float(min(3, room))).log(), torch.tensor(float(room)).log()
        lengths = (low + (high - low) * torch.rand(batch, generator=generator)).exp().round().to(torch.int64)
        ids = torch.full((batch, self.seq_len), vocab.pad_id, dtype=torch.int64)
        mask = torch.zeros(batch, self.seq_len, dtype=torch.int64)
        for row, length in enumerate(lengths.tolist()):
            tokens = torch.tensor([*vocab.prefix, *body[row, :length].tolist(), *vocab.suffix], dtype=torch.int64)
            ids[row, : len(tokens)], mask[row, : len(tokens)] = tokens, 1
        return {"input_ids": ids, "attention_mask": mask}

    def vocabulary(self) -> "Vocabulary":
        """The tokenizer's special tokens and ordinary ids (from the model's config without one)."""
        if getattr(self, "_vocabulary", None) is None:
            self._vocabulary = Vocabulary.of(self.directory, self.model.config)
        return self._vocabulary


@dataclass
class Vocabulary:
    prefix: list[int]  # special ids before the text ([CLS], <s>, <|startoftext|>)
    suffix: list[int]  # and after it ([SEP], </s>, <|endoftext|>)
    pad_id: int
    body_ids: torch.Tensor  # ordinary tokens, in vocabulary order

    @classmethod
    def of(cls, directory: Path | None, config) -> "Vocabulary":
        tokenizer = None
        if directory is not None and any((directory / f).exists() for f in ("tokenizer.json", "vocab.txt", "vocab.json")):
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
        if tokenizer is None:
            specials = {getattr(config, k, None) for k in ("pad_token_id", "bos_token_id", "eos_token_id", "cls_token_id", "sep_token_id")}
            first, last = getattr(config, "bos_token_id", None), getattr(config, "eos_token_id", None)
            prefix, suffix = ([i for i in (e,) if i is not None and i < config.vocab_size] for e in (first, last))
            pad = getattr(config, "pad_token_id", None)
            body = [i for i in range(config.vocab_size) if i not in specials]
            return cls(prefix, suffix, 0 if pad is None else pad, torch.tensor(body))
        framed = tokenizer("a")["input_ids"]
        text = tokenizer("a", add_special_tokens=False)["input_ids"]
        at = next(i for i in range(len(framed)) if framed[i:i + len(text)] == text)
        special = set(tokenizer.all_special_ids)
        pieces = tokenizer.convert_ids_to_tokens(list(range(config.vocab_size)))
        body = [i for i, piece in enumerate(pieces) if piece is not None and i not in special and not _unused(piece)]
        body = body or [i for i in range(config.vocab_size) if i not in special]  # a tokenizer that knows only its specials
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        return cls(framed[:at], framed[at + len(text):], pad, torch.tensor(body))


def _unused(piece: str) -> bool:
    """Entries rare in text: placeholders ([unused12], <unused3>, <extra_id_0>) and lone non-ASCII characters."""
    return piece.startswith(("[unused", "<unused", "<extra_id")) or (len(piece) == 1 and not piece.isascii())


def _zipf(size: int, shape, generator: torch.Generator) -> torch.Tensor:
    """Ranks in [0, size) drawn with probability proportional to 1 / (rank + 10)."""
    weights = 1.0 / (torch.arange(size, dtype=torch.float64) + 10.0)
    return torch.multinomial(weights, int(torch.tensor(shape).prod()), replacement=True, generator=generator).view(shape)


def natural_pixels(batch: int, channels: int, size: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """[batch, channels, H, W] in [0, 1]: see ImageAdapter.natural_inputs."""
    height, width = size
    fy, fx = torch.fft.fftfreq(height).view(-1, 1), torch.fft.rfftfreq(width).view(1, -1)
    amplitude = 1.0 / (fx**2 + fy**2).sqrt().clamp(min=1.0 / max(height, width))
    shape = (batch, channels + 1, height, width // 2 + 1)
    spectrum = torch.complex(torch.randn(shape, generator=generator), torch.randn(shape, generator=generator)) * amplitude
    fields = torch.fft.irfft2(spectrum, s=(height, width))
    pixels = fields[:, :1] + 0.3 * fields[:, 1:]  # a shared luminance with weaker colour
    flat = pixels.flatten(1)
    low, high = (flat.quantile(q, dim=1).view(-1, 1, 1, 1) for q in (0.02, 0.98))
    pixels = ((pixels - low) / (high - low)).clamp(0.0, 1.0)  # contrast as a camera's exposure gives it
    for image in range(0, batch, 2):
        rows = int(torch.randint(height // 4, height // 2 + 1, (1,), generator=generator))
        pixels[image, :, :rows] = pixels[image, :, :rows].mean((1, 2), keepdim=True)  # a flat top band
    return pixels


_FAMILIES: list[type[Adapter]] = []


def families() -> tuple[type[Adapter], ...]:
    """Every model family, timm's first, then images, then texts. Each module of this package
    defines its own, so a new family is a new module and nothing else."""
    for module in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{module.name}")
    return tuple(sorted(_FAMILIES, key=lambda f: (not f.family.startswith("timm"), issubclass(f, TextAdapter), f.__module__, _FAMILIES.index(f))))


def family_of(model: torch.nn.Module) -> type[Adapter] | None:
    """The family that accepts `model`; of a family and its subclass that both do, the subclass."""
    accepting = [f for f in families() if f.accepts(model)]
    return next((f for f in accepting if not any(g is not f and issubclass(g, f) for g in accepting)), None)


def adapter_for(model: torch.nn.Module) -> Adapter:
    """The adapter for an already-built PyTorch model (used by `patch`)."""
    family = family_of(model)
    if family is None:
        raise unsupported(type(model).__name__)
    return family.wrap(model)


def supported_models_table(docs: str = "docs/") -> str:
    """The supported-model table in Markdown, links into the docs folder at `docs`."""
    rows = ["| `--model` | family | outputs |", "|---|---|---|"]
    rows += [f"| {f.models} | {f.description.format(docs=docs)} | {f.output_names} |" for f in families()]
    return "\n".join(rows)


def has_modules(model: torch.nn.Module, *paths: str) -> bool:
    """Whether `model` has a submodule at each dotted path."""
    try:
        for path in paths:
            model.get_submodule(path)
    except AttributeError:
        return False
    return True


def random_text(batch: int, seq_len: int, vocab: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Random token ids with random real lengths (at least 2) and zero padding after them."""
    ids = torch.randint(1, vocab, (batch, seq_len), generator=generator)
    lengths = torch.randint(2, seq_len + 1, (batch, 1), generator=generator)
    mask = (torch.arange(seq_len) < lengths).to(torch.int64)
    return {"input_ids": ids * mask, "attention_mask": mask}


def text_spec(seq_len: int) -> list[InputSpec]:
    return [
        InputSpec("input_ids", ("batch", seq_len), torch.int64),
        InputSpec("attention_mask", ("batch", seq_len), torch.int64),
    ]


def attention_view(q, k, v, out, heads: int, mlp, pre_norm=None, post_attn_norm=None, post_mlp_norm=None, position_bias=None):
    """A BlockView from separate q/k/v/output projections (Hugging Face style)."""
    from ..encoder import split_heads

    def qkv(h):
        return split_heads(q(h), heads), split_heads(k(h), heads), split_heads(v(h), heads)

    return BlockView(qkv=qkv, attn_out=out, mlp=mlp, pre_norm=pre_norm, post_attn_norm=post_attn_norm,
                     post_mlp_norm=post_mlp_norm, position_bias=position_bias)


def load_state_dict(path: str) -> dict:
    file = Path(path)
    if not file.is_file():
        raise UsageError(f"--weights {path}: no such file")
    try:
        if file.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(file))
        state = torch.load(str(file), map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt or foreign file
        raise UsageError(f"--weights {path}: cannot read a state dict ({type(exc).__name__}); give a .pth/.pt/.safetensors state dict")
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise UsageError(f"--weights {path}: the file holds no state dict")
    return state


def load_model(spec: str, *, weights: str | None = None, random_init: bool = False, seq_len: int | None = None,
               tower: str = "vision") -> Adapter:
    """Create the adapter for a model named `timm:NAME` (timm's pretrained weights, unless `weights`
    or `random_init`) or `hf:PATH` (a local directory or a Hugging Face hub id ORG/NAME)."""
    from ..sources import check_weight_choice, hf_directory

    check_weight_choice(weights, random_init)
    prefix, _, rest = spec.partition(":")
    if not rest:
        raise UsageError(f"--model {spec!r}: name it timm:NAME or hf:PATH")
    if prefix == "timm":
        from .timm_vit import load_timm

        adapter = load_timm(rest, weights, random_init)
    elif prefix == "hf":
        if weights or random_init:
            raise UsageError(f"--{'weights' if weights else 'random-init'} is for timm models; an hf: model carries its own weights")
        adapter = load_hf(str(hf_directory(rest)), seq_len=seq_len, tower=tower)
    else:
        raise UsageError(f"--model {spec!r}: unknown source {prefix!r}; use timm:NAME or hf:PATH")
    adapter.model.float().eval()
    return adapter


def load_hf(path: str, *, seq_len: int | None, tower: str) -> Adapter:
    if not Path(path, "config.json").is_file():
        raise UsageError(f"hf:{path}: not a Hugging Face model directory (no config.json); give a local model directory or a hub id ORG/NAME")
    from transformers import AutoConfig
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()  # one line per step is ours to print

    config = AutoConfig.from_pretrained(path, local_files_only=True)
    kind = config.model_type
    for family in families():
        adapter = family.from_config(path, config, seq_len, tower)
        if adapter is not None:
            return adapter
    if tower != "vision":
        raise UsageError(f"--tower {tower}: the tower choice applies to CLIP models only, hf:{path} is {kind!r}")
    return load_by_structure(path, config, seq_len)


def load_by_structure(path: str, config, seq_len: int | None) -> Adapter:
    """The saved image classifier when the directory holds one (its head is supported), else the
    base model; the family is picked on a weightless copy, so unsupported models load nothing."""
    import transformers

    classifiers = [a for a in config.architectures or [] if "ImageClassification" in a and hasattr(transformers, a)]
    cls = getattr(transformers, classifiers[0]) if classifiers else transformers.AutoModel
    try:
        with torch.device("meta"):
            skeleton = cls(config) if classifiers else cls.from_config(config)
    except ValueError:  # a config AutoModel has no class for
        raise unsupported(f"hf:{path} (model_type {config.model_type!r})") from None
    family = family_of(skeleton)
    if family is None:
        raise unsupported(f"hf:{path} ({type(skeleton).__name__})")
    try:
        model = cls.from_pretrained(path, local_files_only=True, attn_implementation="eager")
    except OSError as exc:
        raise UsageError(f"hf:{path}: cannot load the weights ({str(exc).strip().splitlines()[0]})") from None
    name = f"hf:{path}"
    return family(model, name, seq_len) if issubclass(family, TextAdapter) else family(model, name)
