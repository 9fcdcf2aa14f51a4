"""An estimate, per phase, of the fused SimilarityEnergyMerge kernel's time (mergeStepKernel, one
launch per merge step), from the kernel's own launch plan and loop structure: FLOPs, bytes,
barriers on the critical path and blocks per image, at ViT-B/16 shapes on an H100 and a Jetson AGX
Orin, batch 1, 8 and 64, against the per-batch budgets of issue 22.

Not a measurement: no GPU has run these kernels. The device figures are datasheet numbers; the
latencies and per-instruction counts are stated assumptions (ASSUMPTIONS), so the table shows which
phase dominates and how that moves with the batch, not what a GPU will measure.
`tokenfuse plugin check` (and scripts/gpu_check.sh) times the kernel on a lent GPU.

    python scripts/roofline.py            # prints the table
    python scripts/roofline.py --write    # also docs/roofline.json and the plugin README's table
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "plugins" / "similarityEnergyMergePlugin" / "README.md"
BEGIN, END = "<!-- roofline:begin (scripts/roofline.py --write) -->", "<!-- roofline:end -->"


@dataclass(frozen=True)
class Device:
    name: str
    sms: int
    ghz: float
    dram_gbs: float
    shared_per_block: int  # opt-in dynamic + static shared memory per block, bytes
    source: str


DEVICES = [
    Device("H100 SXM5", 132, 1.755, 3350.0, 227 * 1024, "NVIDIA H100 datasheet; CUDA programming guide (sm_90: 227 KiB per block)"),
    Device("Jetson AGX Orin 64GB", 16, 1.3, 204.8, 163 * 1024,
           "NVIDIA Jetson AGX Orin data sheet; CUDA programming guide (sm_87: 163 KiB per block)"),
]

# Stated assumptions (cycles unless named otherwise); change them here and rerun.
ASSUMPTIONS = {
    "global_latency": 600,  # a load that hits L2 (HBM/DRAM misses cost more)
    "barrier": 40,  # __syncthreads of a 512-thread block
    "fma_latency": 4,  # dependent fp32 FMA
    "warp_issue_per_sm": 4,  # warp instructions per cycle (four schedulers, 128 fp32 lanes)
    "expm1_instructions": 24,  # F.elu's expm1f, per element
    "l2_bytes_per_cycle_per_sm": 64,  # one SM's share of L2 bandwidth
    "divide_instructions": 10,  # an IEEE fp32 division (F.normalize's v / |v|)
    "launch_us": 2.0,  # one kernel launch on a stream, outside CUDA graphs (H100)
}

# The kernel's constants (similarityEnergyMergeKernels.cu).
BLOCK_THREADS, SMALL_BLOCK_THREADS, SMALL_TOKENS = 384, 128, 64
TILE, CHUNK, GROUP_THREADS, WARP = 32, 16, 64, 32
STATIC_SHARED = 64  # kStaticShared: kept free of the dynamic shared memory


@dataclass(frozen=True)
class Shape:
    """ViT-B/16 at 224: N 197 tokens, C 768 channels, D 64 (keys averaged over heads), fp16."""
    n: int = 197
    c: int = 768
    d: int = 64
    bytes_per_element: int = 2
    r: int = 19  # PiToMe r 0.9, the first merging layer: K 178


BUDGET_US = {1: 10.0, 8: 3.0, 64: 15.0}  # issue 22: 5% of a ViT-B fp16 layer on an H100 (batch 64: 15-20 us)


def shared_layout_bytes(n: int, groups: int, scores_in_shared: bool) -> int:
    """SharedLayout of the kernel: the N x N scores when they fit, then max(staging, per-token arrays)."""
    align = lambda b: (b + 15) // 16 * 16  # noqa: E731
    staging = align(4 * n) + groups * 2 * TILE * (CHUNK + 4) * 4
    tokens = align(8 * n) + 8 * align(4 * (n + 1)) + 4 * align(n)
    return (align(4 * n * n) if scores_in_shared else 0) + max(staging, tokens)


def launch_plan(batch: int, n: int, device: Device) -> dict:
    """planLaunch of the kernel: blocks per image, threads, whether the N x N matrix is in shared memory."""
    threads = SMALL_BLOCK_THREADS if n <= SMALL_TOKENS else BLOCK_THREADS
    groups = threads // GROUP_THREADS
    tiles = math.ceil(n / TILE)
    pairs = tiles * (tiles + 1) // 2
    fill = device.sms // batch
    split = min(pairs, fill) if fill > 1 else 1
    in_shared = shared_layout_bytes(n, groups, True) <= device.shared_per_block - STATIC_SHARED
    return {"blocks_per_image": split, "threads": threads, "groups": groups, "tiles": tiles, "pairs": pairs,
            "scores_in_shared": in_shared, "shared_bytes": shared_layout_bytes(n, groups, in_shared),
            "waves": math.ceil(batch * split / device.sms)}


def phases(method: str, batch: int, shape: Shape, device: Device) -> tuple[dict, list[dict]]:
    """The last block's critical path, phase by phase: cycles and barriers."""
    a = ASSUMPTIONS
    plan = launch_plan(batch, shape.n, device)
    n, d, threads, groups, split = shape.n, shape.d, plan["threads"], plan["groups"], plan["blocks_per_image"]
    warps = threads // WARP
    issue = a["warp_issue_per_sm"]
    vector = 16 // shape.bytes_per_element
    out = []

    def add(name, cycles, barriers=0, note=""):
        out.append({"phase": name, "cycles": cycles + barriers * a["barrier"], "barriers": barriers, "note": note})

    add("row norms", math.ceil(n / threads) * (a["global_latency"] + (d // vector) + d * a["fma_latency"]), 1,
        "a thread per row, D loads in flight, D dependent FMAs")
    # Tiles: the block's pairs, `groups` at a time; per 16-dimension chunk a staging load and 16 x 16 FMAs per thread.
    block_pairs = math.ceil(plan["pairs"] / split)
    iterations = math.ceil(block_pairs / groups)
    active = min(groups, block_pairs)
    chunks = math.ceil(d / CHUNK)
    store = (2 * TILE * CHUNK // GROUP_THREADS) * a["divide_instructions"]  # divisions by the row norms
    fma_per_warp = CHUNK * 16 + CHUNK // 4 * 8  # 16 FMAs per dimension, 8 shared 16-byte reads per four
    compute = max(fma_per_warp * 2 * active / issue, CHUNK * 16 + 64)
    # Each chunk's loads are issued a chunk ahead, so only the first waits a whole global latency.
    per_iteration = a["global_latency"] + chunks * (store + compute) + (chunks - 1) * max(0, a["global_latency"] - compute)
    add("similarity tiles", iterations * per_iteration, iterations * chunks * 2,
        f"{block_pairs} of {plan['pairs']} tile pairs, {active} groups at a time, {chunks} chunks each, loaded a chunk ahead")
    if method == "pitome":
        affinity = max(16 * a["expm1_instructions"] * 2 * active / issue, 16 * a["expm1_instructions"])
        sums = TILE * a["fma_latency"] + 32
        add("energy tiles", iterations * (affinity + sums), iterations * 2, "16 expm1 per thread, 32-leaf tree sums")
    copy = split > 1 and plan["scores_in_shared"] and method != "pitome"
    if split > 1:
        copy_cycles = (4 * n * n / a["l2_bytes_per_cycle_per_sm"] + a["global_latency"]) if copy else 0
        add("ticket" + (" + copy N x N" if copy else ""), a["global_latency"] + copy_cycles, 1,
            "the last block of the image goes on" + (", copying the matrix into shared memory" if copy else ""))
    add("match init", 50, 1)
    rows_from = "shared" if (plan["scores_in_shared"] and (split == 1 or copy)) else "L2"

    def row_pass(rows: int) -> float:
        """A warp per row: each lane reads N / 32 scores and a 5-step shuffle argmax."""
        return math.ceil(rows / warps) * ((a["global_latency"] if rows_from == "L2" else 60) + 5 * 30)

    def counting(ways: int) -> float:
        """An O(N) count per token, `ways` threads per token: 3 instructions per step, the busy warps sharing the schedulers."""
        busy = min(warps, math.ceil(n * ways / WARP))
        return n / ways * 3 * max(1.0, busy / issue)

    ways = 1
    while ways < WARP and 2 * ways * n <= threads:
        ways *= 2
    ranking = counting(ways) + 30 * math.log2(ways)
    count_per_token = counting(1)
    if method == "pitome":
        add("energy rows", a["global_latency"] + 8 * a["fma_latency"], 0, "a thread per row adds its tiles' partial sums")
        add("energy ranking", ranking, 2, f"{ways} threads per token")
        add("partners of the r sources", row_pass(shape.r), 1, f"rows from {rows_from}")
    elif method == "tome":
        add("best match in B", row_pass(n // 2), 1, f"A rows from {rows_from}")
        add("ranking + slot places", ranking + count_per_token, 2)
    else:  # crossget
        add("redundancy, ranking, masked maximum, ranking", 2 * row_pass(n) + 2 * ranking, 6, f"rows from {rows_from}")
        add("partners + B places", row_pass(shape.r) + count_per_token, 1)
    add("targets, owners, sources", count_per_token / 2, 2)
    # Merge: each of the image's S blocks reads its share of the slots' members and writes its rows,
    # bounded by one SM's share of L2 bandwidth (the GPU-wide DRAM bound is applied in estimate()).
    k = shape.n - shape.r
    bytes_moved = (shape.n + k) * shape.c * shape.bytes_per_element
    if split > 1:
        add("publish + wait", 2 * a["global_latency"], 1, "the matching's slots through the workspace")
    add("merge", bytes_moved / split / a["l2_bytes_per_cycle_per_sm"] + a["global_latency"], 0,
        f"{bytes_moved / 1e3:.0f} KB over {split} block(s)")
    return plan, out


def estimate(method: str, batch: int, shape: Shape, device: Device) -> dict:
    plan, steps = phases(method, batch, shape, device)
    kernel_us = sum(step["cycles"] for step in steps) / (device.ghz * 1e3)
    # The GPU-wide bounds: the batch's FLOPs and DRAM bytes (x in, merged x out, metric in).
    k = shape.n - shape.r
    flops = batch * (2 * shape.n ** 2 * shape.d + 2 * (shape.n + k) * shape.c)
    dram = batch * ((shape.n + k) * shape.c + shape.n * shape.d) * shape.bytes_per_element
    dram_us = dram / (device.dram_gbs * 1e3)
    waves = plan["waves"]
    total_us = max(kernel_us * waves, dram_us)
    return {"device": device.name, "method": method, "batch": batch, **plan, "barriers": sum(s["barriers"] for s in steps),
            "phases": [{**s, "us": round(s["cycles"] / (device.ghz * 1e3), 2)} for s in steps],
            "flops_per_image": flops // batch, "dram_bytes_per_image": dram // batch, "dram_bound_us": round(dram_us, 2),
            "kernel_us": round(total_us, 1), "launches": 1, "memsets": int(plan["blocks_per_image"] > 1),
            "budget_us": BUDGET_US.get(batch) if device.name.startswith("H100") else None}


def table(rows: list[dict]) -> str:
    lines = ["| device | batch | method | blocks per image | N x N in | MFLOP per image | DRAM KB per image | barriers on the critical path | "
             "largest phases | estimate | budget |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        top = sorted(row["phases"], key=lambda p: -p["us"])[:2]
        largest = ", ".join(f"{p['phase']} {p['us']:.1f} us" for p in top)
        budget = f"{row['budget_us']:g} us" if row["budget_us"] else "-"
        where = "shared" if row["scores_in_shared"] else "L2"
        lines.append(f"| {row['device']} | {row['batch']} | {row['method']} | {row['blocks_per_image']} | {where} | "
                     f"{row['flops_per_image'] / 1e6:.1f} | {row['dram_bytes_per_image'] / 1e3:.0f} | {row['barriers']} | "
                     f"{largest} | **{row['kernel_us']:.1f} us** | {budget} |")
    return "\n".join(lines)


def estimates(shape: Shape = Shape()) -> list[dict]:
    return [estimate(method, batch, shape, device) for device in DEVICES for batch in (1, 8, 64)
            for method in ("pitome", "tome", "crossget")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="write docs/roofline.json and the plugin README's table")
    args = parser.parse_args()
    shape = Shape()
    rows = estimates(shape)
    text = table(rows)
    print(text)
    if args.write:
        (ROOT / "docs" / "roofline.json").write_text(json.dumps(
            {"estimate": True, "shape": shape.__dict__, "assumptions": ASSUMPTIONS,
             "devices": [device.__dict__ for device in DEVICES], "rows": rows}, indent=1) + "\n")
        readme = README.read_text()
        start, stop = readme.index(BEGIN) + len(BEGIN), readme.index(END)
        README.write_text(readme[:start] + "\n" + text + "\n" + readme[stop:])


if __name__ == "__main__":
    main()
