"""Domain-adversarial training (DANN) with ``Bridge`` as the reversal layer: the paper's toy.

Ganin et al., "Domain-Adversarial Training of Neural Networks", JMLR 17 (2016), section
5.1.1: a network trained on labelled source moons fails on the same moons rotated by 35
degrees (the target, unlabelled); the same network trained adversarially classifies them.
This script reproduces that over several seeds and checks it.

One hidden layer ``h`` feeds a label head (trained on source labels) and a domain head
(trained to tell source from target). Between ``h`` and the domain head sits
``gradbridge_ext.Bridge(grad_scale)``: the forward is the identity; the backward hands
``h`` ``grad_scale`` times the domain head's gradient. With ``-lambda`` (DANN) the hidden
layer learns to make the domains indistinguishable while the domain head tries to
separate them; with 0 (the control, the paper's "standard NN") the domain head still
learns, but the hidden layer ignores it. lambda is set every step as a plain float:
``layer.grad_scale = -lam``.

Settings, and where they come from:

- from the paper, section 5.1.1: two inter-twinning moons, 150 labelled source points per
  class, 300 unlabelled target points, the target rotated by 35 degrees; one hidden layer
  of 15 units; the shallow network of Algorithm 1 (section 4.1): sigmoid hidden units, a
  softmax label output, a logistic domain regressor.
- from the authors' code (github.com/GRAAL-Research/domain_adversarial_neural_network,
  ``experiments_moons.py``, ``DANN.py``), where we are not sure the paper states them:
  lambda 6 (fixed), learning rate 0.05, 500 epochs, moons noise 0.05, points centred on
  the source mean and scaled by 2, the rotation about that centre, Glorot-uniform weights
  with zero biases and a zero domain regressor, the target accuracy measured on the 300
  target points trained on. (The code draws 150 source points in all; we draw the
  paper's 300.)
- from section 5.2 (the paper's deep experiments, not this toy): lambda rises as
  ``2 / (1 + exp(-10 p)) - 1`` of its final value over training progress ``p``, the
  learning rate falls as ``1 / (1 + 10 p) ** 0.75`` of its first value, and the reversal
  layer scales the domain loss's gradient by ``-lambda`` (the domain regressor's own loss
  is not weighted, where Algorithm 1 weights it by lambda too).
- our choices, and why: full-batch SGD, momentum 0.9, learning rate 0.5, 3000 steps, where
  Algorithm 1 takes a step of 0.05 after every source example (paired with a random target
  example), with a fixed lambda of 6, for 500 epochs. That is 150,000 sequential steps,
  minutes at this machine's ~3 ms per eager step; cut to 30 epochs it had not converged
  (target 0.73-0.86 over 5 seeds). Full-batch and mini-batch SGD with a fixed lambda of 6
  collapsed on every seed (the hidden layer saturates, source accuracy 0.5); section 5.2's
  schedule, which starts lambda at 0, is what keeps it stable. Seeds 0-4, each with its
  own data (sklearn's ``make_moons``, random states ``2 s + 1`` and ``2 s + 2``; seed 0
  uses the code's) and its own initial weights. The seeds train side by side as one
  batched network (batched matmuls keep each seed's weights, data and gradients apart).

The adversarial game does not settle the way plain training does: a seed's final target
accuracy moves with the step count (at 1500 steps the reversal's mean was 0.871, from 0.727
to 0.997) and even with the rounding of the loss's reduction. Hence five seeds, and a
check on their mean and on how many of them the reversal wins, not on any one seed.

At the end the same training step is timed with ``Bridge``, pytorch-revgrad's ``RevGrad``
and torch-gradient-reversal's ``GradientReversalLayer`` as the reversal layer.

    python examples/domain_adversarial.py [--steps 3000] [--seeds 5] [--plot PATH] [--compile]

``--compile`` also trains under ``torch.compile(fullgraph=True)`` and checks it follows
eager: lambda is a new float every step, and gradbridge_ext's compile rule takes it as a
symbolic float after one recompile instead of compiling a graph per value.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import make_moons
from torch import Tensor, nn

import gradbridge_ext

N = 300  # source points (150 per class), and target points
NOISE = 0.05
ROTATION = math.radians(35)
HIDDEN = 15
LAMBDA = 6.0
LR = 0.5
MOMENTUM = 0.9
STEPS = 3000
SEEDS = 5

# ---------------------------------------------------------------------------- data


@dataclass
class Moons:
    """Per seed: labelled source points, target points (labels only evaluate). Shapes [seeds, N, ...]."""

    xs: Tensor
    ys: Tensor
    xt: Tensor
    yt: Tensor

    @classmethod
    def make(cls, seeds: int) -> Moons:
        c, s = math.cos(ROTATION), math.sin(ROTATION)
        rotation = np.array(((c, -s), (s, c)))  # counter-clockwise
        xs, ys, xt, yt = [], [], [], []
        for seed in range(seeds):
            source, source_labels = make_moons(N, noise=NOISE, random_state=2 * seed + 1)
            target, target_labels = make_moons(N, noise=NOISE, random_state=2 * seed + 2)
            centre = source.mean(0)
            xs.append(2 * (source - centre))
            xt.append(2 * (target - centre) @ rotation.T)
            ys.append(source_labels)
            yt.append(target_labels)
        xs, ys, xt, yt = (torch.from_numpy(np.stack(a)) for a in (xs, ys, xt, yt))
        return cls(xs.float(), ys, xt.float(), yt)


# ---------------------------------------------------------------------------- model


def _glorot(fan_in: int, fan_out: int, generators: list[torch.Generator]) -> Tensor:
    """Glorot-uniform weights, [seeds, fan_in, fan_out], each seed's from its own generator."""
    bound = math.sqrt(6.0 / (fan_in + fan_out))
    return torch.stack([(2 * torch.rand(fan_in, fan_out, generator=g) - 1) * bound for g in generators])


