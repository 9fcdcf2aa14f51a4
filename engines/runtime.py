"""One API to run a tokenfuse model: an .onnx through ONNX Runtime, an .engine through TensorRT.

    runner = tokenfuse.engines.load("vit.onnx")          # or "vit.engine"
    outputs = runner.run({"pixel_values": images})       # numpy or torch in, numpy out
"""

from __future__ import annotations

import json
import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..exporter.buckets import bucket_indices
from ..exporter.errors import UsageError
from ..exporter.manifest import Manifest
from .build import file_sha256, sidecar_path
from .dtypes import numpy_name
from .tensorrt import load_tensorrt

ORT_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")


def _numpy(value) -> np.ndarray:
    if hasattr(value, "detach"):  # torch tensor
        value = value.detach().cpu().numpy()
    return np.ascontiguousarray(value)


class Runner:
    """Named inputs in, named outputs out; `inputs`/`outputs` describe the bindings.

    A backend is a Runner subclass in BACKENDS: the files it runs (`suffixes`), its short name
    for `bench --backend`, its Triton platform and file name, what a file of it holds
    (`contents`, without opening it) and how much memory a call takes."""

    backend = ""  # its name in reports
    flag = ""  # bench --backend
    suffixes: tuple[str, ...] = ()
    triton_platform = ""  # also the platform in KServe v2 model metadata
    triton_file = ""  # the file's name in a Triton model repository
    inputs: list[dict]
    outputs: list[dict]
    manifest: Manifest | None  # the export manifest, where the file has one

    def run(self, feeds: dict) -> dict[str, np.ndarray]:
        raise NotImplementedError

    @classmethod
    def open(cls, path: Path, *, providers=None, plugins: str | None = None, threads: int | None = None, spin: bool = True,
             arena: bool = True) -> "Runner":
        """One graph or engine file (the options of another backend are ignored)."""
        raise NotImplementedError

    @classmethod
    def contents(cls, path: Path) -> "Contents":
        raise NotImplementedError

    def memory_probe(self, path: Path, threads: int | None) -> "Runner | None":
        """A runner whose calls allocate their own buffers, to measure one call's peak; None where
        the peak is known otherwise (`activation_mib`) or not measured at all (GPU providers)."""
        return None

    def activation_mib(self) -> float | None:
        """The memory one call takes, where the backend knows it (a TensorRT engine's activations)."""
        return None

    def check_feeds(self, feeds: dict) -> dict[str, np.ndarray]:
        arrays = {}
        for spec in self.inputs:
            if spec["name"] not in feeds:
                raise UsageError(f"missing input {spec['name']!r}; the model takes {', '.join(i['name'] for i in self.inputs)}")
            array = _numpy(feeds[spec["name"]])
            expected = spec["shape"][1:]
            if array.ndim != len(spec["shape"]) or any(e not in (-1, a) for a, e in zip(array.shape[1:], expected)):
                raise UsageError(f"input {spec['name']} has shape {list(array.shape)}, expected [batch, {', '.join(map(str, expected))}]")
            arrays[spec["name"]] = array.astype(spec["dtype"], copy=False)
        return arrays


@dataclass
class Contents:
    """What a model file holds, from its manifest or sidecars: one part per graph or engine (its
    file, bindings, bucket entry and engine sidecar) and, for a length-adaptive model, its buckets."""

    manifest: Manifest | None
    sidecar: dict | None  # the engine's sidecar (the top one of a length-adaptive model)
    parts: list[dict]
    buckets: list[dict] | None


