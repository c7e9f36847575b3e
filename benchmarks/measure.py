"""The measurements: each method's time per call, memory and work per call, and the attached forms.

Every function returns plain rows (dicts) for results.json and formats nothing; report.py
turns them into tables. A `step(done, total)` argument, where there is one, is called as
the work advances, for the progress line.
"""

from __future__ import annotations

import os
import random
import re
import statistics
import sys
import tempfile
import time
import timeit
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.profiler import ProfilerActivity, profile

import gradbridge_ext

Step = Callable[[int, int], None]  # (units done, units in all)
UNITS = {"B": 1, "KB": 2**10, "MB": 2**20, "GB": 2**30}


def parse_size(text: str) -> int:
    """'4B', '64KB', '1GB' -> bytes."""
    text = text.strip().upper()
    for unit in sorted(UNITS, key=len, reverse=True):
        if text.endswith(unit) and text[: -len(unit)].isdigit():
            return int(text[: -len(unit)]) * UNITS[unit]
    raise ValueError(f"size {text!r}: expected a number and B, KB, MB or GB")


def format_size(nbytes: int) -> str:
    for unit in ("GB", "MB", "KB"):
        if nbytes >= UNITS[unit] and nbytes % UNITS[unit] == 0:
            return f"{nbytes // UNITS[unit]}{unit}"
    return f"{nbytes}B"


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


