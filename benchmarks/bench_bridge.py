"""Benchmark bridge against detach, .data and the set_ trick: latency, memory, kernels, training.

Every method runs side by side in one run, on the same tensors, in shuffled order each
repeat, so ratios compare like with like. Tables go to stdout (Markdown), progress and
the time left to stderr, and results.json, latency.png and training.png to
``benchmarks/results/local/<device>/``, which git ignores. The committed results in
``benchmarks/results/<device>/`` change only with --commit-results (``make bench-results``).

    python benchmarks/bench_bridge.py                   # CPU, and CUDA if torch sees a GPU
    python benchmarks/bench_bridge.py --device cuda --quick
    python benchmarks/bench_bridge.py --sizes 4B,1MB,256MB --sections latency,memory
    python benchmarks/bench_bridge.py --commit-results  # then python benchmarks/update_readme.py
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from measure import (
    CONFIGS, METHODS, Config, bench_attached, bench_latency, bench_memory, parse_size, synchronize,
)  # fmt: skip
from fallback import bench_fallback
from plugged import bench_test_device
from progress import Progress, duration
from report import check_bars, report
from routing import SHAPES as ROUTING_SHAPES, bench_routing
from rotation import bench_rotation
from ste import COMPILED_DTYPES as STE_COMPILED_DTYPES, DTYPES as STE_DTYPES, bench_straight_through
from training import CUTS, MODES, bench_training, step_seconds

RESULTS = Path(__file__).resolve().parent / "results"  # committed: what the README shows
LOCAL = RESULTS / "local"  # ignored by git: where a run writes unless told otherwise
SECTIONS = ("latency", "memory", "training", "attached", "straight_through", "routing", "rotation", "test_device", "fallback")
SIZES = {
    "cpu": "4B,64B,1KB,16KB,256KB,4MB,64MB,256MB",
    "cuda": "4B,64B,1KB,16KB,256KB,4MB,64MB,256MB,1GB",
}
QUICK_SIZES = "4B,4MB,256MB"


def parse_sizes(text: str) -> list[int]:
    try:
        return [parse_size(size) for size in text.split(",")]
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def environment(device: str) -> dict[str, str]:
    # A copy of the tree without .git (a lent GPU machine) names its commit by variable.
    commit = os.environ.get("GRADBRIDGE_EXT_COMMIT", "")
    if not commit:
        try:
            commit = subprocess.run(
                ["git", "describe", "--always", "--dirty"],
                cwd=RESULTS.parent, capture_output=True, text=True, check=True,
            ).stdout.strip()  # fmt: skip
        except (OSError, subprocess.CalledProcessError):
            commit = "unknown"
    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": device,
        "device_name": torch.cuda.get_device_name() if device == "cuda" else cpu_model(),
        "cpu": cpu_model(),
        "cpu_threads": str(torch.get_num_threads()),
        "gradbridge_ext_commit": commit,
    }
    if device == "cuda":
        env["cuda"] = str(torch.version.cuda)
    return env


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# NOTE [the estimate]: each section's seconds from its shape (blocks, sizes, steps) and
# two probes of this machine as it is now: how fast it fills memory and how long one
# training step takes. Given the fill speed and step time of the committed CPU run, it
# says latency 61 s, training 95 s, attached 45 s, where that run spent 60, 91 and 39 s
# inside its timed blocks and steps. Each probe lasts milliseconds, so on a busy machine
# the estimate can be off several times over; the time left corrects itself as it goes.
BLOCK = 1.2  # a timed block lasts about this many block_s (rounding, timer, sync)
INPUT_FILLS = 8  # making an input (randn, then * 2) takes this many zero fills of its size
BACKWARD_FILLS = 1.4  # forward + backward of an attached form, in fills of its size
PROFILED_CALL_S = 0.04  # one call under the profiler, on top of the call
ATTACHED_LAYERS = 5
# One repeat of a routing shape's timers (the idiom's forward, its forward + backward, bridge's forward
# + backward) in fills of x's size: 14 at the transformer shape on a 2-core CPU (0.9 s a repeat).
ROUTING_FILLS = 14


def fill_seconds_per_byte(device: str) -> float:
    t = torch.empty(2**22, device=device)  # 16 MB
    times = []
    for _ in range(3):
        synchronize(device)
        start = time.perf_counter()
        torch.zeros_like(t)
        synchronize(device)
        times.append(time.perf_counter() - start)
    return min(times) / t.nbytes


def estimate(device: str, sizes: list[int], config: Config, sections: list[str]) -> dict[str, float]:
    """Roughly how many seconds each section will take; see NOTE [the estimate]."""
    with torch.random.fork_rng(devices=[torch.cuda.current_device()] if device == "cuda" else []):
        per_byte = fill_seconds_per_byte(device)
        step_s = step_seconds(device, config) if {"training", "straight_through"} & set(sections) else 0.0
    block = BLOCK * config.block_s
    ends = sizes[0] + sizes[-1]  # the attached forms' sizes
    timers = 2 * len(sizes) * len(METHODS)  # requires grad and not
    # A block lasts block_s, or one call where that is longer: the set_ trick's fill.
    set_trick_blocks = 2 * sum(max(block, nbytes * per_byte) for nbytes in sizes)
    seconds = {
        "latency": config.repeats * ((timers - 2 * len(sizes)) * block + set_trick_blocks)
                   + timers * 2 * config.block_s + 2 * INPUT_FILLS * sum(sizes) * per_byte,
        "memory": len(sizes) * len(METHODS) * PROFILED_CALL_S + (INPUT_FILLS + 3) * sum(sizes) * per_byte,
        # Modes 0 and 1 train less of the model than the probed mode 2: 0.85 of it on average.
        "training": 0.85 * len(MODES) * len(CUTS) * (config.train_steps + 2) * step_s,
        "attached": config.repeats * ATTACHED_LAYERS * (4 * block + BACKWARD_FILLS * ends * per_byte)
                    + ATTACHED_LAYERS * 4 * 2 * config.block_s + INPUT_FILLS * ends * per_byte,
        # Unmeasured guesses: the trick's two fills, twice a block per spelling, each input made
        # twice; a BitLinear step as about 3 of the probed steps (bf16 on CPU is slower still);
        # compiling the two models and the three pairs, a minute; three pairs' blocks.
        "straight_through": config.repeats * sum(8 * block + 2 * 2 * nbytes * per_byte for nbytes in sizes)
                            + 2 * INPUT_FILLS * sum(sizes) * per_byte
                            + (len(STE_DTYPES) + len(STE_COMPILED_DTYPES)) * 2 * (config.train_steps + 2) * 3 * step_s
                            + 60,
        # Per repeat and shape, four blocks and ROUTING_FILLS fills of x; calibration, set-up and profiling,
        # three repeats more.
        "routing": (config.repeats + 3) * sum(4 * block + ROUTING_FILLS * torch.Size(shape).numel() * dtype.itemsize
                                              * per_byte for shape, _, dtype in ROUTING_SHAPES.values()),
        # Unmeasured guess: four shapes of two methods, blocks of forward + backward, and VectorQuantize's steps.
        "rotation": config.repeats * (8 * block + 2 * 3 * step_s) + 30,
        # Building the test device, half a minute; three methods at two sizes.
        "test_device": 30 + config.repeats * 2 * 3 * block + 2 * config.block_s * 6,
        # Nine methods at two sizes, each calibrated once.
        "fallback": config.repeats * 2 * 9 * block + 2 * config.block_s * 9,
    }  # fmt: skip
    return {section: seconds[section] for section in sections if section in sections_for(device)}


def sections_for(device: str) -> tuple[str, ...]:
    """The test device is host memory: measured once, beside the CPU."""
    return SECTIONS if device == "cpu" else tuple(s for s in SECTIONS if s != "test_device")


def run_device(device: str, args: argparse.Namespace, sections: list[str], progress: Progress) -> dict:
    """Every section on one device, into results; a section that fails is recorded and skipped."""
    config = CONFIGS[(device, args.quick)]
    sizes = args.sizes or parse_sizes(QUICK_SIZES if args.quick else SIZES[device])
    results: dict = {"environment": environment(device), "config": asdict(config), "quick": args.quick}
    random.seed(0)
    runs = {
        "latency": lambda: bench_latency(device, sizes, config, progress.step),
        "memory": lambda: bench_memory(device, sizes, progress.step),
        "training": lambda: bench_training(device, config, progress.step),
        "attached": lambda: bench_attached(device, sizes, config, progress.step, progress.note),
        "straight_through": lambda: bench_straight_through(device, sizes, config, progress.step, progress.note),
        "routing": lambda: bench_routing(device, config, progress.step),
        "rotation": lambda: bench_rotation(device, config, progress.step, progress.note),
        "test_device": lambda: bench_test_device(sizes, config, progress.step),
        "fallback": lambda: bench_fallback(sizes, config, progress.step, device, progress.note),
    }
    for section in (s for s in sections if s in sections_for(device)):
        progress.begin(f"{device} {section}")
        try:
            results[section] = runs[section]()
        except Exception as error:  # keep the other sections; fail at the end
            progress.note(f"{device} {section} failed: {error!r}")
            results.setdefault("errors", {})[section] = repr(error)
        progress.end()
    results["bars"] = check_bars(device, results)
    return results


def write(results: dict, out: Path, progress: Progress) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    written = [out / "results.json"]
    try:
        from plots import plot_results
    except ImportError as error:  # matplotlib missing: tables and JSON still stand
        progress.note(f"no plots ({error}); `pip install matplotlib` for them")
    else:
        written += plot_results(results, out)
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda", "all"), default="all",
                        help="all (default): CPU, and CUDA if torch sees a GPU")  # fmt: skip
    parser.add_argument("--sizes", type=parse_sizes, help="comma-separated sizes, e.g. 4B,1MB,1GB "
                        f"(default: CPU {SIZES['cpu']}; CUDA adds 1GB)")  # fmt: skip
    parser.add_argument("--quick", action="store_true",
                        help=f"fewer repeats, sizes {QUICK_SIZES}, a smaller model")  # fmt: skip
    parser.add_argument("--sections", default=",".join(SECTIONS),
                        help=f"comma-separated subset of {','.join(SECTIONS)}")  # fmt: skip
    out = parser.add_mutually_exclusive_group()
    out.add_argument("--out", type=Path, default=LOCAL,
                     help="results folder; each device writes to <out>/<device>/ "
                     f"(default: {LOCAL.relative_to(RESULTS.parent.parent)}, ignored by git)")  # fmt: skip
    out.add_argument("--commit-results", dest="out", action="store_const", const=RESULTS,
                     help=f"write to the committed {RESULTS.relative_to(RESULTS.parent.parent)}/<device>/ "
                     "instead; then run benchmarks/update_readme.py")  # fmt: skip
    args = parser.parse_args(argv)
    sections = [s for s in args.sections.split(",") if s]
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        parser.error(f"--sections: unknown {sorted(unknown)}; choose from {list(SECTIONS)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device")
    if args.out == RESULTS and (args.quick or args.sizes or set(sections) != set(SECTIONS)):
        parser.error("--commit-results: the committed results are a full run; "
                     "drop --quick, --sizes and --sections")
    devices = {"all": ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])}.get(
        args.device, [args.device]
    )

    estimates = {}
    for device in devices:
        sizes = args.sizes or parse_sizes(QUICK_SIZES if args.quick else SIZES[device])
        for section, seconds in estimate(device, sizes, CONFIGS[(device, args.quick)], sections).items():
            estimates[f"{device} {section}"] = seconds
    progress = Progress(estimates)
    progress.note(f"{', '.join(devices)}, torch {torch.__version__}: this run should take about "
                  f"{duration(sum(estimates.values()))}")  # fmt: skip
    failed = False
    for device in devices:
        results = run_device(device, args, sections, progress)
        failed |= "errors" in results
        written = write(results, args.out / device, progress)
        print(report(results))
        print("\nwritten: " + ", ".join(str(p) for p in written))
        sys.stdout.flush()
    progress.note(f"done in {duration(progress.elapsed())} (estimated {duration(sum(estimates.values()))})")
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