class OrtRunner(Runner):
    backend, flag, suffixes = "onnxruntime", "ort", (".onnx",)
    triton_platform, triton_file = "onnxruntime_onnx", "model.onnx"

    def __init__(self, path: Path, providers=None, threads: int | None = None, arena: bool = True, spin: bool = True):
        import onnxruntime as ort

        available = ort.get_available_providers()
        chosen = [p for p in (providers or ORT_PROVIDERS) if p in available]
        if not chosen:
            raise UsageError(f"none of the providers {providers} is available; this onnxruntime has {available}")
        if providers and providers[0] not in available:
            raise UsageError(f"{providers[0]} is not in this onnxruntime (it has {', '.join(available)}); "
                             "for CUDA install onnxruntime-gpu (pip install 'tokenfuse[gpu]')")
        if "CUDAExecutionProvider" in chosen and hasattr(ort, "preload_dlls"):
            ort.preload_dlls()  # CUDA and cuDNN from their pip packages (as torch installs them), where the system has none
        options = ort.SessionOptions()
        options.log_severity_level = 3
        if threads:
            options.intra_op_num_threads = threads
        if not spin:  # idle threads sleep instead of spinning: the CPU goes to whatever else the process does
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        # Spin within a call, stop when it returns: another session's call (a bucket, the baseline
        # bench alternates with) then has the cores to itself.
        options.add_session_config_entry("session.force_spinning_stop", "1")
        if not arena:  # every call allocates and frees its own buffers (for measuring them)
            options.enable_cpu_mem_arena = False
            options.enable_mem_pattern = False
        try:
            self.session = ort.InferenceSession(str(path), options, providers=chosen)
        except Exception as exc:
            raise UsageError(f"{path}: ONNX Runtime cannot load it ({str(exc).splitlines()[0][:200]})")
        self.providers = self.session.get_providers()
        if providers and providers[0] not in self.providers:
            raise UsageError(f"{providers[0]} did not load (ONNX Runtime fell back to {self.providers[0]}); "
                             "check that its CUDA and cuDNN libraries are installed and match this onnxruntime")
        self.manifest = Manifest.beside(path)
        self.inputs = [_ort_binding(i) for i in self.session.get_inputs()]
        self.outputs = [_ort_binding(o) for o in self.session.get_outputs()]

    def run(self, feeds):
        arrays = self.check_feeds(feeds)
        values = self.session.run(None, arrays)
        return dict(zip((o["name"] for o in self.outputs), values))

    @classmethod
    def open(cls, path, *, providers=None, plugins=None, threads=None, spin=True, arena=True):
        return cls(path, providers, threads, arena=arena, spin=spin)

    @classmethod
    def contents(cls, path):
        manifest = Manifest.beside(path)
        if manifest is None:
            return Contents(None, None, [], None)
        parts = [{"file": path.with_name(bucket["file"]), "inputs": bucket["inputs"], "outputs": bucket["outputs"], "bucket": bucket,
                  "sidecar": None} for bucket in manifest.buckets or [{"file": path.name, **manifest.to_json()}]]
        return Contents(manifest, None, parts, manifest.buckets)

    def memory_probe(self, path, threads):
        if self.providers[0] != "CPUExecutionProvider":
            return None
        return load(path, providers=["CPUExecutionProvider"], threads=threads, arena=False, pad_to_longest=True)


def _ort_binding(value) -> dict:
    shape = [d if isinstance(d, int) else -1 for d in value.shape]
    return {"name": value.name, "dtype": numpy_name(value.type), "shape": shape}


