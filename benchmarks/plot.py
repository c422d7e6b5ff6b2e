"""Draw the recorded benchmark figures (docs/results/*.json) as one PNG for docs/benchmarks.md.

python benchmarks/plot.py --out docs/benchmarks.png
"""

from __future__ import annotations

import argparse
import json
import os
import statistics

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

RESULTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "results")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="docs/benchmarks.png")
    args = parser.parse_args()
    with open(os.path.join(RESULTS, "save_restore_cpu.json")) as f:
        cpu = json.load(f)
    with open(os.path.join(RESULTS, "gpu_async_h200.json")) as f:
        gpu = json.load(f)
    gb = cpu["state_bytes"] / 1e9
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for ax, kind in zip(axes[:2], ("save", "restore"), strict=True):
        names = list(cpu[kind])
        rates = [gb / statistics.median(cpu[kind][n]) for n in names]
        colors = ["#888888" if n == "raw" else "#2b7bba" if n == "moai-ckpt" else "#d9a441" for n in names]
        ax.bar(names, rates, color=colors)
        ax.set_title(f"CPU {kind}, {gb:.2f} GB (median of {len(cpu[kind]['raw'])})")
        ax.set_ylabel("GB/s (higher is better)")
        ax.tick_params(axis="x", rotation=20)
    steady = lambda runs, key: statistics.median(r[key] for r in runs[1:] or runs)  # noqa: E731
    labels = ["pinned D2H\n(floor)", "moai-ckpt\nsave_async", "DCP\nasync_save"]
    stalls = [gpu["pinned_copy_floor_s"], steady(gpu["moai"], "stall"), steady(gpu["dcp"], "stall")]
    axes[2].bar(labels, stalls, color=["#888888", "#2b7bba", "#d9a441"])
    axes[2].set_title(f"training stall per save, {gpu['state_bytes'] / 1e9:.2f} GB, {gpu['device']}")
    axes[2].set_ylabel("seconds (lower is better)")
    for i, s in enumerate(stalls):
        axes[2].text(i, s, f"{s:.3f}", ha="center", va="bottom")
    fig.suptitle(f"moai-ckpt benchmarks, {gpu['date']}")
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
