"""Length-adaptive text exports (exporter/buckets.py): one graph per length bucket, weights stored
once, each text in the bucket its own length selects, so padding never changes its result."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch

from tokenfuse.engines import bench as bench_module
from tokenfuse.engines.batching import stack
from tokenfuse.engines.preprocess import Preprocessor
from tokenfuse.engines import runtime as B_runtime
from tokenfuse.engines.runtime import BucketRunner, load
from tokenfuse.exporter import UsageError, export, load_model
from tokenfuse.exporter import buckets as B

pytestmark = pytest.mark.xdist_group("minilm")

TEXTS = [  # 4, 10, 47, 3, 64 (cut), 20, 32 and 38 tokens: every graph of the `adaptive` export
    "a cat",
    "token merging makes transformers faster on long inputs",
    "the quick brown fox jumps over the lazy dog " * 5,
    "short",
    "embedding services receive queries, sentences and whole passages of text, and each of them is padded " * 3,
    "the quick brown fox jumps over the lazy dog " * 2,
    "the quick brown fox jumps over the lazy dog " * 3 + "and a cat",
    "the quick brown fox jumps over the lazy dog " * 4,
]


@pytest.fixture(scope="module")
def adaptive(tmp_path_factory, minilm_path):
    """all-MiniLM-L6-v2 pitome r=0.9, lengths up to 64: unmerged up to 16 tokens, buckets 32, 48, 64,
    each merging only the texts long enough to pay for their padding."""
    path = tmp_path_factory.mktemp("adaptive") / "minilm.onnx"
    manifest = export(f"hf:{minilm_path}", path, method="pitome", r=0.9, max_seq_len=64, unmerged_up_to=16, seed=0, log=lambda *_: None)
    return path, manifest


@pytest.fixture(scope="module")
def tokenizer(minilm_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(minilm_path)


def _encode(tokenizer, texts, max_length=64, **options):
    encoded = tokenizer(texts, truncation=True, max_length=max_length, return_tensors="np", **options)
    return {name: encoded[name].astype(np.int64) for name in ("input_ids", "attention_mask")}


def _minilm_gflops(tokens_in: int, tokens_out: int) -> float:
    """One all-MiniLM-L6-v2 layer's multiply-adds (width 384, MLP 1536, head size 32), written out
    for the test: attention at tokens_in, MLP at tokens_out, and the merge's similarity and
    assignment where it removes tokens."""
    attention = 4 * tokens_in * 384**2 + 2 * tokens_in**2 * 384
    merge = (tokens_in**2 * 32 + tokens_in * tokens_out * 384) if tokens_out < tokens_in else 0
    return (attention + 2 * tokens_out * 384 * 1536 + merge) / 1e9


def test_each_bucket_merges_only_the_texts_it_makes_faster(adaptive):
    """A bucket runs the texts whose unmerged cost at their own length reaches its merged cost
    (FLOPs, merge included, at the measured efficiency); every other length runs unmerged."""
    _, manifest = adaptive
    natural, *merged = manifest["buckets"]
    previous = 16
    for bucket in merged:
        n, cost = bucket["seq_len"], 0.0
        for out in bucket["schedule"]:
            cost, n = cost + _minilm_gflops(n, out), out
        first = next(length for length in range(previous + 1, bucket["seq_len"] + 1)
                     if 6 * _minilm_gflops(length, length) >= cost / B.MERGED_EFFICIENCY)
        assert bucket["lengths"] == [[first, bucket["seq_len"]]] and first > previous + 1  # the bucket's shortest texts run unmerged
        previous = bucket["seq_len"]
    held = sorted(length for b in manifest["buckets"] for first, last in b["lengths"] for length in range(first, last + 1))
    assert held == list(range(1, 65))  # every length runs in exactly one graph
    assert natural["natural_length"] and natural["seq_len"] == natural["lengths"][-1][1] and natural["lengths"][0] == [1, 28]
    # the unmerged graph was checked against PyTorch up to the longest text it runs
    assert natural["validation"]["passed"] and natural["seq_len"] in natural["validation"]["lengths"]
    assert manifest["settings"]["merged_efficiency"] == B.MERGED_EFFICIENCY and not manifest["settings"]["always_merge"]


def test_files_buckets_and_shared_weights(adaptive):
    path, manifest = adaptive
    assert [(b["seq_len"], b["method"], b["natural_length"]) for b in manifest["buckets"]] == [
        (55, "none", True), (32, "pitome", False), (48, "pitome", False), (64, "pitome", False)]
    assert [b["file"] for b in manifest["buckets"]] == ["minilm.natural.onnx", "minilm.len32.onnx", "minilm.len48.onnx", "minilm.onnx"]
    assert json.loads(path.with_suffix(".json").read_text()) == manifest
    assert manifest["preprocess"]["length_adaptive"] and manifest["settings"]["max_seq_len"] == 64
    for bucket in manifest["buckets"][1:]:  # every merged bucket validated at its own length
        assert bucket["validation"]["passed"] and bucket["budget"]["layers"][0]["tokens_in"] == bucket["seq_len"]
    weights = path.with_suffix(".weights")
    storage = manifest["weights"]
    # every graph refers to the one weights file; the model's ~86 MiB are stored once, not four times
    assert weights.stat().st_size == storage["stored_bytes"] < 100 * 2**20 < storage["referenced_bytes"]
    assert storage["referenced_bytes"] > 3 * storage["stored_bytes"]
    for bucket in manifest["buckets"]:
        assert path.with_name(bucket["file"]).stat().st_size < 2**20  # the graph only
        ort.InferenceSession(str(path.with_name(bucket["file"])), providers=["CPUExecutionProvider"])


def test_each_text_runs_in_its_own_bucket_whatever_its_batch_mates(adaptive, tokenizer):
    """Padding never changes an embedding: batched with others (padded to the longest), alone
    (unpadded) and padded far past the model's length give the same result."""
    runner = load(adaptive[0])
    assert isinstance(runner, BucketRunner)
    batch = runner.run(_encode(tokenizer, TEXTS, padding="longest"))
    lengths = _encode(tokenizer, TEXTS, padding="longest")["attention_mask"].sum(1)
    assert sorted(set(B.bucket_indices(lengths, runner.buckets))) == [0, 1, 2, 3]  # the batch spans every graph
    for i, text in enumerate(TEXTS):
        feeds = _encode(tokenizer, [text])
        alone = runner.run(feeds)
        padded = runner.run({name: np.pad(array, [(0, 0), (0, 200 - array.shape[1])]) for name, array in feeds.items()})
        assert np.abs(alone["embedding"][0] - batch["embedding"][i]).max() < 1e-5
        assert np.abs(padded["embedding"][0] - batch["embedding"][i]).max() < 1e-5
        real = int(batch["token_mask"][i].sum())
        assert real <= lengths[i] and batch["token_sizes"][i, :, 0].sum() == lengths[i]  # sizes count real tokens only


