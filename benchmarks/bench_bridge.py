"""Benchmark bridge against detach, .data and the set_ trick: latency, memory, kernels, training.

Every method runs side by side in one run, on the same tensors, in shuffled order each
repeat, so ratios compare like with like. Results go to stdout (Markdown) and to
``benchmarks/results/<device>/`` (``results.json``, ``latency.png``, ``training.png``).

    python benchmarks/bench_bridge.py                   # CPU, and CUDA if torch sees a GPU
    python benchmarks/bench_bridge.py --device cuda --quick
    python benchmarks/bench_bridge.py --sizes 4B,1MB,256MB --sections latency,memory
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time
import timeit
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.profiler import ProfilerActivity, profile

import gradbridge_ext

RESULTS = Path(__file__).resolve().parent / "results"
SECTIONS = ("latency", "memory", "training", "attached")
UNITS = {"B": 1, "KB": 2**10, "MB": 2**20, "GB": 2**30}
SIZES = {
    "cpu": "4B,64B,1KB,16KB,256KB,4MB,64MB,256MB",
    "cuda": "4B,64B,1KB,16KB,256KB,4MB,64MB,256MB,1GB",
}
QUICK_SIZES = "4B,4MB,256MB"


def set_trick(t: Tensor) -> Tensor:
    """The seed's trick: a zero-filled copy of t, then re-pointed at t's storage."""
    with torch.no_grad():
        r = torch.zeros_like(t)
        r.set_(t)
    return r


def empty_set(t: Tensor) -> Tensor:
    """The cheapest pure-PyTorch alias with its own version counter: no copy, one op more."""
    with torch.no_grad():
        return t.new_empty(0).set_(t)


# Each method as its user writes it; timeit runs these very statements, so a
# method pays for no wrapper the others do not.
METHODS = {
    "detach": "t.detach()",
    ".data": "t.data",
    "set_ trick": "set_trick(t)",
    "new_empty.set_": "empty_set(t)",
    "bridge": "bridge(t)",
    "BridgeFunction": "BridgeFunction.apply(t)",
}
NAMESPACE = {
    "set_trick": set_trick,
    "empty_set": empty_set,
    "bridge": gradbridge_ext.bridge,
    "BridgeFunction": gradbridge_ext.BridgeFunction,
}
BASELINE = "detach"


def as_function(stmt: str) -> Callable[[Tensor], Tensor]:
    """A method's statement as a function of t, for what is not timed per call."""
    return eval(f"lambda t: {stmt}", dict(NAMESPACE))


@dataclass
class Config:
    repeats: int  # interleaved repeats per (size, method); medians are over these
    block_s: float  # each repeat times enough calls to fill this long
    train_steps: int
    width: int
    batch: int
    depth: int  # linear layers in B


CONFIGS = {
    ("cpu", False): Config(repeats=41, block_s=0.01, train_steps=120, width=512, batch=512, depth=4),
    ("cpu", True): Config(repeats=5, block_s=0.005, train_steps=4, width=256, batch=256, depth=2),
    ("cuda", False): Config(repeats=21, block_s=0.02, train_steps=60, width=2048, batch=4096, depth=4),
    ("cuda", True): Config(repeats=5, block_s=0.005, train_steps=6, width=1024, batch=1024, depth=2),
}  # fmt: skip


