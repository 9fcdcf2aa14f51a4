"""The quickstart's summary: the speedup `tokenfuse bench` measured, and how closely the merged
model's embeddings follow the unmerged model's on real text (the Lee-50 documents that ship in the
gensim wheel, with their human similarity judgements).

    python scripts/quickstart_report.py out/minilm.onnx out/minilm-none.onnx --bench out/quickstart-bench.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from evidence_text import embed, lee50


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("merged", type=Path)
    parser.add_argument("baseline", type=Path)
    parser.add_argument("--bench", type=Path, required=True, help="the JSON report of tokenfuse bench")
    args = parser.parse_args(argv)

    from transformers import AutoTokenizer

    manifest = json.loads(args.merged.with_suffix(".json").read_text())
    seq_len = manifest["settings"]["seq_len"]
    tokenizer = AutoTokenizer.from_pretrained(manifest["preprocess"]["tokenizer"], local_files_only=True)
    docs, human, upper = lee50()
    lengths = [len(ids) for ids in tokenizer(docs)["input_ids"]]
    merged, unmerged = (embed(path, tokenizer, docs, seq_len) for path in (args.merged, args.baseline))
    cosine = (merged * unmerged).sum(1)
    pearson = {name: float(np.corrcoef((v @ v.T)[upper], human)[0, 1]) for name, v in (("merged", merged), ("unmerged", unmerged))}

    bench = json.loads(args.bench.read_text())
    row = bench["results"][0]
    machine = bench["machine"]
    print()
    print(f"{manifest['model']}")
    print(f"{manifest['method']} r={manifest['settings']['r']}, seq-len {seq_len}: tokens {manifest['budget']['layers'][0]['tokens_in']} -> "
          f"{manifest['schedule'][-1]}, FLOPs ratio {manifest['budget']['flops_ratio']:.3f}, "
          f"{manifest['pooling']['mode']} pooling{', L2-normalised' if manifest['pooling']['normalize'] else ''}")
    print(f"speed (tokenfuse bench, {bench['backend']} {', '.join(bench['providers'] or [])}, batch {row['batch']}, "
          f"{machine['cpu']}, {machine['cores']} cores): merged p50 {row['merged']['p50_ms']:.1f} ms, unmerged "
          f"{row['baseline']['p50_ms']:.1f} ms: {row['speedup']:.2f}x (FLOPs ideal {row['flops_ideal_speedup']:.2f}x, "
          f"medians {'stable' if row['stable'] else 'not yet stable at the time limit'})")
    print(f"fidelity on the {len(docs)} Lee documents (gensim; {min(lengths)}-{max(lengths)} tokens, median "
          f"{np.median(lengths):.0f}, cut at {seq_len}): cosine of merged to unmerged embeddings mean {cosine.mean():.4f}, "
          f"min {cosine.min():.4f}")
    print(f"Pearson with the 1225 human similarity judgements: merged {pearson['merged']:.3f}, unmerged {pearson['unmerged']:.3f}")


if __name__ == "__main__":
    main()