def test_unmerged_lengths_equal_the_plain_model(adaptive, tokenizer, minilm_path):
    """Texts up to --unmerged-up-to, and those too short to pay for their bucket's padding, run
    unmerged: sentence-transformers' mean pooling and L2 normalisation of the Hugging Face model,
    computed here independently, at the text's own length."""
    from transformers import AutoModel

    model = AutoModel.from_pretrained(minilm_path).eval()
    unmerged = [range(first, last + 1) for first, last in adaptive[1]["buckets"][0]["lengths"]]
    short = [t for t in TEXTS if any(len(tokenizer(t)["input_ids"]) in held for held in unmerged)]
    assert {len(tokenizer(t)["input_ids"]) for t in short} == {3, 4, 10, 20, 38}  # 38: above 32, below the 48 bucket's first
    feeds = _encode(tokenizer, short, padding="longest")
    with torch.no_grad():
        hidden = model(input_ids=torch.from_numpy(feeds["input_ids"]), attention_mask=torch.from_numpy(feeds["attention_mask"])).last_hidden_state
    mask = torch.from_numpy(feeds["attention_mask"]).unsqueeze(-1).float()
    expected = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1).numpy()
    got = load(adaptive[0]).run(feeds)["embedding"]
    assert np.abs(got - expected).max() < 1e-4


