"""Independent layers at a realistic scale: a probe learns from a network that is still training.

B is a small MLP learning the digit class of scikit-learn's digits (8x8 images, shipped
inside the package: no download). C, a probe, learns another target, whether the digit is
odd, from B's hidden layer, through ``gradbridge_ext.bridge``: one loss, one backward, and
C's gradient stops at the bridge. Three runs, same data order, same initial B:

1. B alone, no C at all;
2. B and C, C reading ``bridge(h)``;
3. B and C, C reading ``h`` itself (no cut): C's loss trains B too.

Checked on the runs: (2)'s B ends bitwise the B of (1), with (1)'s test accuracy at every
evaluation, so the probe cost B nothing; (3)'s B is another network, with another test accuracy; C learns in (2) all the
same. ``--plot PATH`` draws B's and C's test accuracy over the steps.

    python examples/probe_digits.py [--steps 600] [--plot PATH]
"""

from __future__ import annotations

import argparse
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import Tensor, nn

import gradbridge_ext

SEED = 0
HIDDEN = 32
BATCH = 64
STEPS = 600
EVERY = 20  # steps between evaluations
TEST = 450  # held-out images, of 1797

CUTS: dict[str, Callable[[Tensor], Tensor] | None] = {
    "B alone": None,  # no probe at all
    "bridge": gradbridge_ext.bridge,
    "no cut": lambda h: h,
}


@dataclass
class Digits:
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor

    @classmethod
    def load(cls) -> Digits:
        digits = load_digits()
        x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
        y = torch.tensor(digits.target)
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(SEED))
        train, test = order[TEST:], order[:TEST]
        return cls(x[train], y[train], x[test], y[test])


def probe_target(y: Tensor) -> Tensor:
    """C's target: is the digit odd."""
    return y % 2


class B(nn.Module):
    """The network being trained: image -> hidden -> digit class."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(64, HIDDEN), nn.ReLU())
        self.head = nn.Linear(HIDDEN, 10)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h = self.body(x)
        return h, self.head(h)


def make_probe() -> nn.Module:
    """C: odd or even from B's hidden layer (not linear in the class, so a hidden layer of its own)."""
    return nn.Sequential(nn.Linear(HIDDEN, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, 2))


@dataclass
class Run:
    steps: list[int] = field(default_factory=list)
    b_acc: list[float] = field(default_factory=list)  # B's test accuracy on the digit class
    c_acc: list[float] = field(default_factory=list)  # C's test accuracy on odd/even
    b_state: dict[str, Tensor] = field(default_factory=dict)


@torch.no_grad()
def _accuracy(logits: Tensor, y: Tensor) -> float:
    return (logits.argmax(1) == y).float().mean().item()


def train(cut: str, steps: int = STEPS, data: Digits | None = None) -> Run:
    """Train B (and C, unless ``cut`` is "B alone") for ``steps`` SGD steps; evaluate every ``EVERY``."""
    data = data or Digits.load()
    torch.manual_seed(SEED)
    b = B()  # the same initial B in every run: built first, from the same seed
    optimizer_b = torch.optim.SGD(b.parameters(), lr=0.1, momentum=0.9)
    connect = CUTS[cut]
    if connect is not None:
        torch.manual_seed(SEED + 1)  # C's weights come from their own seed
        c = make_probe()
        optimizer_c = torch.optim.SGD(c.parameters(), lr=0.1, momentum=0.9)  # C's own optimizer
    batches = torch.Generator().manual_seed(SEED + 2)  # the same data order in every run
    run = Run()

    def evaluate(step: int) -> None:
        with torch.no_grad():
            h, logits = b(data.x_test)
            run.steps.append(step)
            run.b_acc.append(_accuracy(logits, data.y_test))
            if connect is not None:
                run.c_acc.append(_accuracy(c(h), probe_target(data.y_test)))

    evaluate(0)
    for step in range(1, steps + 1):
        i = torch.randint(0, len(data.x_train), (BATCH,), generator=batches)
        x, y = data.x_train[i], data.y_train[i]
        h, logits = b(x)
        loss = F.cross_entropy(logits, y)
        if connect is not None:
            loss = loss + F.cross_entropy(c(connect(h)), probe_target(y))
            optimizer_c.zero_grad()
        optimizer_b.zero_grad()
        loss.backward()  # one backward for both: the cut decides whether C's loss reaches B
        optimizer_b.step()
        if connect is not None:
            optimizer_c.step()
        if step % EVERY == 0:
            evaluate(step)
    run.b_state = {name: p.detach().clone() for name, p in b.named_parameters()}
    return run


