"""`tokenfuse tune --lengths`: every length bucket merged against the plain model at natural
lengths, and the --unmerged-up-to with the least expected time on the data's own lengths."""

from __future__ import annotations

import json
import re

import pytest

from tokenfuse.cli import main
import numpy as np

from tokenfuse.engines.tune_lengths import bucket_rows, token_rows, tune_lengths, unmerged_up_to
from tokenfuse.exporter import UsageError

pytestmark = pytest.mark.xdist_group("minilm")


def _row(seq_len, share, plain, merged):
    return {"seq_len": seq_len, "share": share, "plain_p50_ms": plain, "merged_p50_ms": merged}


def test_the_pick_weighs_each_bucket_by_the_data_that_lands_in_it():
    short_loses = [_row(16, 0.5, 1.0, 2.0), _row(32, 0.3, 2.0, 2.5), _row(64, 0.2, 4.0, 3.0)]
    assert unmerged_up_to(short_loses) == 32  # merged only where it wins
    assert unmerged_up_to([_row(16, 0.5, 1.0, 0.9), _row(32, 0.5, 2.0, 1.5)]) == 0  # every bucket wins: merge all
    assert unmerged_up_to([_row(16, 0.5, 1.0, 1.1), _row(32, 0.5, 2.0, 2.5)]) == 32  # none wins: all unmerged
    # a bucket that wins between two that lose: one limit for all, the cheapest overall on this data
    assert unmerged_up_to([_row(16, 0.1, 1.0, 0.5), _row(32, 0.8, 2.0, 3.0), _row(64, 0.1, 4.0, 3.0)]) == 32
    # the data never reaches 64, where merging loses: it still counts a little, so it stays unmerged
    assert unmerged_up_to([_row(16, 0.0, 1.0, 1.2), _row(32, 1.0, 2.0, 2.0), _row(64, 0.0, 4.0, 5.0)]) == 64
    # a bucket without a merged graph (merging pays at none of its lengths) runs unmerged whatever the
    # pick, so it does not sway it (ties go to running more unmerged)
    assert unmerged_up_to([_row(16, 0.9, None, None), _row(32, 0.1, 2.0, 1.5)]) == 16
    assert unmerged_up_to([_row(16, 0.9, None, None), _row(32, 0.1, 2.0, 2.5)]) == 32


def test_a_bucket_is_measured_on_the_texts_that_fall_in_it(minilm_path):
    """The texts of (8, 16] at their own lengths, padded to the longest of them; a bucket no text
    reaches gets real tokens at its middle length."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(minilm_path)
    texts = ["a cat", "one two three four five six seven eight nine ten", "a dog sat on the mat", "hi"]
    lengths = np.array([len(ids) for ids in tokenizer(texts)["input_ids"]])
    inside = [i for i, n in enumerate(lengths) if 8 < n <= 16]
    assert inside == [1]
    rows, width = bucket_rows(tokenizer, texts, lengths, 8, 16, 3)
    expected = tokenizer([texts[1]])["input_ids"][0]
    assert width == lengths[1] and rows["input_ids"].tolist() == [expected] * 3 and rows["attention_mask"].all()
    rows, width = bucket_rows(tokenizer, texts, lengths, 32, 64, 2)
    assert width == 48 and rows["input_ids"].shape == (2, 48)


def test_rows_are_real_tokens_framed_as_a_text(minilm_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(minilm_path)
    rows = token_rows(tokenizer, ["a cat sat on the mat", "token merging"], 6, 3)
    assert rows["input_ids"].shape == (3, 6) and rows["attention_mask"].all()
    text = tokenizer(["a cat sat on the mat token merging"], add_special_tokens=False)["input_ids"][0]
    assert rows["input_ids"][0].tolist() == [tokenizer.cls_token_id, *text[:4], tokenizer.sep_token_id]
    assert rows["input_ids"][1, 1:5].tolist() == (text * 3)[4:8]  # the next window, wrapping round
    with pytest.raises(UsageError, match="no tokens"):
        token_rows(tokenizer, [""], 6, 2)


def test_tune_lengths_measures_every_bucket_and_gives_the_export_command(minilm_path, tmp_path, capsys):
    data = tmp_path / "texts.txt"
    data.write_text("\n".join(["a short one", "a somewhat longer text about nothing much " * 3] * 6) + "\n")
    out = tmp_path / "lengths.json"
    assert main(["tune", "--model", f"hf:{minilm_path}", "--data", str(data), "--lengths", "--max-seq-len", "48", "--batch", "2",
                 "--seconds", "1", "--min-rounds", "3", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert [row["seq_len"] for row in report["rows"]] == [16, 32, 48]
    assert sum(row["share"] for row in report["rows"]) == pytest.approx(1.0)
    for row, previous in zip(report["rows"], (0, 16, 32)):
        assert previous < row["text_tokens"] <= row["seq_len"]
        if row["merge_from"] is None:  # merging pays at no length of the bucket: nothing to measure
            assert row["merged_p50_ms"] is None and row["speedup"] == 1.0
            continue
        assert previous < row["merge_from"] <= row["seq_len"] and row["tokens_out"] < row["seq_len"]
        assert row["speedup"] == pytest.approx(row["plain_p50_ms"] / row["merged_p50_ms"]) and 0 < row["cosine"] <= 1 + 1e-6
    assert any(row["merge_from"] is not None for row in report["rows"])
    pick = report["unmerged_up_to"]
    assert pick == unmerged_up_to(report["rows"])
    expected = "--method none" if pick == 48 else f"--unmerged-up-to {pick}"
    assert expected in report["export_command"] and "--max-seq-len 48" in report["export_command"]
    printed = capsys.readouterr().out
    assert "per length bucket against the plain model at natural lengths" in printed and report["export_command"] in printed


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