def test_long_texts_are_merged_as_pytorch_merges_them_in_their_bucket(adaptive, tokenizer):
    """A text in the 48 bucket: the merged PyTorch model on it padded to 48 (same decisions up to
    near-ties, so compare the pooled embedding by cosine)."""
    from tokenfuse.exporter.settings import MergeOptions

    adapter = load_model(f"hf:{adaptive[1]['preprocess']['tokenizer']}", seq_len=48)
    text = TEXTS[2]
    feeds = _encode(tokenizer, [text], padding="max_length", max_length=48)
    assert 32 < feeds["attention_mask"].sum() <= 48
    settings, _ = MergeOptions(method="pitome", r=0.9).resolve(adapter)
    with torch.no_grad():
        expected, _ = adapter.run(settings, {k: torch.from_numpy(v) for k, v in feeds.items()})
    got = load(adaptive[0]).run(_encode(tokenizer, [text]))["embedding"][0]
    reference = expected["embedding"][0].numpy()
    assert np.dot(got, reference) / (np.linalg.norm(got) * np.linalg.norm(reference)) > 0.9999


@pytest.mark.parametrize("feeds, message", [
    ({"input_ids": np.ones((1, 70), np.int64), "attention_mask": np.ones((1, 70), np.int64)}, "70 tokens is longer than the model's 64"),
    ({"input_ids": np.ones((2, 8), np.int64), "attention_mask": np.array([[1] * 8, [0] * 8])}, "row 1 is empty"),
    ({"input_ids": np.ones((1, 8), np.int64), "attention_mask": np.array([[1, 0, 1, 1, 0, 0, 0, 0]])}, "ones then zeros"),
    ({"input_ids": np.ones((1, 8), np.int64), "attention_mask": np.ones((1, 9), np.int64)}, "differ in shape"),
])
def test_bad_lengths_get_a_one_line_error(adaptive, feeds, message):
    with pytest.raises(UsageError, match=message):
        load(adaptive[0]).run(feeds)


@pytest.mark.parametrize("kwargs, message", [
    (dict(r=8), "integer --r"),
    (dict(schedule=[20] * 6), "--schedule"),
    (dict(max_seq_len=1000), "--max-seq-len 1000 must be in"),
    (dict(seq_len=32, max_seq_len=64), "not both"),
    (dict(unmerged_up_to=-1), "--unmerged-up-to -1"),
])
def test_bad_length_options_fail_and_write_nothing(minilm_path, tmp_path, kwargs, message):
    with pytest.raises(UsageError, match=message):
        export(f"hf:{minilm_path}", tmp_path / "m.onnx", validate=False, log=lambda *_: None, **kwargs)
    assert not list(tmp_path.iterdir())


def test_a_failure_in_a_later_bucket_leaves_nothing_behind(minilm_path, tmp_path, monkeypatch):
    from tokenfuse.exporter import onnx_export

    built = onnx_export.build_graph
    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise UsageError("validation failed: planted; nothing written")
        return built(*args, **kwargs)

    monkeypatch.setattr(onnx_export, "build_graph", failing)
    with pytest.raises(UsageError, match="planted"):
        export(f"hf:{minilm_path}", tmp_path / "m.onnx", max_seq_len=64, unmerged_up_to=16, validate=False, log=lambda *_: None)
    assert not list(tmp_path.iterdir())


def test_served_texts_are_padded_per_bucket(adaptive):
    """serve's preprocessing does not pad a length-adaptive model's texts; a batch of them stacks
    (zero-padded to the widest) and gives each text's own result."""
    runner = load(adaptive[0])
    pre = Preprocessor(runner.manifest.preprocess)
    examples = [pre.text(t) for t in TEXTS]
    assert len({e["input_ids"].shape[1] for e in examples}) == len(TEXTS)
    batch = runner.run({name: stack([e[name] for e in examples]) for name in ("input_ids", "attention_mask")})
    for i, example in enumerate(examples):
        assert np.abs(runner.run(example)["embedding"][0] - batch["embedding"][i]).max() < 1e-5
    # serve's batcher groups by the bucket each text runs in; a malformed example gets no group (its run refuses it)
    lengths = np.array([e["attention_mask"].sum() for e in examples])
    assert [runner.group_of(e) for e in examples] == B.bucket_indices(lengths, runner.buckets).tolist()
    assert runner.group_of({"attention_mask": np.zeros((1, 4), np.int64)}) is None


