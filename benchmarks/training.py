"""The training measurement: the seed's A -> B -> C model, scaled up, with each cut between B and C."""

from __future__ import annotations

import random
import sys
import time
from pathlib import Path

import torch
from torch import Tensor

from measure import (
    BASELINE, METHODS, Config, Step, as_function, cpu_allocations, paired_ratio, profiled,
    quartiles, synchronize,
)  # fmt: skip

# attach=True (no gradient, None) keeps B's graph alive until backward; training measures what that costs.
CUTS = {"no cut": "t", **METHODS, "bridge, attach=True": "bridge(t, attach=True)"}

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from independent_layers import ABC, MODES, loss  # noqa: E402  (the seed's model and losses, defined once)


def bench_training(device: str, config: Config, step: Step) -> list[dict]:
    rows = []
    torch.manual_seed(0)
    x = torch.randn(config.batch, config.width, device=device)
    targets = (
        torch.randn(config.batch, config.width, device=device),
        torch.randn(config.batch, config.width, device=device),
    )
    init = ABC(Tensor.detach, config.width, config.depth).state_dict()
    for mode in MODES:
        models, optimizers = {}, {}
        for name, stmt in CUTS.items():
            model = ABC(as_function(stmt), config.width, config.depth).to(device)
            model.load_state_dict(init)
            models[name] = model
            optimizers[name] = torch.optim.SGD(model.parameters(), lr=1e-3)

        def train_step(name: str) -> float:
            step_loss = loss(*models[name](x), targets, mode)
            step_loss.backward()
            optimizers[name].step()
            # Gradients go before the step ends, so that every method starts
            # its next step from the same memory: parameters only.
            optimizers[name].zero_grad(set_to_none=True)
            return step_loss.item()

        times: dict[str, list[float]] = {name: [] for name in CUTS}
        peaks: dict[str, int] = {name: 0 for name in CUTS}
        losses: dict[str, float] = {}
        for name in CUTS:
            train_step(name)  # warm-up: allocator, kernels, optimizer state
        for i in range(config.train_steps):
            order = list(CUTS)
            random.shuffle(order)
            for name in order:
                synchronize(device)
                if device == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                    before = torch.cuda.memory_allocated()
                start = time.perf_counter()
                losses[name] = train_step(name)  # .item() waits for the step to finish
                times[name].append((time.perf_counter() - start) * 1e3)
                if device == "cuda":
                    peaks[name] = max(peaks[name], torch.cuda.max_memory_allocated() - before)
            step(mode * config.train_steps + i + 1, len(MODES) * config.train_steps)
        if device == "cpu":
            for name in CUTS:
                # Peak bytes the CPU allocator held during a step, above where it started.
                peaks[name] = cpu_allocations(profiled(lambda: train_step(name), device))[1]
        for name in CUTS:
            q1, median, q3 = quartiles(times[name])
            rows.append({
                "mode": mode, "method": name, "step_ms_median": median,
                "step_ms_q1": q1, "step_ms_q3": q3,
                "ratio_to_detach": paired_ratio(times[name], times[BASELINE]),
                "peak_bytes": peaks[name], "peak_ratio_to_detach": peaks[name] / peaks[BASELINE],
                "final_loss": losses[name], "step_ms_samples": times[name],
            })  # fmt: skip
        del models, optimizers
    return rows


def step_seconds(device: str, config: Config) -> float:
    """One training step of this config's model (mode 2, detach), timed after a warm-up: for the estimate."""
    model = ABC(Tensor.detach, config.width, config.depth).to(device)
    x = torch.randn(config.batch, config.width, device=device)
    targets = (x, x)
    times = []
    for _ in range(3):
        synchronize(device)
        start = time.perf_counter()
        loss(*model(x), targets, 2).backward()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return min(times[1:])