class TrtRunner(Runner):
    """A TensorRT engine on the GPU; device buffers are reused per batch size, one CUDA stream."""

    backend, flag, suffixes = "tensorrt", "trt", (".engine", ".plan")
    triton_platform, triton_file = "tensorrt_plan", "model.plan"

    def __init__(self, path: Path, plugins: str | None = None):
        sidecar_file = sidecar_path(path)
        if not sidecar_file.is_file():
            raise UsageError(f"{path}: no sidecar {sidecar_file.name}; rebuild the engine with tokenfuse build")
        sidecar = json.loads(sidecar_file.read_text())
        trt, flavour = load_tensorrt()
        built = sidecar["tensorrt"]
        if (built["flavour"], built["version"]) != (flavour, trt.__version__):
            raise UsageError(
                f"{path} was built with {built['flavour']} {built['version']}, this is {flavour} {trt.__version__}; "
                "rebuild it with tokenfuse build"
            )
        library = sidecar.get("plugin_library")
        if library:
            given = Path(plugins or library["path"])
            if not given.is_file() or file_sha256(given) != library["sha256"]:
                raise UsageError(f"{path} needs the plugin library {library['path']} (sha256 {library['sha256'][:12]}); pass --plugins PATH")
            trt.get_plugin_registry().load_library(str(given))
        runtime = trt.Runtime(trt.Logger(trt.Logger.ERROR))
        data = path.read_bytes()
        _, diagnostics = runtime.get_engine_validity(data[: runtime.engine_header_size])
        if diagnostics:
            raise UsageError(f"{path}: not a valid {flavour} engine (corrupt or truncated); rebuild it with tokenfuse build")
        import torch

        if not torch.cuda.is_available():
            raise UsageError(f"{path}: TensorRT engines run on an NVIDIA GPU and this machine has none; run the .onnx with ONNX Runtime instead")
        major, minor = torch.cuda.get_device_capability()
        targets = sidecar["target"].get("compute_capabilities") or []
        if targets and f"SM{major}{minor}" not in targets:
            raise UsageError(f"{path} was built for {', '.join(targets)}; this GPU is SM{major}{minor}: rebuild it on this machine")
        self.engine = runtime.deserialize_cuda_engine(data)
        if self.engine is None:
            raise UsageError(f"{path}: TensorRT cannot deserialise it (corrupt, or built for another GPU: {sidecar['target']}); rebuild it")
        self.context = self.engine.create_execution_context()
        self.stream = torch.cuda.Stream()
        self.manifest = exported(sidecar, path)
        bindings = [{**b, "dtype": numpy_name(b["dtype"])} for b in sidecar["bindings"]]
        self.inputs = [b for b in bindings if b["io"] == "input"]
        self.outputs = [b for b in bindings if b["io"] == "output"]
        self.profile, self.length_profile = sidecar["batch_profile"], sidecar.get("length_profile")
        self.torch = torch

    def run(self, feeds):
        arrays = self.check_feeds(feeds)
        batch = len(next(iter(arrays.values())))
        if not self.profile["min"] <= batch <= self.profile["max"]:
            raise UsageError(f"batch {batch} is outside the engine's profile {self.profile['min']}..{self.profile['max']}; rebuild with --batch")
        torch = self.torch
        with torch.cuda.stream(self.stream):  # torch's caching allocator makes the per-call buffers cheap
            buffers = {}
            for spec in self.inputs:
                buffers[spec["name"]] = torch.from_numpy(arrays[spec["name"]]).to("cuda", non_blocking=True)
                if not self.context.set_input_shape(spec["name"], tuple(arrays[spec["name"]].shape)):
                    raise UsageError(f"input {spec['name']} of shape {list(arrays[spec['name']].shape)} is outside the engine's profile "
                                     f"(batch {self.profile}, length {self.length_profile}); rebuild it with tokenfuse build")
            for spec in self.outputs:
                shape = tuple(self.context.get_tensor_shape(spec["name"]))
                buffers[spec["name"]] = torch.empty(shape, dtype=getattr(torch, spec["dtype"]), device="cuda")
            for name, tensor in buffers.items():
                self.context.set_tensor_address(name, tensor.data_ptr())
            self.context.execute_async_v3(self.stream.cuda_stream)
        self.stream.synchronize()
        return {b["name"]: buffers[b["name"]].cpu().numpy() for b in self.outputs}

    @classmethod
    def open(cls, path, *, providers=None, plugins=None, threads=None, spin=True, arena=True):
        return cls(path, plugins)

    @classmethod
    def contents(cls, path):
        top = read_sidecar(path)
        buckets = top.get("buckets")
        parts = []
        for bucket in buckets or [{"file": path.name}]:
            sidecar = top if bucket["file"] == path.name else read_sidecar(path.with_name(bucket["file"]))
            parts.append({"file": path.with_name(bucket["file"]), "bucket": bucket, "sidecar": sidecar,
                          "inputs": [b for b in sidecar["bindings"] if b["io"] == "input"],
                          "outputs": [b for b in sidecar["bindings"] if b["io"] == "output"]})
        return Contents(exported(top, path), top, parts, buckets)

    def activation_mib(self):
        return self.engine.device_memory_size / 2**20


def read_sidecar(engine: Path) -> dict:
    """An engine's sidecar (.engine.json), which every reader of an engine needs."""
    file = sidecar_path(engine)
    if not file.is_file():
        raise UsageError(f"{engine}: no sidecar {file.name}; build the engine with tokenfuse build")
    return json.loads(file.read_text())


def exported(sidecar: dict, engine: Path) -> Manifest | None:
    """The export manifest an engine's sidecar keeps."""
    data = sidecar.get("export_manifest")
    return None if data is None else Manifest.from_json(data, f"{sidecar_path(engine)} (its export manifest)")


BACKENDS: tuple[type[Runner], ...] = (OrtRunner, TrtRunner)


def backend_for(path: Path) -> type[Runner]:
    """The backend that runs `path`, by its suffix."""
    found = next((backend for backend in BACKENDS if path.suffix in backend.suffixes), None)
    if found is None:
        raise UsageError(f"{path}: give " + " or ".join(f"{'/'.join(b.suffixes)} ({b.backend})" for b in BACKENDS))
    return found