class ShallowDANN(nn.Module):
    """Algorithm 1's network, one copy per seed: weights are [seeds, in, out], inputs [seeds, points, in].

    hidden -> label head; hidden -> reversal -> domain head (one logit: target or not).
    """

    def __init__(self, seeds: int, reversal: nn.Module) -> None:
        super().__init__()
        generators = [torch.Generator().manual_seed(seed) for seed in range(seeds)]
        self.W = nn.Parameter(_glorot(2, HIDDEN, generators))
        self.b = nn.Parameter(torch.zeros(seeds, 1, HIDDEN))
        self.V = nn.Parameter(_glorot(HIDDEN, 2, generators))
        self.c = nn.Parameter(torch.zeros(seeds, 1, 2))
        self.reversal = reversal
        self.u = nn.Parameter(torch.zeros(seeds, HIDDEN, 1))
        self.d = nn.Parameter(torch.zeros(seeds, 1, 1))

    def hidden(self, x: Tensor) -> Tensor:
        return torch.sigmoid(torch.baddbmm(self.b, x, self.W))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h = self.hidden(x)
        return torch.baddbmm(self.c, h, self.V), torch.baddbmm(self.d, self.reversal(h), self.u).squeeze(-1)


def reversals() -> dict[str, Callable[[], nn.Module]]:
    """The reversal layers installed here: Bridge always, the PyPI ones when importable."""
    # attach=True keeps Bridge in the graph while lambda is still 0 at the first step,
    # so later steps can change grad_scale on the same module.
    found: dict[str, Callable[[], nn.Module]] = {"bridge": lambda: gradbridge_ext.Bridge(-1.0, attach=True)}
    try:
        from pytorch_revgrad import RevGrad
    except ImportError:
        pass
    else:
        found["pytorch-revgrad"] = lambda: RevGrad(alpha=1.0)
    try:  # PyPI's torch-gradient-reversal installs the module gradient_reversal
        from gradient_reversal import GradientReversalLayer
    except ImportError:
        pass
    else:
        found["torch-gradient-reversal"] = lambda: GradientReversalLayer(alpha=1.0)
    return found


def _bridge_set(layer: nn.Module, lam: float) -> None:
    layer.grad_scale = -lam  # a Python float; -0.0 at the first step gives no gradient


SET_LAMBDA: dict[str, Callable[[nn.Module, float], None]] = {
    "bridge": _bridge_set,
    "pytorch-revgrad": lambda layer, lam: layer._alpha.fill_(lam),  # a tensor attribute; backward: -alpha
    "torch-gradient-reversal": lambda layer, lam: layer.set_alpha(lam),
}

CONTROL = lambda: gradbridge_ext.Bridge(0.0)  # noqa: E731
"""The paper's standard NN: the domain head learns, but no gradient from it reaches the hidden layer."""

ALL_NAMES = ("bridge", "pytorch-revgrad", "torch-gradient-reversal")


# ---------------------------------------------------------------------------- training


def grl_lambda(progress: float) -> float:
    """Section 5.2's schedule, scaled to reach this toy's lambda: 0 at the start, close to LAMBDA at the end."""
    return LAMBDA * (2.0 / (1.0 + math.exp(-10.0 * progress)) - 1.0)


def learning_rate(progress: float) -> float:
    """Section 5.2's annealing, ``LR / (1 + 10 p) ** 0.75``: it damps the adversarial game as lambda grows."""
    return LR / (1.0 + 10.0 * progress) ** 0.75


