"""Train the small ViT that the vision evidence uses: Fashion-MNIST, 197 tokens, fixed seed.

No pretrained ViT ships offline, so the evidence trains one here. The model is a timm
VisionTransformer, so it goes through the same adapter and export path as any timm ViT:
28x28 images upsampled to 56x56, 4x4 patches, giving 196 patches + CLS = 197 tokens, as many as
ViT-B/16 at 224; 4 layers, width 64, 2 heads; 10 classes.

    apt-get install dataset-fashion-mnist          # /usr/share/datasets/fashion-mnist (MIT)
    .venv/bin/python scripts/train_fashion_vit.py --out scripts/fashion_vit.pth [--epochs 2]
    python3 scripts/train_fashion_vit.py --device cuda --data DIR --epochs 30 --half   # on a GPU machine

On a GPU the whole training set stays on the device and steps run in bf16 autocast; --half stores
the weights in fp16 (load_state_dict converts them back), which halves the file.
"""

from __future__ import annotations

import argparse
import gzip
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

DATA = Path("/usr/share/datasets/fashion-mnist")
MODEL_ARGS = dict(img_size=56, patch_size=4, in_chans=1, num_classes=10, embed_dim=64, depth=4, num_heads=2)
MEAN, STD = 0.2860, 0.3530  # Fashion-MNIST training-set pixel statistics


def create_model():
    import timm

    return timm.create_model("vit_tiny_patch16_224", pretrained=False, **MODEL_ARGS)


def load_split(split: str, data: Path = DATA) -> tuple[torch.Tensor, torch.Tensor]:
    """Images as [N, 1, 56, 56] normalised floats, labels as int64 (idx files from the Debian package)."""
    prefix = "train" if split == "train" else "t10k"
    images_file, labels_file = data / f"{prefix}-images-idx3-ubyte.gz", data / f"{prefix}-labels-idx1-ubyte.gz"
    if not images_file.is_file():
        raise SystemExit(f"{images_file} is missing: apt-get install dataset-fashion-mnist")
    with gzip.open(images_file) as f:
        images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 1, 28, 28)
    with gzip.open(labels_file) as f:
        labels = np.frombuffer(f.read(), np.uint8, offset=8)
    x = torch.from_numpy(images.astype(np.float32) / 255.0)
    x = F.interpolate(x, size=(56, 56), mode="bilinear", align_corners=False)
    return (x - MEAN) / STD, torch.from_numpy(labels.astype(np.int64))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="scripts/fashion_vit.pth")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--data", type=Path, default=DATA, help="folder of the four Fashion-MNIST idx .gz files")
    parser.add_argument("--half", action="store_true", help="store the weights in fp16")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    torch.use_deterministic_algorithms(True, warn_only=device.type == "cuda")  # GPU attention backward kernels may not be
    x_train, y_train = (t.to(device) for t in load_split("train", args.data))
    x_test, y_test = (t.to(device) for t in load_split("test", args.data))
    model = create_model().to(device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    steps = args.epochs * (len(x_train) // args.batch)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=steps, pct_start=0.1)
    generator = torch.Generator().manual_seed(args.seed)
    started, step = time.time(), 0
    for epoch in range(args.epochs):
        model.train()
        order = torch.randperm(len(x_train), generator=generator).to(device)
        for i in range(len(x_train) // args.batch):
            index = order[i * args.batch : (i + 1) * args.batch]
            with autocast:
                loss = F.cross_entropy(model(x_train[index]), y_train[index], label_smoothing=0.1)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            step += 1
            if step % 100 == 0:
                print(f"epoch {epoch} step {step}/{steps} loss {loss.item():.3f} ({time.time() - started:.0f}s)", flush=True)
    model.eval()
    with torch.no_grad(), autocast:
        correct = sum(int((model(x_test[i : i + 500]).argmax(1) == y_test[i : i + 500]).sum()) for i in range(0, len(x_test), 500))
    print(f"test top-1 {correct / len(x_test):.4f} after {args.epochs} epochs, {time.time() - started:.0f}s")
    state = {k: v.half() if args.half and v.is_floating_point() else v for k, v in model.cpu().state_dict().items()}
    torch.save(state, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
