"""tokenfuse tune (data readers, fidelity, Pareto front, the sweep, bad input) and tokenfuse show
(the drawn token maps against the exported ONNX model's own merge decisions)."""

from __future__ import annotations

import json
import shlex
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from tokenfuse.cli import main
from tokenfuse.engines import tune as T
from tokenfuse.engines.show import layer_maps, show
from tokenfuse.exporter import load_model
from tokenfuse.exporter.errors import UsageError


# --- fixtures: images and texts made here, a tiny BERT with MiniLM's real tokenizer ---------------

def write_images(folder: Path, classes: int, per_class: int, size: int = 64, seed: int = 0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    for c in range(classes):
        (folder / str(c)).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(folder / str(c) / f"{i}.png")
    return folder


@pytest.fixture(scope="session")
def images(tmp_path_factory) -> Path:
    return write_images(tmp_path_factory.mktemp("images"), classes=3, per_class=4)


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory, minilm_path) -> str:
    """A 2-layer random BERT with MiniLM's vocabulary and tokenizer files (fast, tokenizes real text)."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("bert") / "tiny"
    BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, max_position_embeddings=64)).save_pretrained(path)
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if Path(minilm_path, name).is_file():
            shutil.copy(Path(minilm_path, name), path / name)
    return str(path)


SENTENCES = [
    "the film is a delight from start to finish", "a tedious and silly mess", "warm funny and wise",
    "i could not wait for it to end", "one of the best films of the year", "the plot makes no sense at all",
    "a charming cast carries it", "dull dull dull", "beautifully shot and acted", "it never finds its footing",
    "a triumph", "not worth the ticket", "smart and moving", "an hour too long",
]


# --- Pareto front and the pick --------------------------------------------------------------------

def test_pareto_front_on_known_points():
    points = [(1.0, 1.0), (1.5, 0.9), (1.4, 0.8), (2.0, 0.5), (1.5, 0.95), (0.9, 1.0), (2.0, 0.5)]
    # (1.5, 0.9) is beaten by (1.5, 0.95); (1.4, 0.8) by both; (0.9, 1.0) by (1.0, 1.0); equal points both stay.
    assert T.pareto_front(points) == [0, 4, 3, 6]
    assert T.pareto_front([]) == []


def row(method, speedup, drop):
    return {"method": method, "budget": "r=0.9", "speedup": speedup, "drop": drop}


def test_choose_meets_the_target_or_says_the_best_found():
    rows = [row("a", 1.2, 0.0), row("b", 1.6, 0.008), row("c", 2.0, 0.05)]
    assert T.choose(rows, "agreement", 0.01, None)["method"] == "b"
    assert T.choose(rows, "agreement", None, 1.5)["method"] == "b"
    assert T.choose(rows, "agreement", None, 1.1)["method"] == "a"
    with pytest.raises(UsageError, match=r"no budget reaches --min-speedup 3.0: the fastest found is c .*speedup 2.00x"):
        T.choose(rows, "agreement", None, 3.0)
    with pytest.raises(UsageError, match=r"within --max-drop 0.001.*closest found is a"):
        T.choose([row("a", 1.2, 0.004), row("c", 2.0, 0.05)], "agreement", 0.001, None)


@pytest.mark.parametrize("options, message", [
    ({"methods": ("tome", "fast")}, "--methods tome,fast: choose from pitome,tome,crossget,turbo"),
    ({"max_drop": 0.01, "min_speedup": 1.5}, "give --max-drop or --min-speedup, not both"),
    ({"batch": 0}, "--batch 0: must be >= 1"),
    ({"time_limit": 0}, "--time-limit 0: must be a positive number of seconds"),
    ({"measure": "f1"}, "--measure f1: choose one of"),
])
def test_tune_refuses_bad_options_before_any_work(tmp_path, options, message):
    with pytest.raises(UsageError, match=message):
        T.tune("hf:/nonexistent", tmp_path / "missing.txt", **options)


# --- data readers -------------------------------------------------------------------------------

def test_readers(tmp_path, images):
    data = T.read_data(images)
    assert (data.kind, len(data.items), sorted(set(data.labels))) == ("image", 12, ["0", "1", "2"])
    flat = tmp_path / "flat"
    flat.mkdir()
    shutil.copy(images / "0" / "0.png", flat / "a.png")
    assert T.read_data(flat).labels is None and T.read_data(flat).names == ["a.png"]

    (tmp_path / "t.txt").write_text("first text\n\n  second text \n")
    data = T.read_data(tmp_path / "t.txt")
    assert (data.kind, data.items, data.labels) == ("text", ["first text", "second text"], None)

    (tmp_path / "t.jsonl").write_text('{"text": "a", "label": "pos"}\n{"text": "b", "label": 1}\n')
    assert T.read_data(tmp_path / "t.jsonl").labels == ["pos", "1"]
    (tmp_path / "u.jsonl").write_text('{"text": "a"}\n{"text": "b"}\n')
    assert T.read_data(tmp_path / "u.jsonl").labels is None

    (tmp_path / "ft.cor").write_bytes("__label__neg dull \x97 and slow . \n__label__pos fine\n".encode("latin-1"))
    data = T.read_data(tmp_path / "ft.cor")
    assert data.items == ["dull \x97 and slow .", "fine"] and data.labels == ["neg", "pos"]


@pytest.mark.parametrize("name, content, message", [
    ("missing.txt", None, "no such file or folder"),
    ("empty.txt", "\n \n", "holds no texts"),
    ("bin.txt", b"\x00\x01\x02", "a binary file"),
    ("bad.jsonl", '{"text": "a"}\nnot json\n', "line 2 is not JSON"),
    ("notext.jsonl", '{"label": 1}\n', "line 1 has no string 'text'"),
    ("mixed.jsonl", '{"text": "a", "label": 1}\n{"text": "b"}\n', "line 2 has no 'label'"),
    ("noimages", [], "no PNG or JPEG images"),
])
def test_bad_data_is_refused(tmp_path, name, content, message):
    path = tmp_path / name
    if isinstance(content, list):
        path.mkdir()
        (path / "notes.txt").write_text("x")
    elif isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    with pytest.raises(UsageError, match=message):
        T.read_data(path)


def test_unreadable_image_and_wrong_kind_are_refused(tmp_path, hf_dirs):
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    adapter = load_model(f"hf:{hf_dirs['vit-cls']}")
    with pytest.raises(UsageError, match="broken.png: not a readable PNG or JPEG"):
        T.model_inputs(T.read_data(tmp_path), adapter.preprocess())
    (tmp_path / "t.txt").write_text("a text\n")
    with pytest.raises(UsageError, match="the model takes image input and --data holds texts"):
        T.model_inputs(T.read_data(tmp_path / "t.txt"), adapter.preprocess())


# --- fidelity measures ----------------------------------------------------------------------------

def test_fidelity_measures():
    rng = np.random.default_rng(0)
    emb = rng.standard_normal((30, 8))
    same = T.fidelity({"embedding": emb}, {"embedding": emb * 3.0}, None)
    assert same["cosine"] == pytest.approx(1.0) and same["knn"] == 1.0
    other = T.fidelity({"embedding": emb}, {"embedding": rng.standard_normal((30, 8))}, None)
    assert other["knn"] < 0.6 and other["cosine"] < 0.5
    # two well-separated clusters: every leave-one-out vote is right
    clusters = np.concatenate([rng.normal(5, 0.1, (12, 4)), rng.normal(-5, 0.1, (12, 4))])
    assert T.knn_accuracy(clusters, np.array(["a"] * 12 + ["b"] * 12)) == 1.0
    logits = rng.standard_normal((20, 3))
    flipped = logits.copy()
    flipped[:5] = -flipped[:5]  # these five (very likely) change their argmax
    result = T.fidelity({"logits": logits}, {"logits": flipped}, [str(i % 3) for i in range(20)])
    assert result["agreement"] == np.mean(logits.argmax(1) == flipped.argmax(1))
    assert result["unmerged_accuracy"] == np.mean(logits.argmax(1) == np.arange(20) % 3)
    with pytest.raises(UsageError, match="2 classes but the model has 3 outputs|name class folders"):
        T.fidelity({"logits": logits}, {"logits": logits}, ["5"] * 20)


def test_decreasing_schedule():
    assert T.decreasing_schedule(65, 3, 4) == (57, 53, 53)
    assert T.parse_budgets("0.9,4,dec:4", 65, 3)[2].schedule == (57, 53, 53)
    labels = [b.label for b in T.default_budgets(65, 3)]
    assert labels == ["r=0.9", "r=0.8", "decreasing (mean r=8)", "r=11", "r=0.95", "r=0.85", "r=5"]
    with pytest.raises(UsageError, match="dec:R needs an integer"):
        T.parse_budgets("dec:x", 65, 3)


# --- the whole tune, from the CLI -----------------------------------------------------------------

def test_tune_end_to_end(tmp_path, hf_dirs, images, capsys):
    spec = f"hf:{hf_dirs['vit-cls']}"
    out_json, out_png = tmp_path / "tune.json", tmp_path / "tune.png"
    code = main(["tune", "--model", spec, "--data", str(images), "--methods", "tome,pitome", "--budgets", "4,dec:4,0.5",
                 "--max-drop", "1.0", "--seconds", "0.5", "--min-rounds", "2", "--time-limit", "0.01",
                 "--json", str(out_json), "--plot", str(out_png)])
    printed = capsys.readouterr().out
    assert code == 0
    report = json.loads(out_json.read_text())
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the unmerged model, then the first configuration (the first always runs): the time limit, long past
    # after one export, stopped the sweep there on any machine
    assert len(report["rows"]) == 2 and len(report["skipped"]) == 5
    assert {s["reason"] for s in report["skipped"]} == {"time limit"}
    unmerged, first = report["rows"]
    assert (unmerged["method"], unmerged["speedup"], unmerged["drop"], unmerged["schedule"]) == ("none", 1.0, 0.0, [65, 65, 65])
    assert (first["method"], first["schedule"]) == ("tome", [61, 57, 53])
    assert report["data"] == {"path": str(images), "kind": "image", "items": 12, "labelled": True, "truncated_texts": 0}
    assert report["measure"] == "agreement" and 0.0 <= first["agreement"] <= 1.0 and "accuracy" in first
    # --max-drop 1.0 admits both: the pick is the faster one, on the front
    pick = report["pick"]
    assert pick == max(report["rows"], key=lambda r: r["speedup"]) and pick["on_front"]
    flags = " --r 4" if pick["method"] == "tome" else ""
    assert report["export_command"] == f"tokenfuse export --model {spec} -o {pick['method']}.onnx --method {pick['method']}{flags}"
    assert "Pareto front" in printed and report["export_command"] in printed

    # the printed command writes the configuration that was measured
    words = shlex.split(report["export_command"])[1:]
    words[words.index("-o") + 1] = str(tmp_path / "pick.onnx")
    assert main(words + ["--no-validate"]) == 0
    assert json.loads((tmp_path / "pick.json").read_text())["schedule"] == pick["schedule"]


def test_tune_embedding_model_with_labels(tmp_path, tiny_bert):
    data = tmp_path / "reviews.jsonl"
    data.write_text("".join(json.dumps({"text": t, "label": i % 2}) + "\n" for i, t in enumerate(SENTENCES)))
    report = T.tune(f"hf:{tiny_bert}", data, methods=("tome",), budgets="2", seq_len=16, max_drop=1.0, seconds=0.5,
                    min_rounds=2, log=lambda *_: None)
    unmerged, only = report["rows"]
    assert report["measure"] == "knn" and set(only) >= {"cosine", "knn", "accuracy", "unmerged_accuracy"}
    assert report["unmerged"]["knn"] == 1.0 and report["unmerged"]["cosine"] == pytest.approx(1.0)
    pick = report["pick"]["method"]
    assert report["export_command"].endswith(f"--method {pick}{' --r 2' if pick == 'tome' else ''} --seq-len 16")


@pytest.mark.parametrize("case, message", [
    ("few", "--data has 5 items; top-1 agreement needs at least 10"),
    ("unreachable", "no budget reaches --min-speedup 1000.0: the fastest found is "),
    ("empty", "holds no texts"),
])
def test_tune_bad_input_exits_2_and_writes_nothing(tmp_path, hf_dirs, images, capsys, case, message):
    data = images
    if case == "few":
        data = write_images(tmp_path / "few", classes=1, per_class=5)
    elif case == "empty":
        data = tmp_path / "empty.txt"
        data.write_text("")
    target = ["--min-speedup", "1000"] if case == "unreachable" else []
    out_json, out_png = tmp_path / "t.json", tmp_path / "t.png"
    code = main(["tune", "--model", f"hf:{hf_dirs['vit-cls']}", "--data", str(data), "--methods", "tome", "--budgets", "4",
                 "--seconds", "0.3", "--min-rounds", "2", *target, "--json", str(out_json), "--plot", str(out_png)])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("tokenfuse: error: ") and message in err and err.count("\n") == 1
    assert not out_json.exists() and not out_png.exists() and not list(tmp_path.glob(".t.*"))


# --- show: the drawn maps are the exported model's merge decisions --------------------------------

def test_layer_maps_compose_slots():
    first = torch.tensor([[0, 1, 1, 2, 3]])  # 5 tokens -> 4: tokens 1 and 2 merge
    second = torch.tensor([[0, 1, 1, 2]])  # 4 -> 3: tokens 1 and 2 merge
    maps = layer_maps([first, second], (4, 4, 3), 5)
    assert maps[0].tolist() == maps[1].tolist() == [[0, 1, 1, 2, 3]]
    assert maps[2].tolist() == [[0, 1, 1, 1, 2]]


def onnx_slots(adapter, settings, feeds, tmp_path):
    """Each merging layer's slots as the exported ONNX graph computes them, in ONNX Runtime."""
    import onnxruntime as ort

    from tokenfuse.exporter.onnx_export import trace

    path = tmp_path / "traced.onnx"
    trace(adapter, settings, path, 18)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    outputs = dict(zip(names, session.run(None, feeds)))
    return [torch.from_numpy(outputs[n]) for n in names if n.startswith("merge_slots.")], outputs