def _step(forward: nn.Module, optimizer: torch.optim.Optimizer, data: Moons) -> Tensor:
    """One full-batch step on every seed: label loss on the source, domain loss on both domains."""
    n = data.xs.shape[1]
    label_logits, domain_logits = forward(torch.cat((data.xs, data.xt), dim=1))
    domain = torch.cat((torch.zeros(n), torch.ones(n))).expand_as(domain_logits)
    # Each seed's mean loss, summed over seeds: each seed's weights get only their own gradient.
    loss = F.cross_entropy(label_logits[:, :n].flatten(0, 1), data.ys.flatten(), reduction="sum") / n
    loss = loss + F.binary_cross_entropy_with_logits(domain_logits, domain, reduction="sum") / (2 * n)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss.detach()


@torch.no_grad()
def accuracy(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """Per seed."""
    return (model(x)[0].argmax(-1) == y).float().mean(1)


@dataclass
class Result:
    source_acc: Tensor  # per seed
    target_acc: Tensor
    losses: list[float]
    model: ShallowDANN


def train(
    reversal: Callable[[], nn.Module] | str = "bridge",
    *,
    steps: int = STEPS,
    seeds: int = SEEDS,
    compile: bool = False,
    backend: str | Callable[..., object] = "inductor",
) -> Result:
    """Train one network per seed for ``steps`` full-batch steps; lambda follows :func:`grl_lambda`.

    ``reversal`` names a layer of :func:`reversals` or builds one (e.g. ``CONTROL``, whose
    grad_scale stays 0). With ``compile``, the forward runs under
    ``torch.compile(fullgraph=True)``: lambda is a new float every step, and gradbridge_ext's
    compile rule takes it as a symbolic float after one recompile.
    """
    name = reversal if isinstance(reversal, str) else "control"
    layer = (reversals()[reversal] if isinstance(reversal, str) else reversal)()
    data = Moons.make(seeds)
    model = ShallowDANN(seeds, layer)
    forward = torch.compile(model, backend=backend, fullgraph=True) if compile else model
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    losses = []
    for step in range(steps):
        if name != "control":
            SET_LAMBDA[name](layer, grl_lambda(step / steps))
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step / steps)
        losses.append(_step(forward, optimizer, data).item())
    return Result(accuracy(model, data.xs, data.ys), accuracy(model, data.xt, data.yt), losses, model)


def conclusions(dann: Result, control: Result) -> list[tuple[str, bool]]:
    """What the runs show, checked on them: each statement and whether it holds."""
    gain = dann.target_acc - control.target_acc
    seeds = len(gain)
    return [
        ("both fit the labelled source (accuracy >= 0.95 on every seed)",
         bool((dann.source_acc >= 0.95).all() and (control.source_acc >= 0.95).all())),
        ("the control misclassifies part of the rotated target (mean accuracy < 0.9)",
         control.target_acc.mean().item() < 0.9),
        ("the reversal beats the control on the target on average",
         gain.mean().item() > 0),
        (f"the reversal beats the control on the target on at least {seeds - 1} of {seeds} seeds",
         int((gain > 0).sum()) >= seeds - 1),
    ]  # fmt: skip


def _summary(name: str, acc: Tensor) -> str:
    per_seed = " ".join(f"{a:.3f}" for a in acc.tolist())
    return (
        f"  {name:28} {acc.mean():.3f} +- {acc.std():.3f}  (min {acc.min():.3f}, max {acc.max():.3f})"
        f"  per seed: {per_seed}"
    )


