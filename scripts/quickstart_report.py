"""The quickstart's summary: the speedups `tokenfuse bench` measured on real texts, and how
closely the merged model's embeddings follow the unmerged model's (the Lee-50 documents that ship
in the gensim wheel, with their human similarity judgements).

    python scripts/quickstart_report.py out/minilm.onnx out/minilm-none.onnx --bench out/quickstart-bench-*.json
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import numpy as np
from evidence_text import embed, lee50


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("merged", type=Path)
    parser.add_argument("baseline", type=Path)
    parser.add_argument("--bench", type=Path, nargs="+", required=True, help="JSON reports of tokenfuse bench --data")
    args = parser.parse_args(argv)

    from transformers import AutoTokenizer

    from tokenfuse.exporter import Manifest
    from tokenfuse.exporter.buckets import describe_lengths, served_lengths

    manifest = Manifest.read(args.merged)
    longest = manifest.preprocess["seq_len"]
    tokenizer = AutoTokenizer.from_pretrained(manifest.preprocess["tokenizer"], local_files_only=True)
    docs, human, upper = lee50()
    lengths = [len(ids) for ids in tokenizer(docs)["input_ids"]]
    merged, unmerged = (embed(path, docs) for path in (args.merged, args.baseline))
    cosine = (merged * unmerged).sum(1)
    pearson = {name: float(np.corrcoef((v @ v.T)[upper], human)[0, 1]) for name, v in (("merged", merged), ("unmerged", unmerged))}

    print()
    print(manifest.model)
    buckets = manifest.buckets or []
    print(f"{manifest.method} r={manifest.settings['r']}, " + (
        "length-adaptive: " + ", ".join(f"{describe_lengths(ranges)} tokens unmerged" if b["natural_length"] else
                                        f"{describe_lengths(ranges)} merged at {b['seq_len']} (FLOPs ratio {b['budget']['flops_ratio']:.3f})"
                                        for b, ranges in zip(buckets, served_lengths(buckets)))
        if buckets else f"seq-len {longest}, FLOPs ratio {manifest.budget['flops_ratio']:.3f}"))
    reports: dict[str, list[dict]] = {}  # one per load order, by data file
    for path in args.bench:
        bench = json.loads(path.read_text())
        reports.setdefault(bench["inputs"]["path"], []).append(bench)
    for data, runs in reports.items():
        inputs, machine = runs[0]["inputs"], runs[0]["machine"]
        speedups = ", ".join(_speedup(rows) for rows in zip(*(run["results"] for run in runs)))
        orders = " / ".join(f"{run['opened_first']} loaded first" for run in runs)
        print(f"speed on {Path(data).name} ({inputs['items']} texts, median {inputs['tokens_p50']:.0f} tokens, p90 "
              f"{inputs['tokens_p90']:.0f}) against the plain model at natural lengths, {runs[0]['backend']}, {machine['cpu']} "
              f"({machine['cores']} cores), geometric mean of {len(runs)} run{'s' * (len(runs) > 1)} ({orders}): {speedups}")
    print(f"fidelity on the {len(docs)} Lee documents (gensim; {min(lengths)}-{max(lengths)} tokens, median "
          f"{np.median(lengths):.0f}): cosine of merged to unmerged embeddings mean {cosine.mean():.4f}, min {cosine.min():.4f}")
    print(f"Pearson with the 1225 human similarity judgements: merged {pearson['merged']:.3f}, unmerged {pearson['unmerged']:.3f}")


def _speedup(rows: tuple[dict, ...]) -> str:
    """One batch size over the runs: the geometric mean, each run's in brackets where several."""
    speedups = [row["speedup"] for row in rows]
    mean = statistics.geometric_mean(speedups)
    each = " (" + " / ".join(f"{speedup:.2f}" for speedup in speedups) + ")" if len(rows) > 1 else ""
    unstable = "" if all(row["stable"] for row in rows) else " (not stable)"
    return f"batch {rows[0]['batch']} {mean:.2f}x{each}{unstable}"


if __name__ == "__main__":
    main()