def progress(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def parse_size(text: str) -> int:
    """'4B', '64KB', '1GB' -> bytes."""
    text = text.strip().upper()
    for unit in sorted(UNITS, key=len, reverse=True):
        if text.endswith(unit) and text[: -len(unit)].isdigit():
            return int(text[: -len(unit)]) * UNITS[unit]
    raise argparse.ArgumentTypeError(f"size {text!r}: expected a number and B, KB, MB or GB")


def parse_sizes(text: str) -> list[int]:
    return [parse_size(size) for size in text.split(",")]


def format_size(nbytes: int) -> str:
    for unit in ("GB", "MB", "KB"):
        if nbytes >= UNITS[unit] and nbytes % UNITS[unit] == 0:
            return f"{nbytes // UNITS[unit]}{unit}"
    return f"{nbytes}B"


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


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


def make_input(nbytes: int, requires_grad: bool, device: str) -> Tensor:
    """A float32 tensor of nbytes: a non-leaf of a leaf that requires grad, or a plain one."""
    t = torch.randn(max(1, nbytes // 4), device=device)
    if requires_grad:
        t = t.requires_grad_().mul(2)
    return t


# ---------------------------------------------------------------------------- latency


def quartiles(values: list[float]) -> tuple[float, float, float]:
    q1, median, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, median, q3


def paired_ratio(samples: list[float], baseline: list[float]) -> float:
    """Median over repeats of sample / baseline from the same repeat: drift cancels."""
    return statistics.median(a / b for a, b in zip(samples, baseline, strict=True))


def calls_per_block(block: Callable[[tuple, int], float], key: tuple, block_s: float) -> int:
    """How many calls fill block_s, from a run of at least a tenth of it.

    One call alone would mostly time the timer and, on CUDA, the synchronize.
    """
    block(key, 1)  # warm-up: first-call costs, the allocator's first block
    number = 1
    while (per_call := block(key, number)) * number < block_s / 10:
        number *= 10
    return max(1, round(block_s / per_call))


def ratio_interval(samples: list[float], baseline: list[float]) -> tuple[float, float]:
    """A 95% bootstrap interval for paired_ratio: how far noise alone moves it."""
    ratios = [a / b for a, b in zip(samples, baseline, strict=True)]
    rng = random.Random(0)
    medians = sorted(statistics.median(rng.choices(ratios, k=len(ratios))) for _ in range(1000))
    return medians[25], medians[974]


def time_interleaved(
    timers: dict[tuple, timeit.Timer], groups: list[tuple], names: list[str],
    device: str, config: Config, label: str,
) -> tuple[dict[tuple, list[float]], dict[tuple, int]]:
    """Nanoseconds per call for each (*group, name) timer, one block per repeat, and calls per block.

    The groups run in shuffled order each repeat, so drift over the run moves
    them alike, and a group's methods back to back in shuffled order, so each
    paired ratio compares blocks timed moments apart.
    """

    def block(key: tuple, number: int) -> float:
        # The sync puts CUDA kernels (the set_ trick's fill) inside the time.
        synchronize(device)
        start = time.perf_counter()
        timers[key].timeit(number)
        synchronize(device)
        return (time.perf_counter() - start) / number

    numbers = {key: calls_per_block(block, key, config.block_s) for key in timers}
    samples: dict[tuple, list[float]] = {key: [] for key in timers}
    for repeat in range(config.repeats):
        for group in random.sample(groups, len(groups)):
            for name in random.sample(names, len(names)):
                key = (*group, name)
                samples[key].append(block(key, numbers[key]) * 1e9)
        progress(f"{label} {device}: repeat {repeat + 1}/{config.repeats}")
    return samples, numbers


def bench_latency(device: str, sizes: list[int], config: Config) -> list[dict]:
    cases = [(nbytes, requires_grad) for nbytes in sizes for requires_grad in (True, False)]
    timers = {}
    for case in cases:
        namespace = dict(NAMESPACE, t=make_input(*case, device))
        for name, stmt in METHODS.items():
            timers[(*case, name)] = timeit.Timer(stmt, globals=namespace)

    samples, numbers = time_interleaved(timers, cases, list(METHODS), device, config, "latency")
    rows = []
    for (nbytes, requires_grad, name), ns in samples.items():
        q1, median, q3 = quartiles(ns)
        rows.append({
            "size_bytes": nbytes, "requires_grad": requires_grad, "method": name,
            "median_ns": median, "q1_ns": q1, "q3_ns": q3,
            "ratio_to_detach": paired_ratio(ns, samples[(nbytes, requires_grad, BASELINE)]),
            "calls_per_repeat": numbers[(nbytes, requires_grad, name)], "samples_ns": ns,
        })  # fmt: skip
    return rows


# ----------------------------------------------------------------- memory and kernels


def bench_memory(device: str, sizes: list[int]) -> list[dict]:
    """One call per (size, method): bytes allocated, peak, ops dispatched, CUDA kernels."""
    rows = []
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    for nbytes in sizes:
        t = make_input(nbytes, True, device)
        for name in METHODS:
            fn = as_function(METHODS[name])
            fn(t)  # warm-up, so no first-call allocation lands in the measurement
            row = {"size_bytes": nbytes, "method": name}
            if device == "cuda":
                synchronize(device)
                torch.cuda.reset_peak_memory_stats()
                before = torch.cuda.memory_allocated()
                allocated_before = torch.cuda.memory_stats()["allocated_bytes.all.allocated"]
                result = fn(t)
                synchronize(device)
                row["allocated_bytes"] = (
                    torch.cuda.memory_stats()["allocated_bytes.all.allocated"] - allocated_before
                )
                row["peak_bytes"] = torch.cuda.max_memory_allocated() - before
                row["memory_source"] = "CUDA caching allocator stats"
                del result
            with profile(activities=activities, profile_memory=True) as prof:
                result = fn(t)
                synchronize(device)
            del result
            events = prof.events()
            if device == "cpu":
                row["allocated_bytes"], row["peak_bytes"] = cpu_allocations(events)
                row["memory_source"] = (
                    "torch.profiler memory events: tensor storage from the CPU allocator"
                )
            # Operators are namespaced (aten::zeros_like); the profiler's other
            # CPU events (CUDA runtime calls, its own buffers) are not.
            ops = [e for e in events if e.device_type == torch.autograd.DeviceType.CPU
                   and "::" in e.name]  # fmt: skip
            row["top_level_ops"] = [e.name for e in ops if e.cpu_parent is None]
            row["ops"] = len(ops)
            if device == "cuda":
                row["kernels"] = sum(
                    1 for e in events if e.device_type == torch.autograd.DeviceType.CUDA
                )
            rows.append(row)
        progress(
            f"memory {device} {format_size(nbytes):>6}  "
            + "  ".join(f"{r['method']} {r['allocated_bytes']}B" for r in rows[-len(METHODS):])
        )
        del t
    return rows


# ----------------------------------------------------------------------- training


# The attached zero keeps B's graph alive until backward; training measures what that costs.
CUTS = {"no cut": "t", **METHODS, "bridge, attach=True": "bridge(t, attach=True)"}
MODES = {0: "loss on B", 1: "loss on C", 2: "loss on B + C"}


class ABC(nn.Module):
    """The seed's A -> B -> C, scaled up: C learns from B's output through a cut."""

    def __init__(self, width: int, depth: int) -> None:
        super().__init__()
        self.A = nn.Sequential(nn.Linear(width, width), nn.ReLU())
        self.B = nn.Sequential(*[m for _ in range(depth) for m in (nn.Linear(width, width), nn.ReLU())])
        self.C = nn.Linear(width, width)

    def forward(self, x: Tensor, cut: Callable[[Tensor], Tensor]) -> tuple[Tensor, Tensor]:
        b = self.B(self.A(x))
        return b, self.C(cut(b))


def bench_training(device: str, config: Config) -> list[dict]:
    rows = []
    torch.manual_seed(0)
    x = torch.randn(config.batch, config.width, device=device)
    target_b = torch.randn(config.batch, config.width, device=device)
    target_c = torch.randn(config.batch, config.width, device=device)
    init = ABC(config.width, config.depth).state_dict()
    cuts = {name: as_function(stmt) for name, stmt in CUTS.items()}
    for mode in MODES:
        models, optimizers = {}, {}
        for name in CUTS:
            model = ABC(config.width, config.depth).to(device)
            model.load_state_dict(init)
            models[name] = model
            optimizers[name] = torch.optim.SGD(model.parameters(), lr=1e-3)

        def step(name: str) -> float:
            b, c = models[name](x, cuts[name])
            loss_b, loss_c = F.mse_loss(b, target_b), F.mse_loss(c, target_c)
            loss = (loss_b, loss_c, loss_b + loss_c)[mode]
            loss.backward()
            optimizers[name].step()
            # Gradients go before the step ends, so that every method starts
            # its next step from the same memory: parameters only.
            optimizers[name].zero_grad(set_to_none=True)
            return loss.item()

        times: dict[str, list[float]] = {name: [] for name in CUTS}
        peaks: dict[str, int] = {name: 0 for name in CUTS}
        losses: dict[str, float] = {}
        for name in CUTS:
            step(name)  # warm-up: allocator, kernels, optimizer state
        for _ in range(config.train_steps):
            order = list(CUTS)
            random.shuffle(order)
            for name in order:
                synchronize(device)
                if device == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                    before = torch.cuda.memory_allocated()
                start = time.perf_counter()
                losses[name] = step(name)  # .item() waits for the step to finish
                times[name].append((time.perf_counter() - start) * 1e3)
                if device == "cuda":
                    peaks[name] = max(peaks[name], torch.cuda.max_memory_allocated() - before)
        if device == "cpu":
            for name in CUTS:
                peaks[name] = cpu_peak_bytes(lambda: step(name))
        for name in CUTS:
            q1, median, q3 = quartiles(times[name])
            rows.append({
                "mode": mode, "method": name, "step_ms_median": median,
                "step_ms_q1": q1, "step_ms_q3": q3,
                "ratio_to_detach": paired_ratio(times[name], times[BASELINE]),
                "peak_bytes": peaks[name], "peak_ratio_to_detach": peaks[name] / peaks[BASELINE],
                "final_loss": losses[name], "step_ms_samples": times[name],
            })  # fmt: skip
        progress(
            f"training {device} mode {mode} ({MODES[mode]})  "
            + "  ".join(f"{r['method']} {r['step_ms_median']:.1f}ms" for r in rows[-len(CUTS):])
        )
        del models, optimizers
    return rows


def cpu_peak_bytes(fn: Callable[[], object]) -> int:
    """Peak bytes held by the CPU allocator during fn, above where it started."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return cpu_allocations(prof.events())[1]


def cpu_allocations(events: list) -> tuple[int, int]:
    """(bytes allocated, peak bytes held) of tensor storage, from profiler events.

    The profiler books each CPU allocator call (+ alloc, - free) to the op that
    made it, or to a "[memory]" event outside any op; summed in op order, that
    gives what a call allocated and the most it held at once. It sees tensor
    storage only (not TensorImpls or autograd nodes), and memory an op frees
    before it returns does not reach the peak.
    """
    running, peak, allocated = 0, 0, 0
    for e in sorted(events, key=lambda e: e.time_range.start):
        change = e.cpu_memory_usage if e.name == "[memory]" else e.self_cpu_memory_usage
        running += change
        allocated += max(0, change)
        peak = max(peak, running)
    return allocated, peak


# ------------------------------------------------------------------- attached forms


def reversal_layers() -> dict[str, str]:
    """Gradient reversal as bridge and as the PyPI layers it replaces, where installed."""
    layers = {"bridge(t, -1.0)": "bridge(t, -1.0)", "Bridge(-1.0)": "reverse(t)"}
    NAMESPACE["reverse"] = gradbridge_ext.Bridge(grad_scale=-1.0)
    try:
        from pytorch_revgrad import RevGrad

        NAMESPACE["revgrad"] = RevGrad(alpha=1.0)
        layers["pytorch-revgrad"] = "revgrad(t)"
    except ImportError:
        progress("pytorch-revgrad is not installed: left out")
    try:
        from gradient_reversal import GradientReversalLayer

        NAMESPACE["grl"] = GradientReversalLayer(alpha=1.0)
        layers["torch-gradient-reversal"] = "grl(t)"
    except ImportError:
        progress("torch-gradient-reversal is not installed: left out")
    layers["bridge(t, attach=True)"] = "bridge(t, attach=True)"
    return layers


def bench_attached(device: str, sizes: list[int], config: Config) -> list[dict]:
    """Forward, and forward + backward, per call of the attached forms, on a leaf that requires grad."""
    layers = reversal_layers()
    baseline = "bridge(t, -1.0)"
    cases = [sizes[0], sizes[-1]]
    timers = {}
    for nbytes in cases:
        t = torch.randn(max(1, nbytes // 4), device=device, requires_grad=True)
        namespace = dict(NAMESPACE, t=t, g=torch.ones_like(t), backward=torch.autograd.backward)
        for name, stmt in layers.items():
            timers[(nbytes, "forward", name)] = timeit.Timer(stmt, globals=namespace)
            # Gradients accumulate into t.grad in place after the first call.
            timers[(nbytes, "forward + backward", name)] = timeit.Timer(
                f"backward({stmt}, g)", globals=namespace
            )

    groups = sorted({key[:2] for key in timers})
    samples, _ = time_interleaved(timers, groups, list(layers), device, config, "attached")
    rows = []
    for (nbytes, phase, name), ns in samples.items():
        q1, median, q3 = quartiles(ns)
        rows.append({
            "size_bytes": nbytes, "phase": phase, "method": name, "median_ns": median,
            "q1_ns": q1, "q3_ns": q3, "samples_ns": ns,
            "ratio_to_bridge": paired_ratio(ns, samples[(nbytes, phase, baseline)]),
        })  # fmt: skip
    return rows


def attached_table(results: dict) -> str:
    rows = results["attached"]
    keys = sorted({(r["phase"], r["size_bytes"]) for r in rows}, key=lambda k: (k[0] != "forward", k[1]))
    by = {(r["phase"], r["size_bytes"], r["method"]): r for r in rows}
    methods = list(dict.fromkeys(r["method"] for r in rows))
    return table(
        ["method"] + [f"{phase}, {format_size(size)}" for phase, size in keys],
        [[name] + [f"{format_ns(by[(*k, name)]['median_ns'])} ({by[(*k, name)]['ratio_to_bridge']:.2f})"
                   for k in keys] for name in methods],
    )  # fmt: skip


# ------------------------------------------------------------------------- report


def check_bars(device: str, results: dict) -> list[dict]:
    """The issue's bars for bridge, each with what this run measured."""
    bars = []
    latency = results.get("latency", [])
    if latency:
        ns = {(r["size_bytes"], r["requires_grad"], r["method"]): r["samples_ns"] for r in latency}
        cases = sorted({(r["size_bytes"], r["requires_grad"]) for r in latency})
        to_data = {case: paired_ratio(ns[(*case, "bridge")], ns[(*case, ".data")]) for case in cases}
        interval = {case: ratio_interval(ns[(*case, "bridge")], ns[(*case, ".data")]) for case in cases}
        # The case that decides: the surest miss if there is one, else the least sure pass.
        misses = [case for case in cases if interval[case][0] > 1]
        worst = max(misses or cases, key=lambda case: interval[case][0 if misses else 1])
        low, high = interval[worst]
        bars.append({
            "bar": "bridge per call <= .data at every size",
            "measured": f"bridge/.data {min(to_data.values()):.2f} to {max(to_data.values()):.2f}; "
                        f"{len(misses)} of {len(cases)} cases above 1 beyond noise; deciding case "
                        f"{to_data[worst]:.3f} [{low:.3f}, {high:.3f}] (95% interval) "
                        f"at {format_size(worst[0])}, requires_grad={worst[1]}",
            # Decided only where noise cannot carry the ratio across 1.
            "holds": False if any(lo > 1 for lo, _ in interval.values())
                     else True if all(hi <= 1 for _, hi in interval.values()) else None,
        })  # fmt: skip
        small, large = cases[0][0], cases[-1][0]
        flat = [paired_ratio(ns[(large, g, "bridge")], ns[(small, g, "bridge")]) for g in (True, False)]
        bars.append({
            "bar": "bridge flat in size (largest/smallest within 0.9-1.1)",
            "measured": f"{format_size(large)}/{format_size(small)} = "
                        + ", ".join(f"{f:.2f}" for f in flat) + " (requires grad, not)",
            "holds": all(0.9 <= f <= 1.1 for f in flat),
        })  # fmt: skip
    memory = [r for r in results.get("memory", []) if r["method"] == "bridge"]
    if memory:
        allocated = max(r["allocated_bytes"] for r in memory)
        kernels = max(r.get("kernels", 0) for r in memory)
        bars.append({
            "bar": "bridge allocates 0 bytes and launches 0 kernels",
            "measured": f"max {allocated} B allocated"
                        + (f", max {kernels} kernels" if device == "cuda" else ", (no kernels on CPU)"),
            "holds": allocated == 0 and kernels == 0,
        })  # fmt: skip
    training = results.get("training", [])
    if training:
        steps = {(r["mode"], r["method"]): r["step_ms_samples"] for r in training}
        times, verdicts = [], []
        for mode in MODES:
            ratio = paired_ratio(steps[(mode, "bridge")], steps[(mode, BASELINE)])
            low, high = ratio_interval(steps[(mode, "bridge")], steps[(mode, BASELINE)])
            times.append(f"{ratio:.3f} [{low:.3f}, {high:.3f}]")
            # Decided only where noise cannot move the ratio across the band's edge.
            verdicts.append(True if 0.98 <= low and high <= 1.02
                            else False if high < 0.98 or low > 1.02 else None)  # fmt: skip
        peaks = [r["peak_ratio_to_detach"] for r in training if r["method"] == "bridge"]
        verdicts += [0.98 <= v <= 1.02 for v in peaks]
        bars.append({
            "bar": "training step time and peak memory within 0.98-1.02 of detach",
            "measured": "time " + ", ".join(times) + " (95% interval); peak "
                        + ", ".join(f"{v:.3f}" for v in peaks) + " (modes 0, 1, 2)",
            "holds": False if False in verdicts else None if None in verdicts else True,
        })  # fmt: skip
    return bars


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def verdict(holds: bool | None) -> str:
    return {True: "yes", False: "**no**", None: "not resolved: an interval spans the bar's edge"}[holds]


def format_ratio(ratio: float) -> str:
    return f"{ratio:.2f}" if ratio < 100 else f"{ratio:,.0f}"


def format_ns(ns: float) -> str:
    if ns >= 1e6:
        return f"{ns / 1e6:.2f} ms"
    if ns >= 1e3:
        return f"{ns / 1e3:.2f} us"
    return f"{ns:.0f} ns"


def report(results: dict) -> str:
    env = results["environment"]
    parts = [
        f"## {env['device']}: {env['device_name']}",
        f"torch {env['torch']}, Python {env['python']}, CPU {env['cpu']} "
        f"({env['cpu_threads']} threads), {env['date']}, commit {env['gradbridge_ext_commit']}",
    ]
    latency = results.get("latency", [])
    for requires_grad in (True, False):
        rows = [r for r in latency if r["requires_grad"] == requires_grad]
        if not rows:
            continue
        sizes = sorted({r["size_bytes"] for r in rows})
        by = {(r["size_bytes"], r["method"]): r for r in rows}
        parts.append(
            f"\n### Latency per call, input {'requires' if requires_grad else 'does not require'} "
            "grad (median, and ratio to detach)\n"
        )
        parts.append(table(
            ["size", *METHODS],
            [[format_size(s)] + [f"{format_ns(by[(s, m)]['median_ns'])} ({format_ratio(by[(s, m)]['ratio_to_detach'])})"
                                 for m in METHODS] for s in sizes],
        ))  # fmt: skip
    memory = results.get("memory", [])
    if memory:
        cuda = results["environment"]["device"] == "cuda"
        parts.append(f"\n### Memory and work per call (input requires grad; {memory[0]['memory_source']})\n")
        parts.append(table(
            ["size", "method", "bytes allocated", "peak bytes", "ops (profiler)"]
            + (["CUDA kernels"] if cuda else []),
            [[format_size(r["size_bytes"]), r["method"], str(r["allocated_bytes"]), str(r["peak_bytes"]),
              str(r["ops"])] + ([str(r["kernels"])] if cuda else []) for r in memory],
        ))  # fmt: skip
        parts.append(
            "\nOps are counted by the profiler, which makes bridge dispatch (1 op); a call "
            "with no profiler or mode active skips the dispatcher (0 ops), same kernel."
        )
    training = results.get("training", [])
    if training:
        cfg = results["config"]
        parts.append(
            f"\n### Training step (width {cfg['width']}, batch {cfg['batch']}, B = {cfg['depth']} "
            f"linear layers, {cfg['train_steps']} steps; median, and ratio to detach)\n"
        )
        parts.append(table(
            ["mode", "method", "step time", "peak memory", "final loss"],
            [[f"{r['mode']}: {MODES[r['mode']]}", r["method"],
              f"{r['step_ms_median']:.2f} ms ({r['ratio_to_detach']:.3f})",
              f"{r['peak_bytes'] / 2**20:.1f} MiB ({r['peak_ratio_to_detach']:.3f})",
              f"{r['final_loss']:.6f}"] for r in training],
        ))  # fmt: skip
    if results.get("attached"):
        parts.append(
            "\n### Attached forms per call, input a leaf that requires grad "
            "(median, and ratio to bridge(t, -1.0))\n"
        )
        parts.append(attached_table(results))
    bars = results.get("bars", [])
    if bars:
        quick = " (a --quick run: too few repeats to decide them)" if results.get("quick") else ""
        parts.append(f"\n### Bars for bridge{quick}\n")
        parts.append(table(
            ["bar", "measured", "holds"],
            [[b["bar"], b["measured"], verdict(b["holds"])] for b in bars],
        ))  # fmt: skip
    return "\n".join(parts)


def summary(results: dict) -> str:
    """One table per device for the README: each method's cost at a glance."""
    env = results["environment"]
    latency = [r for r in results["latency"] if r["requires_grad"]]
    sizes = sorted({r["size_bytes"] for r in latency})
    small, large = sizes[0], sizes[-1]
    time = {(r["size_bytes"], r["method"]): r for r in latency}
    memory = {r["method"]: r for r in results["memory"] if r["size_bytes"] == large}
    training = {(r["mode"], r["method"]): r for r in results["training"]}
    cuda = env["device"] == "cuda"

    def per_call(size: int, name: str) -> str:
        r = time[(size, name)]
        return f"{format_ns(r['median_ns'])} ({format_ratio(r['ratio_to_detach'])})"

    rows = []
    for name in [m for m in CUTS if (0, m) in training]:  # older results lack newer rows
        measured = name in METHODS
        row = [name if name != "bridge" else "**bridge**"]
        row += [per_call(small, name), per_call(large, name)] if measured else ["", ""]
        row += [str(memory[name]["allocated_bytes"])] if measured else [""]
        if cuda:
            row += [str(memory[name]["kernels"])] if measured else [""]
        row += [" / ".join(f"{training[(m, name)][key]:.3f}" for m in MODES)
                for key in ("ratio_to_detach", "peak_ratio_to_detach")]  # fmt: skip
        rows.append(row)
    header = ["method", f"per call, {format_size(small)}", f"per call, {format_size(large)}",
              f"bytes allocated, {format_size(large)}"] + (["CUDA kernels"] if cuda else []) + [
              "training step time, modes 0 / 1 / 2", "training peak memory, modes 0 / 1 / 2"]  # fmt: skip
    cfg = results["config"]
    bars = table(
        ["bar for bridge", "measured", "holds"],
        [[b["bar"], b["measured"], verdict(b["holds"])] for b in results["bars"]],
    )
    return "\n".join([
        f"{env['device_name']} ({env['device']}; host CPU {env['cpu']}, {env['cpu_threads']} threads); "
        f"torch {env['torch']}, Python {env['python']}, "
        f"{env['date'][:10]}, commit {env['gradbridge_ext_commit']}. Per call: median from Python, "
        "input requires grad, (ratio to detach). Training: width "
        f"{cfg['width']}, batch {cfg['batch']}, B = {cfg['depth']} layers, ratio to detach.",
        "",
        table(header, rows),
        "",
        bars,
    ] + ([
        "",
        "Attached forms: time per call from Python (median, and ratio to `bridge(t, -1.0)`), on a "
        "leaf that requires grad; forward + backward runs `torch.autograd.backward` on the result.",
        "",
        attached_table(results),
    ] if results.get("attached") else []))  # fmt: skip


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
    parser.add_argument("--out", type=Path, default=RESULTS,
                        help="results folder; each device writes to <out>/<device>/")  # fmt: skip
    args = parser.parse_args(argv)
    sections = [s for s in args.sections.split(",") if s]
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        parser.error(f"--sections: unknown {sorted(unknown)}; choose from {list(SECTIONS)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device")
    devices = {"all": ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])}.get(
        args.device, [args.device]
    )
    failed = False
    for device in devices:
        config = CONFIGS[(device, args.quick)]
        sizes = args.sizes or parse_sizes(QUICK_SIZES if args.quick else SIZES[device])
        results: dict = {
            "environment": environment(device), "config": asdict(config), "quick": args.quick,
        }  # fmt: skip
        progress(f"{device}: {results['environment']['device_name']}, torch {torch.__version__}")
        random.seed(0)
        runs = {
            "latency": lambda: bench_latency(device, sizes, config),
            "memory": lambda: bench_memory(device, sizes),
            "training": lambda: bench_training(device, config),
            "attached": lambda: bench_attached(device, sizes, config),
        }
        for section in sections:
            try:
                results[section] = runs[section]()
            except Exception as error:  # keep the other sections; fail at the end
                progress(f"{section} failed: {error!r}")
                results.setdefault("errors", {})[section] = repr(error)
                failed = True
        results["bars"] = check_bars(device, results)
        out = args.out / device
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
        written = [out / "results.json"]
        try:
            from plots import plot_results
        except ImportError as error:  # matplotlib missing: tables and JSON still stand
            progress(f"no plots ({error}); `pip install matplotlib` for them")
        else:
            written += plot_results(results, out)
        print(report(results))
        print("\nwritten: " + ", ".join(str(p) for p in written))
        sys.stdout.flush()
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
