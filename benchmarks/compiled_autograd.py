"""The cost of a reversal under compiled autograd: bridge's node against a Python autograd.Function.

The benchmark's training model (examples/independent_layers.py's A -> B -> C, CPU
configuration: width 512, B of 4 layers, batch 512, loss on B and C) with a
gradient reversal between B and C, three ways: none (C reads B's output as it
is), ``bridge(t, -1.0)``, and a Python ``autograd.Function`` reversal (forward
``t.view_as(t)``, backward ``-grad``: pytorch-revgrad's and DANN code's shape).
Each step runs the forward eagerly and its backward under compiled autograd
(traced, then compiled with the backend given), then an SGD step. Steps of the
three are interleaved in a shuffled order, so ratios compare like with like; the
ratio is the median of each step's time over the Python Function's from the same
round, with a 95% bootstrap interval.

    python benchmarks/compiled_autograd.py [--steps 60] [--backend inductor] [--commit-results]

Prints a Markdown table with the environment; writes compiled_autograd.json to
benchmarks/results/local/cpu/ (ignored by git), or with --commit-results to the
committed benchmarks/results/cpu/.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch
from torch import Tensor
from torch._dynamo import compiled_autograd

from bench_bridge import RESULTS, environment
from measure import paired_ratio, quartiles, ratio_interval

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from independent_layers import ABC, loss  # noqa: E402  (the benchmark's model, defined once)

from gradbridge_ext import bridge  # noqa: E402

WIDTH, DEPTH, BATCH, MODE = 512, 4, 512, 2  # the CPU training configuration; mode 2: loss on B and on C
BASELINE = "Python Function reversal"


class Reverse(torch.autograd.Function):
    """A gradient reversal layer as Python code writes it."""

    @staticmethod
    def forward(ctx: object, t: Tensor) -> Tensor:
        return t.view_as(t)

    @staticmethod
    def backward(ctx: object, grad: Tensor) -> Tensor:
        return -grad


REVERSALS = {"no reversal": lambda t: t, "bridge(t, -1.0)": lambda t: bridge(t, -1.0), BASELINE: Reverse.apply}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=60, help="timed steps of each method (default 60)")
    parser.add_argument("--backend", default="inductor", help="compiled autograd's backend (default inductor)")
    parser.add_argument("--commit-results", action="store_true", help="write into the committed benchmarks/results/cpu/")
    args = parser.parse_args()
    torch.manual_seed(0)
    x = torch.randn(BATCH, WIDTH)
    targets = (torch.randn(BATCH, WIDTH), torch.randn(BATCH, WIDTH))
    init = ABC(REVERSALS["no reversal"], WIDTH, DEPTH).state_dict()
    models = {}
    for name, reversal in REVERSALS.items():
        models[name] = ABC(reversal, WIDTH, DEPTH)
        models[name].load_state_dict(init)
    optimizers = {name: torch.optim.SGD(model.parameters(), lr=1e-3) for name, model in models.items()}
    compiler = torch.compile(backend=args.backend)
    enable = getattr(compiled_autograd, "_enable", None) or compiled_autograd.enable

    def step(name: str) -> float:
        start = time.perf_counter()
        step_loss = loss(*models[name](x), targets, MODE)
        with enable(compiler):
            step_loss.backward()
        optimizers[name].step()
        optimizers[name].zero_grad(set_to_none=True)
        return (time.perf_counter() - start) * 1e3

    # The first step of each compiles its backward; both reversals must then train alike.
    for name in REVERSALS:
        step(name)
    same = all(torch.equal(a, b) for a, b in zip(models["bridge(t, -1.0)"].parameters(), models[BASELINE].parameters()))
    times: dict[str, list[float]] = {name: [] for name in REVERSALS}
    for _ in range(args.steps):
        order = list(REVERSALS)
        random.shuffle(order)
        for name in order:
            times[name].append(step(name))

    env = environment("cpu")
    rows = []
    for name in REVERSALS:
        low, high = ratio_interval(times[name], times[BASELINE])
        rows.append({"method": name, "step_ms_median": quartiles(times[name])[1],
                     "ratio_to_python_function": paired_ratio(times[name], times[BASELINE]),
                     "ratio_interval_95": [low, high], "step_ms_samples": times[name]})  # fmt: skip
    ours = next(row for row in rows if row["method"] == "bridge(t, -1.0)")
    low, high = ours["ratio_interval_95"]
    holds = "yes" if high <= 1.0 else "no" if low > 1.0 else "undecided: the interval spans 1"
    print(f"torch {env['torch']}, {env['device_name']}, commit {env['gradbridge_ext_commit']}; compiled autograd with "
          f"{args.backend}, eager forward; width {WIDTH}, B of {DEPTH} layers, batch {BATCH}, loss on B and C; "
          f"{args.steps} interleaved steps each")
    print("\n| method | step, median | ratio to the Python Function (95% interval) |\n|---|---|---|")
    for row in rows:
        ratio, (a, b) = row["ratio_to_python_function"], row["ratio_interval_95"]
        print(f"| {row['method']} | {row['step_ms_median']:.2f} ms | {ratio:.3f} [{a:.3f}, {b:.3f}] |")
    print(f"\nbar: bridge's step no slower than the Python Function's: {holds}; "
          f"after one step both reversals' parameters are bitwise equal: {'yes' if same else 'NO'}")
    folder = RESULTS / "cpu" if args.commit_results else RESULTS / "local" / "cpu"
    folder.mkdir(parents=True, exist_ok=True)
    record = {"environment": env, "backend": args.backend, "steps": args.steps, "rows": rows,
              "bar_holds": holds, "same_parameters_after_one_step": same}  # fmt: skip
    (folder / "compiled_autograd.json").write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