class BucketRunner(Runner):
    """A length-adaptive text export (exporter/buckets.py): each text runs in the bucket its length
    selects, padded to that bucket only, so its outputs do not depend on its batch-mates. Texts for
    the natural-length graph are sorted by length and run in as many calls as pay for themselves
    (`split_by_length`); `pad_to_longest` runs them in one call padded to the longest, as the
    plain model runs (bench's baseline). Takes token ids of any width (right-padded, as
    tokenizers pad) and returns rows in input order, per-token outputs zero-padded to the widest.
    `buckets` name each bucket's file (the graphs of the export, or the engines built from them)."""

    def __init__(self, path: Path, manifest: Manifest, buckets: list[dict], open_bucket, pad_to_longest: bool = False):
        self.manifest = manifest
        self.buckets = buckets
        self.runners = {bucket["file"]: open_bucket(path.with_name(bucket["file"])) for bucket in self.buckets}
        # What one more call of the natural-length graph costs, in padded tokens (inf: never split a
        # batch); timed at the first batch that could be split, so loading runs nothing
        self.call_tokens = math.inf if pad_to_longest or not self.buckets[0]["natural_length"] else None
        longest = self.runners[self.buckets[-1]["file"]]
        self.backend, self.providers = longest.backend, getattr(longest, "providers", None)
        self.triton_platform, self.triton_file = longest.triton_platform, longest.triton_file
        self.inputs = [{**spec, "shape": [spec["shape"][0], -1]} for spec in longest.inputs]
        self.outputs = [{**spec, "shape": [spec["shape"][0], -1, *spec["shape"][2:]] if len(spec["shape"]) > 2 else spec["shape"]}
                        for spec in longest.outputs]

    def memory_probe(self, path, threads):
        probe = self.runners[self.buckets[-1]["file"]].memory_probe(path, threads)  # `load(path)` opens every bucket
        if probe is not None:
            probe.call_tokens = self.split_cost()  # its calls split as this runner's do
        return probe

    def split_cost(self) -> float:
        if self.call_tokens is None:
            natural = self.buckets[0]
            self.call_tokens = call_overhead_tokens(self.runners[natural["file"]], min(natural["seq_len"], CALIBRATION_WIDTH))
        return self.call_tokens

    def activation_mib(self):
        known = [runner.activation_mib() for runner in self.runners.values()]
        return None if None in known else max(known)

    def lengths_of(self, mask: np.ndarray) -> np.ndarray:
        """Each row's token count; the mask must be ones then zeros, with at least one token."""
        lengths = mask.sum(1)
        if not np.array_equal(mask != 0, np.arange(mask.shape[1]) < lengths[:, None]):
            raise UsageError("attention_mask must be ones then zeros in every row (right padding, as tokenizers pad)")
        if (lengths == 0).any():
            raise UsageError(f"row {int(np.argmax(lengths == 0))} is empty (no tokens in its attention_mask); send at least one token")
        return lengths

    def group_of(self, example: dict) -> int | None:
        """The bucket an example runs in (serve batches examples of one bucket together); None for
        a malformed one, which the run then refuses."""
        try:
            return int(bucket_indices(self.lengths_of(_numpy(example["attention_mask"])), self.buckets).max())
        except (UsageError, KeyError, ValueError):
            return None

    def run(self, feeds):
        arrays = self.check_feeds(feeds)
        if len({array.shape for array in arrays.values()}) > 1:
            raise UsageError(f"input_ids and attention_mask differ in shape ({', '.join(str(list(a.shape)) for a in arrays.values())})")
        lengths = self.lengths_of(arrays["attention_mask"])
        chosen = bucket_indices(lengths, self.buckets)
        parts = []
        for index in np.unique(chosen):
            bucket, rows = self.buckets[index], np.flatnonzero(chosen == index)
            several = bucket["natural_length"] and len(np.unique(lengths[rows])) > 1
            groups = split_by_length(rows, lengths[rows], self.split_cost()) if several else [rows]
            for group in groups:
                width = int(lengths[group].max()) if bucket["natural_length"] else bucket["seq_len"]
                sized = {name: fit_tokens(array[group] if len(group) < len(lengths) else array, width) for name, array in arrays.items()}
                parts.append((group, self.runners[bucket["file"]].run(sized)))
        if len(parts) == 1:  # one call: its outputs are the answer, in order
            return parts[0][1]
        return put_rows(parts, len(lengths))


def put_rows(parts: list[tuple[np.ndarray, dict]], count: int) -> dict[str, np.ndarray]:
    """The outputs of calls on subsets of `count` rows (each part: its row indices and its outputs)
    as one batch in row order; per-token outputs zero-padded to the widest part's."""
    outputs = {}
    for name in parts[0][1]:
        values = [part[name] for _, part in parts]
        wide = values[0].ndim > 1
        out = np.zeros((count, *((max(v.shape[1] for v in values),) if wide else ()), *values[0].shape[2:]), values[0].dtype)
        for (rows, _), value in zip(parts, values):
            out[(rows, slice(value.shape[1])) if wide else rows] = value
        outputs[name] = out
    return outputs