def test_bench_on_real_texts_against_the_natural_length_baseline(adaptive, tmp_path):
    data = tmp_path / "texts.txt"
    data.write_text("\n".join(TEXTS * 2) + "\n")
    report = bench_module.bench(adaptive[0], batches=(4,), data=str(data), min_rounds=3, max_seconds=5, warmup=1, log=lambda *_: None)
    assert report["inputs"]["kind"] == "data" and report["inputs"]["items"] == 2 * len(TEXTS) and report["length_adaptive"]
    assert "natural lengths" in report["baseline"]
    row = report["results"][0]
    assert row["speedup"] == pytest.approx(row["baseline"]["pass_ms"] / row["merged"]["pass_ms"])
    assert row["flops_ideal_speedup"] is None  # the manifest's ratio holds at full length only


@pytest.fixture(scope="module")
def tiny_adaptive(tmp_path_factory, hf_dirs):
    """A small random BERT, pitome r=0.9 up to 64 tokens: unmerged up to 16, buckets 32, 48, 64
    merging every text longer than 16 (--always-merge)."""
    path = tmp_path_factory.mktemp("tiny-adaptive") / "bert.onnx"
    export(f"hf:{hf_dirs['bert']}", path, method="pitome", r=0.9, max_seq_len=64, unmerged_up_to=16, always_merge=True, seed=0,
           log=lambda *_: None)
    return path


def test_one_engine_per_bucket_and_a_sidecar_that_lists_them(tiny_adaptive, tmp_path):
    """`tokenfuse build` of a length-adaptive export: each merged bucket at its static length, the
    natural-length graph with a profile over batch and length; the runtime takes the set."""
    from tokenfuse.engines.build import build_engine, sidecar_path

    out = tmp_path / "bert.engine"
    top = build_engine(tiny_adaptive, out, batch=(1, 4, 8), log=lambda *_: None)
    engines = ["bert.natural.engine", "bert.len32.engine", "bert.len48.engine", "bert.engine"]
    assert sorted(f.name for f in tmp_path.iterdir()) == sorted(engines + [e + ".json" for e in engines])
    manifest = json.loads(tiny_adaptive.with_suffix(".json").read_text())
    assert [b["file"] for b in top["buckets"]] == engines and top["export_manifest"] == manifest
    assert [(b["seq_len"], b["natural_length"]) for b in top["buckets"]] == [(b["seq_len"], b["natural_length"]) for b in manifest["buckets"]]
    assert json.loads(sidecar_path(out).read_text()) == top
    natural = json.loads(sidecar_path(tmp_path / engines[0]).read_text())
    assert natural["length_profile"] == {"min": 1, "opt": 8, "max": 16} and natural["batch_profile"] == {"min": 1, "opt": 4, "max": 8}
    ids = {b["name"]: b for b in natural["bindings"]}
    assert ids["input_ids"]["shape"] == [-1, -1] and ids["input_ids"]["dtype"] == "int64" and ids["embedding"]["dtype"] == "float32"
    for engine, length in zip(engines[1:], (32, 48, 64)):
        sidecar = json.loads(sidecar_path(tmp_path / engine).read_text())
        assert sidecar["length_profile"] is None and {b["name"]: b["shape"] for b in sidecar["bindings"]}["input_ids"] == [-1, length]
        assert sidecar["export_manifest"]["budget"]["layers"][0]["tokens_in"] == length  # the top sidecar: the longest bucket's
        assert (tmp_path / engine).stat().st_size > 100_000
    with pytest.raises(UsageError, match="no NVIDIA GPU|has none"):  # this machine cannot run them; the refusal is one line
        load(out)