def test_show_image_draws_the_exported_models_slots(tmp_path, hf_dirs, images):
    from tokenfuse.exporter import export
    from tokenfuse.exporter.settings import MergeOptions

    spec = f"hf:{hf_dirs['vit-cls']}"
    manifest = export(spec, tmp_path / "m.onnx", method="pitome", r=0.8, validate=False, log=lambda *_: None)
    out = tmp_path / "show.png"
    picture = images / "1" / "2.png"
    assert main(["show", "--manifest", str(tmp_path / "m.onnx"), "--image", str(picture), "-o", str(out), "--layers", "0,2"]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    result = show(None, picture, tmp_path / "again.png", layers=[0, 1, 2], manifest=manifest)

    adapter = load_model(spec)
    settings, _ = MergeOptions(method="pitome", r=0.8).resolve(adapter)
    feeds = T.model_inputs(T.Dataset("image", [picture.read_bytes()], ["x"]), adapter.preprocess())[0]
    slots, outputs = onnx_slots(adapter, settings, feeds, tmp_path)
    expected = layer_maps(slots, settings.schedule, adapter.shape().tokens)
    for layer in (0, 1, 2):
        assert np.array_equal(result["maps"][layer], expected[layer][0].numpy())
    # and the shipped model's token sizes are the number of patches the last map gives each token
    from tokenfuse.engines import load

    sizes = load(tmp_path / "m.onnx").run(feeds)["token_sizes"][0, :, 0]
    assert np.array_equal(np.bincount(result["maps"][2], minlength=len(sizes)), sizes)
    assert (sizes > 1).any()


def test_show_text_words_per_token(tmp_path, tiny_bert):
    from tokenfuse.engines import load
    from tokenfuse.exporter import export

    spec = f"hf:{tiny_bert}"
    export(spec, tmp_path / "t.onnx", method="tome", r=3, seq_len=14, validate=False, log=lambda *_: None)
    text = "a warm funny and wise film with a charming cast"
    html_path, png_path = tmp_path / "t.html", tmp_path / "t.png"
    assert main(["show", "--manifest", str(tmp_path / "t.json"), "--text", text, "-o", str(html_path)]) == 0
    assert main(["show", "--model", spec, "--method", "tome", "--r", "3", "--seq-len", "14", "--text", text, "-o", str(png_path)]) == 0
    page = html_path.read_text()
    assert "charming" in page and "after layer 1" in page and png_path.read_bytes()[:4] == b"\x89PNG"

    result = show(spec, text, tmp_path / "u.html", layers=[1], method="tome", r=3, seq_len=14)
    runner = load(tmp_path / "t.onnx")
    from tokenfuse.engines.preprocess import Preprocessor

    feeds = Preprocessor(runner.manifest.preprocess).text(text)
    out = runner.run(feeds)
    real = feeds["attention_mask"][0].astype(bool)
    # real words per token from the drawn map == the exported model's sizes of its real tokens
    counts = np.bincount(result["maps"][1][real], minlength=out["token_sizes"].shape[1])
    valid = out["token_mask"][0].astype(bool)
    assert np.array_equal(counts[valid], out["token_sizes"][0, valid, 0]) and (counts > 1).any()
    assert counts[~valid].sum() == 0


@pytest.mark.parametrize("argv, message", [
    (["--image", "nope.png", "-o", "x.png"], "--image nope.png: cannot read it"),
    (["--text", "hello", "-o", "x.png"], "takes image input; give --image"),
    (["--image", "IMG", "-o", "x.jpg"], "write a .png"),
    (["--image", "IMG", "-o", "x.png", "--layers", "7"], "--layers [7]: give layers 0..2"),
])
def test_show_bad_input(tmp_path, hf_dirs, images, capsys, argv, message):
    argv = [str(images / "0" / "0.png") if a == "IMG" else str(tmp_path / a) if a.startswith("x.") else a for a in argv]
    code = main(["show", "--model", f"hf:{hf_dirs['vit-cls']}", "--method", "tome", "--r", "4", *argv])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1
    assert not list(tmp_path.iterdir())


def test_grayscale_model_gets_one_channel():
    """A one-channel model (the Fashion-MNIST ViT) gets [B, 1, H, W] from an RGB or grayscale file."""
    import io

    from PIL import Image

    from tokenfuse.engines.preprocess import Preprocessor

    prep = Preprocessor({"kind": "image", "size": [8, 8], "mean": [0.5], "std": [0.25], "interpolation": "bilinear", "crop_pct": 1.0})
    for mode in ("L", "RGB"):
        buffer = io.BytesIO()
        Image.new(mode, (8, 8), 255 if mode == "L" else (255, 255, 255)).save(buffer, format="PNG")
        pixels = prep.image(buffer.getvalue())["pixel_values"]
        assert pixels.shape == (1, 1, 8, 8) and np.allclose(pixels, (1.0 - 0.5) / 0.25)