def plot(dann: Result, control: Result, data: Moons, path: str, seed: int = 0) -> None:
    """Both decision boundaries of one seed over its source and target points, as the paper's figure does."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs, ys, xt = data.xs[seed], data.ys[seed], data.xt[seed]
    every = torch.cat((xs, xt))
    lo, hi = every.min(0).values - 0.5, every.max(0).values + 0.5
    gx, gy = torch.meshgrid(torch.linspace(lo[0], hi[0], 300), torch.linspace(lo[1], hi[1], 300), indexing="xy")
    grid = torch.stack((gx.flatten(), gy.flatten()), dim=1)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.4), sharey=True)
    titles = ("standard NN (grad_scale 0)", f"DANN (grad_scale -lambda, 0 to -{LAMBDA:g})")
    for ax, title, result in zip(axes, titles, (control, dann)):
        model = result.model
        with torch.no_grad():
            inputs = grid.expand(model.W.shape[0], -1, -1)
            label = model(inputs)[0][seed].argmax(-1).reshape(gx.shape)
        ax.contourf(gx, gy, label, levels=(-0.5, 0.5, 1.5), colors=("#f4b6b6", "#b6e3b6"))
        ax.contour(gx, gy, label, levels=(0.5,), colors="k", linewidths=2)
        ax.scatter(*xs[ys == 0].T, marker="+", c="#c00000", s=30, label="source, class 0")
        ax.scatter(*xs[ys == 1].T, marker="_", c="#007000", s=30, label="source, class 1")
        ax.scatter(*xt.T, c="k", s=6, label="target (unlabelled)")
        ax.set_title(f"{title}: target accuracy {result.target_acc[seed]:.3f}")
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0].legend(loc="lower left", fontsize=8)
    fig.suptitle(f"Inter-twinning moons, target rotated 35 degrees (seed {seed}; Ganin et al. 2016, section 5.1.1)")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    print(f"wrote {path}")


def time_step(name: str, *, steps: int = 200, compile: bool = False) -> float:
    """Seconds per training step (lambda update, forward, backward, SGD) with this reversal layer."""
    layer = reversals()[name]()
    data = Moons.make(SEEDS)
    model = ShallowDANN(SEEDS, layer)
    if compile:
        # NB: each layer from a clean slate. Graphs compiled for other layers or shapes stay
        # cached on the same forward and count against dynamo's recompile limit; after a
        # shape change we saw the float lambda specialized again, a recompile per value.
        torch._dynamo.reset()
    forward = torch.compile(model, fullgraph=True) if compile else model
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)

    def run(count: int) -> None:
        for step in range(count):
            SET_LAMBDA[name](layer, grl_lambda(step / count))
            _step(forward, optimizer, data)

    run(max(10, steps // 10))  # warm up: caches, allocator, compilation
    start = time.perf_counter()
    run(steps)
    return (time.perf_counter() - start) / steps


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=STEPS, help=f"training steps (default {STEPS})")
    parser.add_argument("--seeds", type=int, default=SEEDS, help=f"seeds, trained side by side (default {SEEDS})")
    parser.add_argument("--plot", metavar="PATH", help="write both decision boundaries (seed 0) to this PNG")
    parser.add_argument("--compile", action="store_true", help="also train under torch.compile and compare")
    parser.add_argument("--timing-steps", type=int, default=100, help="steps timed per layer")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (default 1)")
    args = parser.parse_args()
    if args.plot and importlib.util.find_spec("matplotlib") is None:
        # Before training, not after it: a missing plotter must not cost the run its conclusions.
        parser.error("--plot needs matplotlib: pip install -r examples/requirements.txt")  # fmt: skip
    # NB: one thread by default. The tensors are tiny, so intra-op threads only add
    # synchronisation, and on a busy 2-core machine their spinning cost 10x per step.
    torch.set_num_threads(args.threads)

    environment = f"torch {torch.__version__}, device cpu, {torch.get_num_threads()} CPU thread(s)"
    print(f"{environment}; {args.seeds} seeds, {args.steps} full-batch steps, lambda up to {LAMBDA}")
    dann = train("bridge", steps=args.steps, seeds=args.seeds)
    control = train(CONTROL, steps=args.steps, seeds=args.seeds)
    print("\ntarget accuracy, mean +- std over seeds:")
    print(_summary("DANN (Bridge, -lambda)", dann.target_acc))
    print(_summary("control (grad_scale 0)", control.target_acc))
    print(f"source accuracy: DANN min {dann.source_acc.min():.3f}, control min {control.source_acc.min():.3f}")

    checked = conclusions(dann, control)
    if args.compile:
        compiled = train("bridge", steps=50, seeds=args.seeds, compile=True)
        eager = train("bridge", steps=50, seeds=args.seeds)
        close = all(math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-5) for a, b in zip(compiled.losses, eager.losses))
        checked.append(("50 steps under torch.compile(fullgraph=True) give eager's losses, each within 1e-4 "
                        "relative (or 1e-5 absolute)", close))

    found = reversals()
    print(f"\ntime per training step, same network and data ({environment}):")
    for name in ALL_NAMES:
        if name not in found:
            print(f"  {name:24} not installed: skipped")
            continue
        for compiled in [False, True] if args.compile else [False]:
            label = f"{name} ({'compiled' if compiled else 'eager'})"
            try:
                seconds = time_step(name, steps=args.timing_steps, compile=compiled)
            except Exception as error:  # e.g. a layer that cannot compile with fullgraph=True
                print(f"  {label:35} failed: {type(error).__name__}: {str(error).splitlines()[0]}")
                continue
            print(f"  {label:35} {seconds * 1e6:8.1f} us")

    print("\nChecked on the runs above:")
    for statement, holds in checked:
        print(f"  [{'yes' if holds else 'NO '}] {statement}")
    if args.plot:
        plot(dann, control, Moons.make(args.seeds), args.plot)
    return 0 if all(holds for _, holds in checked) else 1


if __name__ == "__main__":
    raise SystemExit(main())