def test_a_bucket_that_fails_to_build_leaves_no_engine_behind(tiny_adaptive, tmp_path, monkeypatch):
    from tokenfuse.engines import build

    compiled = build.compile_engine

    def failing(path, **kwargs):
        if path.name == "bert.len48.onnx":
            raise UsageError(f"{path}: TensorRT-RTX could not build an engine (planted)")
        return compiled(path, **kwargs)

    monkeypatch.setattr(build, "compile_engine", failing)
    with pytest.raises(UsageError, match="planted"):
        build.build_engine(tiny_adaptive, tmp_path / "bert.engine", batch=(1, 2, 2), log=lambda *_: None)
    assert not list(tmp_path.iterdir())


def test_triton_repository_has_one_model_per_bucket(tiny_adaptive, tmp_path):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    from tokenfuse.engines.triton import write_repository

    folders = write_repository(tiny_adaptive, tmp_path / "repo", max_batch=8)
    assert [f.name for f in folders] == ["bert-natural", "bert-len32", "bert-len48", "bert-len64"]
    weights = tiny_adaptive.with_suffix(".weights")
    for folder, dims in zip(folders, ([-1], [32], [48], [64])):
        config = text_format.Parse((folder / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
        assert config.name == folder.name and config.max_batch_size == 8 and list(config.input[0].dims) == dims
        assert (folder / "1" / weights.name).read_bytes() == weights.read_bytes()  # each graph finds its external data
        session = ort.InferenceSession(str(folder / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
        width = dims[0] if dims[0] > 0 else 5
        out = session.run(["embedding"], {"input_ids": np.ones((2, width), np.int64), "attention_mask": np.ones((2, width), np.int64)})
        assert out[0].shape[0] == 2
    readme = (tmp_path / "repo" / "README.md").read_text()
    assert "| bert-len48 | 33-48 | 48 |" in readme and "| bert-natural | 1-16 | their own length |" in readme


def test_unmerged_length_adaptive_export_is_the_plain_model_at_natural_lengths(minilm_path, tmp_path, tokenizer):
    """`export --method none` without --seq-len: one dynamic-length graph (what bench compares with),
    any width in, the same embeddings as the merged export's unmerged graph."""
    path = tmp_path / "plain.onnx"
    manifest = export(f"hf:{minilm_path}", path, method="none", max_seq_len=64, log=lambda *_: None)
    assert [(b["file"], b["natural_length"], b["seq_len"]) for b in manifest["buckets"]] == [("plain.onnx", True, 64)]
    assert sorted(f.name for f in tmp_path.iterdir()) == ["plain.json", "plain.onnx", "plain.weights"]
    feeds = _encode(tokenizer, TEXTS, padding="longest")
    plain = load(path).run(feeds)
    assert plain["embedding"].shape == (len(TEXTS), 384) and plain["last_hidden_state"].shape[1] == feeds["input_ids"].shape[1]
    np.testing.assert_array_equal(plain["token_mask"], feeds["attention_mask"])


@pytest.mark.parametrize("seed", range(20))
def test_split_by_length_is_the_cheapest_partition(seed):
    """Against every way of cutting the rows sorted by length into runs (brute force): the same
    cost, each row exactly once, each group in input order."""
    import itertools

    rng = np.random.default_rng(seed)
    count = int(rng.integers(2, 9))
    lengths = rng.integers(1, 65, count)
    rows = np.sort(rng.choice(100, count, replace=False))
    call_tokens = float(rng.choice([0.0, 5.0, 20.0, 60.0, 500.0]))
    groups = B_runtime.split_by_length(rows, lengths, call_tokens)
    by_row = dict(zip(rows.tolist(), lengths.tolist()))
    assert sorted(r for group in groups for r in group.tolist()) == rows.tolist()
    assert all(list(group) == sorted(group) for group in groups)
    order = sorted(range(count), key=lambda i: lengths[i])
    best = min(
        sum(call_tokens + (b - a) * max(lengths[order[i]] for i in range(a, b)) for a, b in zip((0,) + cuts, cuts + (count,)))
        for k in range(count) for cuts in itertools.combinations(range(1, count), k))
    assert sum(call_tokens + len(g) * max(by_row[r] for r in g.tolist()) for g in groups) == pytest.approx(best)


def test_split_by_length_keeps_one_call_where_calls_are_dear():
    rows, lengths = np.arange(4), np.array([30, 5, 31, 6])
    assert [g.tolist() for g in B_runtime.split_by_length(rows, lengths, np.inf)] == [[0, 1, 2, 3]]
    assert [g.tolist() for g in B_runtime.split_by_length(rows, lengths, 10.0)] == [[1, 3], [0, 2]]
    assert [g.tolist() for g in B_runtime.split_by_length(rows[:1], lengths[:1], 0.0)] == [[0]]


class _TimedRunner:
    """A runner whose call takes `fixed` seconds plus `per_token` per token: what the calibration sees."""

    inputs = [{"name": "input_ids", "dtype": "int64"}, {"name": "attention_mask", "dtype": "int64"}]

    def __init__(self, fixed, per_token):
        self.fixed, self.per_token = fixed, per_token

    def run(self, feeds):
        import time

        time.sleep(self.fixed + self.per_token * feeds["input_ids"].size)


def test_call_overhead_is_measured_in_tokens():
    """A CPU-like runner (cost grows with tokens) splits; a GPU-like one (small calls cost the same) hardly ever."""
    fixed_in_tokens = 0.004 / 0.0002
    assert B_runtime.call_overhead_tokens(_TimedRunner(0.004, 0.0002), 32, repeats=3) == pytest.approx(
        B_runtime.SMALL_CALL_FACTOR * fixed_in_tokens, rel=0.5)
    assert B_runtime.call_overhead_tokens(_TimedRunner(0.01, 0.0), 32, repeats=3) > 200


def test_natural_length_texts_split_by_length_give_the_one_call_result(adaptive, tokenizer):
    """The runner's split of the natural-length texts (each call padded to its own longest) changes
    no embedding and keeps the order; pad_to_longest (bench's baseline) never splits."""
    short = ["a cat", "short", "a dog sat on the mat", "one two three four five six seven", "hi", "the end of it"]
    feeds = _encode(tokenizer, short, padding="longest")
    assert feeds["attention_mask"].sum(1).max() <= 16  # all in the natural-length graph
    split, whole = load(adaptive[0]), load(adaptive[0], pad_to_longest=True)
    assert whole.call_tokens == np.inf and split.call_tokens is None  # timed at the first batch that could split, not at load
    split.call_tokens = 0.0  # one call per distinct length (what a measured cost of 0 would give)
    widths = []
    natural = split.runners[split.buckets[0]["file"]]
    original = natural.run
    natural.run = lambda sized: widths.append(sized["input_ids"].shape[1]) or original(sized)
    got, expected = split.run(feeds), whole.run(feeds)
    assert sorted(widths) == sorted(set(feeds["attention_mask"].sum(1).tolist()))
    np.testing.assert_array_equal(got["token_mask"], expected["token_mask"])
    assert np.abs(got["embedding"] - expected["embedding"]).max() < 1e-5
    real = expected["token_mask"] != 0  # what a padding position holds is no text's result
    assert got["last_hidden_state"].shape == expected["last_hidden_state"].shape
    assert np.abs(got["last_hidden_state"][real] - expected["last_hidden_state"][real]).max() < 1e-5


@pytest.mark.parametrize("open_first, padded", [("model", [False, True]), ("baseline", [True, False])])
def test_bench_runs_the_baseline_padded_to_the_longest(adaptive, tmp_path, monkeypatch, open_first, padded):
    """In the order asked for (which is loaded first can matter on a small CPU); the report says which."""
    opened = {}
    real = bench_module.load
    monkeypatch.setattr(bench_module, "load", lambda path, **kw: opened.setdefault(str(path), kw) and real(path, **kw))
    data = tmp_path / "texts.txt"
    data.write_text("\n".join(TEXTS) + "\n")
    report = bench_module.bench(adaptive[0], batches=(2,), data=str(data), min_rounds=2, max_seconds=2, warmup=1, open_first=open_first,
                                log=lambda *_: None)
    assert [kw.get("pad_to_longest", False) for kw in opened.values()] == padded
    assert report["opened_first"] == open_first and list(report["results"][0])[1:3] == ["merged", "baseline"]
    with pytest.raises(UsageError, match="--open-first sideways: choose model or baseline"):
        bench_module.bench(adaptive[0], open_first="sideways", log=lambda *_: None)


def test_bucket_ladder_can_be_chosen(minilm_path, tmp_path):
    manifest = export(f"hf:{minilm_path}", tmp_path / "m.onnx", method="pitome", r=0.9, max_seq_len=64, unmerged_up_to=16, buckets=(40,),
                      always_merge=True, validate=False, log=lambda *_: None)
    assert [(b["seq_len"], b["lengths"], b["natural_length"]) for b in manifest["buckets"]] == [
        (16, [[1, 16]], True), (40, [[17, 40]], False), (64, [[41, 64]], False)]
    assert manifest["settings"]["always_merge"] and manifest["settings"]["merged_efficiency"] is None


@pytest.mark.parametrize("buckets, options, message", [
    ((96, 80), {}, "ascending"),
    ((40, 40), {}, "ascending"),
    ((32, 128), {"unmerged_up_to": 16}, "longer than the longest input"),
    ((16, 24, 32), {"unmerged_up_to": 32}, "drop 16 or lower --unmerged-up-to"),
    ((40,), {"method": "none"}, "--method none runs every length unmerged"),
    ((40,), {"seq_len": 64, "max_seq_len": None}, "not both"),
])
def test_bad_bucket_ladders_fail_and_write_nothing(minilm_path, tmp_path, buckets, options, message):
    with pytest.raises(UsageError, match=message):
        export(f"hf:{minilm_path}", tmp_path / "m.onnx", **{"max_seq_len": 64, **options}, buckets=buckets, validate=False, log=lambda *_: None)
    assert not list(tmp_path.iterdir())


def test_buckets_for_a_model_without_length_adaptive_exports(hf_dirs, tmp_path):
    with pytest.raises(UsageError, match="one fixed length"):
        export(f"hf:{hf_dirs['clip']}", tmp_path / "m.onnx", tower="text", buckets=(40,), validate=False, log=lambda *_: None)
    assert not list(tmp_path.iterdir())


def test_the_memory_probe_splits_as_the_runner_it_stands_for(adaptive):
    """bench measures a call's peak memory on an arena-free copy: it must run the batch as the timed runner does."""
    whole, split = load(adaptive[0], pad_to_longest=True), load(adaptive[0])
    split.call_tokens = 7.0
    assert whole.memory_probe(adaptive[0], None).call_tokens == np.inf
    assert split.memory_probe(adaptive[0], None).call_tokens == 7.0


def test_batches_of_different_widths_are_put_back_together(adaptive, tokenizer):
    """run_batched over a length-adaptive model: a batch of short texts comes back narrower than
    one of long texts; per-token outputs are zero-padded to the widest, embeddings unchanged."""
    from tokenfuse.engines.data import run_batched

    texts = ["a cat", "hi", TEXTS[2], TEXTS[4]]
    feeds = _encode(tokenizer, texts, padding="longest")
    runner = load(adaptive[0])
    got = run_batched(runner, feeds, 2)
    whole = runner.run(feeds)
    assert got["last_hidden_state"].shape == whole["last_hidden_state"].shape
    assert np.abs(got["embedding"] - whole["embedding"]).max() < 1e-5
    np.testing.assert_array_equal(got["token_mask"], whole["token_mask"])


def test_a_bucket_that_never_pays_is_left_out(minilm_path, tmp_path, monkeypatch):
    """Where merging a bucket costs more than running its every text unmerged, the bucket gets no
    graph and its lengths run unmerged; where no bucket pays, the export says what to do."""
    monkeypatch.setattr(B, "MERGED_EFFICIENCY", 0.775)  # the 32 bucket would need 33 tokens to pay: never
    logged = []
    manifest = export(f"hf:{minilm_path}", tmp_path / "m.onnx", max_seq_len=64, unmerged_up_to=16, validate=False, log=logged.append)
    assert [(b["seq_len"], b["lengths"]) for b in manifest["buckets"]] == [(62, [[1, 47], [49, 62]]), (48, [[48, 48]]), (64, [[63, 64]])]
    assert any("bucket 32: pitome saves too little" in line for line in logged)
    monkeypatch.setattr(B, "MERGED_EFFICIENCY", 0.5)
    with pytest.raises(UsageError, match="saves too little at every length up to 64.*--always-merge"):
        export(f"hf:{minilm_path}", tmp_path / "n.onnx", max_seq_len=64, unmerged_up_to=16, validate=False, log=lambda *_: None)
    assert not list(tmp_path.glob("n.*"))


def test_manifests_without_served_lengths_route_as_before():
    """Exports written before buckets listed their lengths: the natural graph up to its limit,
    each bucket above the one before it."""
    buckets = [{"seq_len": 16, "natural_length": True}, {"seq_len": 32}, {"seq_len": 64}]
    assert B.bucket_indices(np.array([1, 16, 17, 32, 33, 64]), buckets).tolist() == [0, 0, 1, 1, 2, 2]
    with pytest.raises(UsageError, match="65 tokens is longer than the model's 64"):
        B.bucket_indices(np.array([65]), buckets)


@pytest.mark.parametrize("options, message", [
    ({"method": "none"}, "--always-merge: --method none merges no length"),
    ({"seq_len": 64, "max_seq_len": None}, "not both"),
])
def test_always_merge_needs_a_length_adaptive_merged_export(minilm_path, tmp_path, options, message):
    with pytest.raises(UsageError, match=message):
        export(f"hf:{minilm_path}", tmp_path / "m.onnx", **{"max_seq_len": 64, **options}, always_merge=True, validate=False, log=lambda *_: None)
    assert not list(tmp_path.iterdir())


def test_when_the_longest_bucket_never_pays_the_natural_graph_runs_the_longest_texts(minilm_path, tmp_path, monkeypatch, tokenizer):
    """The longest merged bucket left is NAME.onnx; texts past it run unmerged, and the runner,
    the manifest and the engine names agree on it."""
    real = B.merge_from
    monkeypatch.setattr(B, "merge_from", lambda report, shortest: report.shape.tokens + 1 if report.shape.tokens == 64 else real(report, shortest))
    path = tmp_path / "m.onnx"
    manifest = export(f"hf:{minilm_path}", path, max_seq_len=64, unmerged_up_to=16, validate=False, log=lambda *_: None)
    natural, *merged = manifest["buckets"]
    assert [b["seq_len"] for b in merged] == [32, 48] and merged[-1]["file"] == "m.onnx"
    assert natural["lengths"][-1] == [49, 64] and manifest["settings"]["max_seq_len"] == 64
    assert sorted(f.name for f in tmp_path.iterdir()) == ["m.json", "m.len32.onnx", "m.natural.onnx", "m.onnx", "m.weights"]
    # tokenfuse build names each bucket's engine by the same rule, from the last bucket's length
    assert [B.bucket_file(path, None if b["natural_length"] else b["seq_len"], merged[-1]["seq_len"]).name
            for b in manifest["buckets"]] == [b["file"] for b in manifest["buckets"]]
    text = "embedding services receive queries, sentences and whole passages of text, and each of them is padded " * 3
    feeds = _encode(tokenizer, [text])  # 64 tokens: past the last merged bucket
    runner = load(path)
    assert B.bucket_indices(feeds["attention_mask"].sum(1), runner.buckets).tolist() == [0]
    plain = export(f"hf:{minilm_path}", tmp_path / "plain" / "p.onnx", method="none", max_seq_len=64, validate=False, log=lambda *_: None)
    assert plain["buckets"][0]["lengths"] == [[1, 64]]
    assert np.abs(runner.run(feeds)["embedding"] - load(tmp_path / "plain" / "p.onnx").run(feeds)["embedding"]).max() < 1e-5