def as_function(stmt: str, namespace: dict = NAMESPACE) -> Callable[[Tensor], Tensor]:
    """A method's statement as a function of t, for what is not timed per call."""
    return eval(f"lambda t: {stmt}", dict(namespace))


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


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def make_input(nbytes: int, requires_grad: bool, device: str) -> Tensor:
    """A float32 tensor of nbytes: a non-leaf of a leaf that requires grad, or a plain one."""
    t = torch.randn(max(1, nbytes // 4), device=device)
    if requires_grad:
        t = t.requires_grad_().mul(2)
    return t


def quartiles(values: list[float]) -> tuple[float, float, float]:
    q1, median, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, median, q3


def paired_ratio(samples: list[float], baseline: list[float]) -> float:
    """Median over repeats of sample / baseline from the same repeat: drift cancels.

    NB: not the ratio of the two medians; the tables say so.
    """
    return statistics.median(a / b for a, b in zip(samples, baseline, strict=True))


def ratio_interval(samples: list[float], baseline: list[float]) -> tuple[float, float]:
    """A 95% bootstrap interval for paired_ratio: how far noise alone moves it."""
    ratios = [a / b for a, b in zip(samples, baseline, strict=True)]
    rng = random.Random(0)
    medians = sorted(statistics.median(rng.choices(ratios, k=len(ratios))) for _ in range(1000))
    return medians[25], medians[974]


# ---------------------------------------------------------------------------- latency


def calls_per_block(block: Callable[[tuple, int], float], key: tuple, block_s: float) -> int:
    """How many calls fill block_s, from a run of at least a tenth of it.

    One call alone would mostly time the timer and, on CUDA, the synchronize.
    """
    block(key, 1)  # warm-up: first-call costs, the allocator's first block
    number = 1
    while (per_call := block(key, number)) * number < block_s / 10:
        number *= 10
    return max(1, round(block_s / per_call))


def time_interleaved(
    timers: dict[tuple, timeit.Timer], groups: list[tuple], names: list[str],
    device: str, config: Config, step: Step,
) -> tuple[dict[tuple, list[float]], dict[tuple, int]]:
    """Nanoseconds per call for each (*group, name) timer, one block per repeat, and calls per block.

    The groups run in shuffled order each repeat, so drift over the run moves
    them alike, and a group's methods back to back in shuffled order, so each
    paired ratio compares blocks timed moments apart.
    """  # fmt: skip

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
        step(repeat + 1, config.repeats)
    return samples, numbers


def rows_per_size(samples: dict[tuple, list[float]], numbers: dict[tuple, int], reference: str, ratio: str) -> list[dict]:
    """A row per (size, method) timed by time_interleaved: quartiles, and the paired ratio to ``reference``."""
    rows = []
    for (nbytes, name), ns in samples.items():
        q1, median, q3 = quartiles(ns)
        rows.append({
            "size_bytes": nbytes, "method": name, "median_ns": median, "q1_ns": q1, "q3_ns": q3,
            ratio: paired_ratio(ns, samples[(nbytes, reference)]),
            "calls_per_repeat": numbers[(nbytes, name)], "samples_ns": ns,
        })  # fmt: skip
    return rows


def bench_latency(device: str, sizes: list[int], config: Config, step: Step) -> list[dict]:
    cases = [(nbytes, requires_grad) for nbytes in sizes for requires_grad in (True, False)]
    timers = {}
    for case in cases:
        namespace = dict(NAMESPACE, t=make_input(*case, device))
        for name, stmt in METHODS.items():
            timers[(*case, name)] = timeit.Timer(stmt, globals=namespace)

    samples, numbers = time_interleaved(timers, cases, list(METHODS), device, config, step)
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

# What torch's profiler (kineto) prints to stderr on every start and stop, unasked.
PROFILER_CHATTER = re.compile(r"^(USDT|STAGE):.*\] (profiler_start|profiler_stop|Completed Stage: .*)$")


def profiled(fn: Callable[[], object], device: str) -> list:
    """The profiler's events for one call of fn, without the profiler's chatter on stderr.

    NB: kineto writes a USDT line per start and stop straight to fd 2, past
    sys.stderr; KINETO_LOG_LEVEL can hide them only together with its errors. So fd 2
    goes to a file for the call and every other line is written back. Some torch
    versions (2.11) also warn, once, that a profiler keeps one cycle's events: it runs one.
    """
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as captured:
        os.dup2(captured.fileno(), 2)
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Warning: Profiler clears events")
                with profile(activities=activities, profile_memory=True) as prof:
                    result = fn()  # freed after the profile, out of what it books to fn
                    synchronize(device)
            del result
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            lines = captured.read().decode(errors="replace").splitlines(keepends=True)
            sys.stderr.write("".join(line for line in lines if not PROFILER_CHATTER.match(line.rstrip())))
    return prof.events()


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


def cuda_allocations(fn: Callable[[], Tensor]) -> tuple[int, int]:
    """(bytes allocated, peak bytes above the start) by one call of fn, from the caching allocator."""
    synchronize("cuda")
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    allocated_before = torch.cuda.memory_stats()["allocated_bytes.all.allocated"]
    result = fn()
    synchronize("cuda")
    allocated = torch.cuda.memory_stats()["allocated_bytes.all.allocated"] - allocated_before
    peak = torch.cuda.max_memory_allocated() - before
    del result
    return allocated, peak


def call_cost(fn: Callable[[], object], device: str) -> dict:
    """One call of fn: bytes allocated, peak, ops dispatched, CUDA kernels (call fn once before)."""
    row: dict = {}
    if device == "cuda":
        row["allocated_bytes"], row["peak_bytes"] = cuda_allocations(fn)
        row["memory_source"] = "CUDA caching allocator stats"
    events = profiled(fn, device)
    if device == "cpu":
        row["allocated_bytes"], row["peak_bytes"] = cpu_allocations(events)
        row["memory_source"] = "torch.profiler memory events: tensor storage from the CPU allocator"
    # Operators are namespaced (aten::zeros_like); the profiler's other
    # CPU events (CUDA runtime calls, its own buffers) are not.
    ops = [e for e in events if e.device_type == torch.autograd.DeviceType.CPU and "::" in e.name]
    row["top_level_ops"] = [e.name for e in ops if e.cpu_parent is None]
    row["ops"] = len(ops)
    if device == "cuda":
        row["kernels"] = sum(1 for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
    return row


def bench_memory(device: str, sizes: list[int], step: Step) -> list[dict]:
    """One call per (size, method): bytes allocated, peak, ops dispatched, CUDA kernels."""
    rows = []
    for i, nbytes in enumerate(sizes):
        t = make_input(nbytes, True, device)
        for name in METHODS:
            fn = as_function(METHODS[name])
            fn(t)  # warm-up, so no first-call allocation lands in the measurement
            rows.append({"size_bytes": nbytes, "method": name, **call_cost(lambda: fn(t), device)})
        del t
        step(i + 1, len(sizes))
    return rows


# ------------------------------------------------------------------- attached forms

ATTACHED_BASELINE = "bridge(t, -1.0)"


def reversal_layers(note: Callable[[str], None]) -> tuple[dict[str, str], dict]:
    """Gradient reversal as bridge and as the PyPI layers it replaces, where installed:
    each layer's statement, and the names the statements use."""
    layers = {ATTACHED_BASELINE: "bridge(t, -1.0)", "Bridge(-1.0)": "reverse(t)"}
    namespace = dict(NAMESPACE, reverse=gradbridge_ext.Bridge(grad_scale=-1.0))
    try:
        from pytorch_revgrad import RevGrad

        namespace["revgrad"] = RevGrad(alpha=1.0)
        layers["pytorch-revgrad"] = "revgrad(t)"
    except ImportError:
        note("pytorch-revgrad is not installed: left out")
    try:
        from gradient_reversal import GradientReversalLayer

        namespace["grl"] = GradientReversalLayer(alpha=1.0)
        layers["torch-gradient-reversal"] = "grl(t)"
    except ImportError:
        note("torch-gradient-reversal is not installed: left out")
    layers["bridge(t, attach=True)"] = "bridge(t, attach=True)"
    return layers, namespace


def bench_attached(
    device: str, sizes: list[int], config: Config, step: Step, note: Callable[[str], None]
) -> list[dict]:
    """Forward, and forward + backward, per call of the attached forms, on a leaf that requires grad."""
    layers, names = reversal_layers(note)
    timers = {}
    for nbytes in (sizes[0], sizes[-1]):
        t = torch.randn(max(1, nbytes // 4), device=device, requires_grad=True)
        namespace = dict(names, t=t, g=torch.ones_like(t), backward=torch.autograd.backward)
        for name, stmt in layers.items():
            timers[(nbytes, "forward", name)] = timeit.Timer(stmt, globals=namespace)
            # Gradients accumulate into t.grad in place after the first call.
            timers[(nbytes, "forward + backward", name)] = timeit.Timer(
                f"backward({stmt}, g)", globals=namespace
            )

    groups = sorted({key[:2] for key in timers})
    samples, _ = time_interleaved(timers, groups, list(layers), device, config, step)
    rows = []
    for (nbytes, phase, name), ns in samples.items():
        q1, median, q3 = quartiles(ns)
        rows.append({
            "size_bytes": nbytes, "phase": phase, "method": name, "median_ns": median,
            "q1_ns": q1, "q3_ns": q3, "samples_ns": ns,
            "ratio_to_bridge": paired_ratio(ns, samples[(nbytes, phase, ATTACHED_BASELINE)]),
        })  # fmt: skip
    return rows
