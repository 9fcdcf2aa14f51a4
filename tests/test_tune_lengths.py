"""`tokenfuse tune --lengths`: every length bucket merged against the plain model at natural
lengths, and the --unmerged-up-to with the least expected time on the data's own lengths."""

from __future__ import annotations

import json
import re

import pytest

from tokenfuse.cli import main
import numpy as np

from tokenfuse.engines.tune_lengths import candidate_buckets, distinct_candidates, pick, tune_lengths
from tokenfuse.exporter.buckets import bucket_indices
from tokenfuse.exporter import UsageError

pytestmark = pytest.mark.xdist_group("minilm")


def _row(up_to, pass_ms):
    return {"unmerged_up_to": up_to, "pass_ms": pass_ms}


def test_the_pick_is_the_fastest_and_leans_unmerged_on_ties():
    assert pick([_row(0, 9.0), _row(64, 10.0), _row(256, 11.0)]) == 0
    assert pick([_row(0, 10.0), _row(64, 9.0), _row(256, 11.0)]) == 64
    assert pick([_row(0, 10.0), _row(64, 10.1), _row(256, 10.29)]) == 256  # within 3% of the fastest: the most unmerged
    assert pick([_row(0, 10.0), _row(256, 10.4)]) == 0


BUCKETS = [  # an export at --unmerged-up-to 0: each bucket merging from where it pays
    {"file": "m.len32.onnx", "seq_len": 32, "lengths": [[29, 32]]},
    {"file": "m.len48.onnx", "seq_len": 48, "lengths": [[43, 48]]},
    {"file": "m.onnx", "seq_len": 64, "lengths": [[56, 64]]},
]


@pytest.mark.parametrize("up_to", [0, 16, 32, 44, 48, 64])
def test_a_candidate_routes_as_the_export_at_its_unmerged_up_to_would(up_to):
    """Every length in exactly one graph; merged only above `up_to` and from where its bucket pays."""
    buckets = candidate_buckets(BUCKETS, "plain.onnx", up_to, 64)
    lengths = np.arange(1, 65)
    routed = [buckets[i] for i in bucket_indices(lengths, buckets)]
    for length, bucket in zip(lengths.tolist(), routed):
        pays = next((b for b in BUCKETS if b["lengths"][0][0] <= length <= b["seq_len"]), None)
        expected = pays["file"] if pays is not None and length > up_to else "plain.onnx"
        assert bucket["file"] == expected, (length, bucket["file"], expected)
    held = sorted(n for b in buckets for first, last in b["lengths"] for n in range(first, last + 1))
    assert held == list(range(1, 65))


def test_candidates_that_route_the_data_alike_are_timed_once():
    """Texts of 10-40 tokens: only the 32 bucket (merging 29-32) touches one of them, so 32, 48 and
    all unmerged route them alike and are one candidate (the largest kept)."""
    candidates = distinct_candidates(BUCKETS, "plain.onnx", 64, np.array([10, 20, 30, 40]))
    assert list(candidates) == [0, 64]
    assert [b["file"] for b in candidates[0]] == ["plain.onnx", "m.len32.onnx", "m.len48.onnx", "m.onnx"]
    assert [b["file"] for b in candidates[64]] == ["plain.onnx"]


def test_tune_lengths_times_each_routing_and_gives_the_export_command(minilm_path, tmp_path, capsys):
    data = tmp_path / "texts.txt"
    texts = ["a short one", "a somewhat longer text about nothing much " * 3, "the quick brown fox jumps over the lazy dog " * 5]
    data.write_text("\n".join(texts * 4) + "\n")
    out = tmp_path / "lengths.json"
    assert main(["tune", "--model", f"hf:{minilm_path}", "--data", str(data), "--lengths", "--max-seq-len", "64", "--batch", "2",
                 "--seconds", "2", "--min-rounds", "3", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    rows = report["rows"]
    assert [row["unmerged_up_to"] for row in rows] == sorted(row["unmerged_up_to"] for row in rows) and rows[-1]["unmerged_up_to"] == 64
    # 0, 16 and 32 route these texts alike (only the 47-token ones merge, in the 48 bucket): one candidate, the largest
    assert [(row["unmerged_up_to"], row["merged_share"]) for row in rows] == [(32, pytest.approx(1 / 3)), (64, 0.0)]
    assert rows[-1]["merged_share"] == 0 and rows[-1]["cosine"] == pytest.approx(1.0, abs=1e-6)  # all unmerged: the plain model
    for row in rows:
        assert row["speedup"] == pytest.approx(row["plain_pass_ms"] / row["pass_ms"]) and 0 < row["cosine"] <= 1 + 1e-6
    assert report["unmerged_up_to"] == pick(rows) and report["data"]["items"] == 12
    expected = "--method none" if report["unmerged_up_to"] == 64 else f"--unmerged-up-to {report['unmerged_up_to']}"
    assert expected in report["export_command"] and "--max-seq-len 64" in report["export_command"]
    printed = capsys.readouterr().out
    assert "one pass in batches of 2 in file order, against the plain model at natural lengths" in printed
    assert report["export_command"] in printed


@pytest.mark.parametrize("args, message", [
    (["--methods", "pitome,tome"], "one method at one kept fraction"),
    (["--budgets", "8"], "kept fraction in \\(0, 1\\)"),
    (["--measure", "knn"], "--measure: not used by tune --lengths"),
    ([], "no tokenizer in"),  # a model directory without one
])
def test_bad_lengths_options_get_one_line(hf_dirs, tmp_path, capsys, args, message):
    data = tmp_path / "texts.txt"
    data.write_text("one text\n")
    assert main(["tune", "--model", f"hf:{hf_dirs['bert']}", "--data", str(data), "--lengths", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and re.search(message, err), err


def test_lengths_refuses_a_vision_model(hf_dirs, tmp_path):
    data = tmp_path / "texts.txt"
    data.write_text("one text\n")
    with pytest.raises(UsageError, match="text encoders"):
        tune_lengths(f"hf:{hf_dirs['vit']}", data, log=lambda *_: None)
    assert [p.name for p in tmp_path.iterdir()] == ["texts.txt"]