CALIBRATION_WIDTH = 32  # tokens per row of the calibration's full call
CALIBRATION_ROWS = 4
# A split makes smaller calls, which run fewer tokens per second than the calibration's full one:
# on all-MiniLM-L6-v2 (ONNX Runtime, 2-core CPU) splits at the linear estimate (~20 tokens) lost 6%
# on batches of similar lengths, at twice it at most 1% (docs/length-buckets.md).
SMALL_CALL_FACTOR = 2.0


def call_overhead_tokens(runner: Runner, width: int, repeats: int = 9) -> float:
    """A call's fixed cost in padded tokens: the median time of a one-token call over the time per
    token of a call of CALIBRATION_ROWS rows of `width` tokens, times SMALL_CALL_FACTOR. Where a
    call's time grows with its tokens (a CPU) it is a few dozen; where small calls cost about the
    same whatever their size (a GPU's launches) it is large or inf."""
    def median_seconds(rows: int, tokens: int) -> float:
        feeds = {spec["name"]: (np.ones if spec["name"] == "attention_mask" else np.zeros)((rows, tokens), spec["dtype"]) for spec in runner.inputs}
        runner.run(feeds)  # warm-up: first-call allocations
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            runner.run(feeds)
            times.append(time.perf_counter() - started)
        return statistics.median(times)

    try:
        fixed, full = median_seconds(1, 1), median_seconds(CALIBRATION_ROWS, width)
    except Exception:  # e.g. an engine built for smaller batches: its batches stay whole, as without the split
        return math.inf
    per_token = (full - fixed) / (CALIBRATION_ROWS * width - 1)
    return math.inf if per_token <= 0 else SMALL_CALL_FACTOR * fixed / per_token


def split_by_length(rows: np.ndarray, lengths: np.ndarray, call_tokens: float) -> list[np.ndarray]:
    """`rows` (with their token `lengths`) in groups of similar length, each to run as one call
    padded to its longest: the partition of the rows sorted by length that minimises padded tokens
    plus `call_tokens` per call (dynamic programming over the distinct lengths)."""
    if len(rows) < 2 or not math.isfinite(call_tokens):
        return [rows]
    order = np.argsort(lengths, kind="stable")
    distinct, counts = np.unique(lengths[order], return_counts=True)
    before = np.concatenate([[0], np.cumsum(counts)])  # rows shorter than each distinct length
    best, start = np.zeros(len(distinct) + 1), np.zeros(len(distinct) + 1, int)
    for end in range(1, len(distinct) + 1):  # the cheapest split of the rows up to distinct[end - 1]
        costs = best[:end] + call_tokens + (before[end] - before[:end]) * distinct[end - 1]
        start[end] = int(np.argmin(costs))
        best[end] = costs[start[end]]
    groups, end = [], len(distinct)
    while end:
        groups.append(np.sort(rows[order[before[start[end]]:before[end]]]))  # a whole batch keeps its order
        end = start[end]
    return groups[::-1]


def fit_tokens(array: np.ndarray, width: int) -> np.ndarray:
    """Crop or zero-pad the token axis to `width`."""
    if array.shape[1] == width:
        return array
    if array.shape[1] > width:
        return np.ascontiguousarray(array[:, :width])
    return np.pad(array, [(0, 0), (0, width - array.shape[1])])


def fit_width(runner: Runner, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Token inputs padded (or cut) to the fixed length a runner takes; any width where it takes any."""
    widths = {spec["name"]: spec["shape"][1] for spec in runner.inputs if len(spec["shape"]) == 2}
    return {name: fit_tokens(array, widths[name]) if widths.get(name, -1) != -1 else array for name, array in feeds.items()}


def load(path: str | Path, *, providers=None, plugins: str | None = None, threads: int | None = None, spin: bool = True,
         arena: bool = True, pad_to_longest: bool = False) -> Runner:
    """A runner for an .onnx (ONNX Runtime) or an .engine (TensorRT). `spin=False`: ONNX Runtime's
    idle threads sleep (a server, whose event loop needs the CPU between batches); `arena=False`:
    every call allocates its own buffers (for measuring them); `pad_to_longest`: a text model's
    natural-length graph gets each batch in one call padded to its longest text (as users run the
    plain model), instead of split by length (BucketRunner)."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{path}: no such file")
    backend = backend_for(path)
    options = dict(providers=providers, plugins=plugins, threads=threads, spin=spin, arena=arena)
    try:
        contents = backend.contents(path)
    except UsageError:  # e.g. an engine without its sidecar: opening it says what to do
        contents = None
    if contents is not None and contents.buckets:
        return BucketRunner(path, contents.manifest, contents.buckets, lambda part: backend.open(part, **options), pad_to_longest)
    return backend.open(path, **options)