def bitwise_equal(a: dict[str, Tensor], b: dict[str, Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in a)


def conclusions(runs: dict[str, Run]) -> list[tuple[str, bool]]:
    """What the runs show, checked on them: each statement and whether it holds."""
    alone, cut, free = runs["B alone"], runs["bridge"], runs["no cut"]
    differ = [abs(a - b) for a, b in zip(free.b_acc, alone.b_acc)]
    return [
        ("B learns the digits (B alone's final test accuracy >= 0.9)", alone.b_acc[-1] >= 0.9),
        ("through bridge, B's final parameters are bitwise those of B trained alone",
         bitwise_equal(cut.b_state, alone.b_state)),
        ("through bridge, B's test accuracy is the same at every evaluation", cut.b_acc == alone.b_acc),
        ("with no cut, C's loss moves B: its parameters differ", not bitwise_equal(free.b_state, alone.b_state)),
        (f"with no cut, B's test accuracy differs from B alone's at {sum(d > 0 for d in differ)} of the {len(differ)} "
         f"evaluations in the table, by up to {max(differ):.3f} (final: {free.b_acc[-1] - alone.b_acc[-1]:+.3f})",
         max(differ) > 0),
        ("through bridge, C learns: test accuracy from <= 0.6 to >= 0.9", cut.c_acc[0] <= 0.6 and cut.c_acc[-1] >= 0.9),
    ]  # fmt: skip


def plot(runs: dict[str, Run], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    styles = {"B alone": ("k", "-", 4), "bridge": ("C0", "-", 1.5), "no cut": ("C3", "--", 1.5)}
    for name, run in runs.items():
        color, line, width = styles[name]
        left.plot(run.steps, run.b_acc, color=color, linestyle=line, linewidth=width, label=name)
        if run.c_acc:
            right.plot(run.steps, run.c_acc, color=color, linestyle=line, linewidth=width, label=name)
    left.set_title("B: digit class (test accuracy)")
    right.set_title("C, the probe: odd or even (test accuracy)")
    for ax in (left, right):
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right")
    left.set_ylim(0.5, 1.0)
    fig.suptitle("scikit-learn digits: through bridge, B's curve is B alone's, bitwise")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    print(f"wrote {path}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=STEPS, help=f"SGD steps (default {STEPS})")
    parser.add_argument("--plot", metavar="PATH", help="write B's and C's accuracy over steps to this PNG")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (default 1)")
    args = parser.parse_args()
    if args.plot and importlib.util.find_spec("matplotlib") is None:
        # Before training, not after it: a missing plotter must not cost the run its conclusions.
        parser.error("--plot needs matplotlib: pip install -r examples/requirements.txt")  # fmt: skip
    torch.set_num_threads(args.threads)  # small tensors: more threads only add contention

    data = Digits.load()
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} CPU thread(s); digits: {len(data.x_train)} train, "
        f"{len(data.x_test)} test images; {args.steps} steps of {BATCH}"
    )
    runs = {cut: train(cut, args.steps, data) for cut in CUTS}
    print(f"\ntest accuracy at every evaluation, every {EVERY} steps (B: digit class; C: odd or even)")
    print(f"{'step':>6}{'B alone':>10}{'B bridge':>10}{'B no cut':>10}{'no cut - alone':>16}{'C bridge':>10}{'C no cut':>10}")
    alone, cut, free = runs["B alone"], runs["bridge"], runs["no cut"]
    for k, step in enumerate(alone.steps):
        print(f"{step:6d}{alone.b_acc[k]:10.3f}{cut.b_acc[k]:10.3f}{free.b_acc[k]:10.3f}"
              f"{free.b_acc[k] - alone.b_acc[k]:+16.3f}{cut.c_acc[k]:10.3f}{free.c_acc[k]:10.3f}")  # fmt: skip
    flat = {cut: torch.cat([p.flatten() for p in runs[cut].b_state.values()]) for cut in ("B alone", "no cut")}
    moved = (flat["no cut"] - flat["B alone"]).norm() / flat["B alone"].norm()
    print(f"\nwith no cut, B's parameters end {moved:.1%} (relative L2 distance) from B alone's")
    print("\nChecked on the runs above:")
    checked = conclusions(runs)
    for statement, holds in checked:
        print(f"  [{'yes' if holds else 'NO '}] {statement}")
    if args.plot:
        plot(runs, args.plot)
    return 0 if all(holds for _, holds in checked) else 1


if __name__ == "__main__":
    raise SystemExit(main())
