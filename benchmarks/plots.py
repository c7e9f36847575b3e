"""PNG plots of bench_bridge.py's results: latency against size, training cost as bars.

    python benchmarks/plots.py benchmarks/results/cpu/results.json   # redraw from saved results
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402


def caption(env: dict) -> str:
    return (
        f"{env['device_name']} ({env['device']}), torch {env['torch']}, "
        f"Python {env['python']}, {env['date'][:10]}"
    )


def plot_latency(results: dict, path: Path) -> None:
    rows = results["latency"]
    methods = list(dict.fromkeys(r["method"] for r in rows))
    colors = {name: f"C{i}" for i, name in enumerate(methods)}
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.8))

    def lines(ax, requires_grad: bool, names: list[str]) -> None:
        for name in names:
            points = sorted(
                (r["size_bytes"], r["median_ns"], r["q1_ns"], r["q3_ns"])
                for r in rows
                if r["method"] == name and r["requires_grad"] == requires_grad
            )
            sizes, median, q1, q3 = zip(*points)
            width = 2.5 if name == "bridge" else 1.2
            ax.plot(sizes, median, marker="o", markersize=3, label=name, color=colors[name],
                    linewidth=width)  # fmt: skip
            ax.fill_between(sizes, q1, q3, color=colors[name], alpha=0.15)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("tensor size (bytes)")
        ax.grid(True, which="both", alpha=0.3)

    for ax, requires_grad in zip(axes, (True, False)):
        lines(ax, requires_grad, methods)
        ax.set_yscale("log")
        ax.set_title(f"input {'requires' if requires_grad else 'does not require'} grad")
    # The aliases that cost under a microsecond overlap on a log scale.
    lines(axes[2], True, [m for m in ("detach", ".data", "bridge") if m in methods])
    axes[2].set_ylim(bottom=0)
    axes[2].set_title("detach, .data and bridge (linear scale, input requires grad)")
    axes[0].set_ylabel("time per call (ns), median and quartiles")
    axes[0].legend()
    fig.suptitle(f"Per-call latency from Python: {caption(results['environment'])}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_training(results: dict, path: Path) -> None:
    rows = results["training"]
    methods = list(dict.fromkeys(r["method"] for r in rows))
    modes = sorted({r["mode"] for r in rows})
    by = {(r["mode"], r["method"]): r for r in rows}
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    width = 0.8 / len(methods)
    for i, name in enumerate(methods):
        offsets = [mode + (i - (len(methods) - 1) / 2) * width for mode in modes]
        axes[0].bar(offsets, [by[(m, name)]["step_ms_median"] for m in modes], width, label=name)
        axes[1].bar(offsets, [by[(m, name)]["peak_bytes"] / 2**20 for m in modes], width, label=name)
    labels = ["0: loss on B", "1: loss on C", "2: loss on B + C"]
    for ax, ylabel in zip(axes, ("step time (ms), median", "peak memory in a step (MiB)")):
        ax.set_xticks(modes, [labels[m] for m in modes])
        ax.set_ylabel(ylabel)
        ax.grid(True, axis="y", alpha=0.3)
    axes[0].legend(fontsize=8)
    cfg = results["config"]
    fig.suptitle(
        f"Training step, width {cfg['width']}, batch {cfg['batch']}, B = {cfg['depth']} layers: "
        f"{caption(results['environment'])}",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_results(results: dict, folder: Path) -> list[Path]:
    """Write the plots the results have data for; return their paths."""
    written = []
    if results.get("latency"):
        plot_latency(results, folder / "latency.png")
        written.append(folder / "latency.png")
    if results.get("training"):
        plot_training(results, folder / "training.png")
        written.append(folder / "training.png")
    return written


if __name__ == "__main__":
    for name in sys.argv[1:]:
        source = Path(name)
        for path in plot_results(json.loads(source.read_text()), source.parent):
            print(path)
