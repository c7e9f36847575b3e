"""Domain-adversarial training (DANN, Ganin & Lempitsky 2015) with ``Bridge`` as the reversal layer.

A feature extractor feeds two heads: a label head trained on labelled source data only,
and a domain head that learns to tell source from target. Between the features and the
domain head sits ``gradbridge_ext.Bridge(grad_scale=-lambda)``: the forward is the
identity, the backward hands the features ``-lambda`` times the domain head's gradient,
so the features learn to make the domains indistinguishable while the domain head
still tries to separate them. lambda follows the paper's schedule,
``2 / (1 + exp(-10 p)) - 1`` for training progress ``p`` from 0 to 1, and is set every
step as a plain float attribute: ``model.reversal.grad_scale = -lam``.

The data are made here: two interleaved half moons (two classes) plus six label-free
noise features in the source domain; in the target domain the moons are rotated and the
noise features offset, and the target's labels only measure accuracy. A control run
keeps the domain head but gives the features none of its gradient (grad_scale 0): the
domain head then tells the domains apart easily. At the end the same training is timed
with ``Bridge``, pytorch-revgrad's ``RevGrad`` and torch-gradient-reversal's
``GradientReversalLayer`` swapped in as the reversal layer.

    python examples/domain_adversarial.py [--steps 600] [--device cuda] [--compile]

``--compile`` also trains under ``torch.compile(fullgraph=True)``: lambda is a new float
every step, and gradbridge_ext's compile rule takes it as a symbolic float after one
recompile instead of compiling a graph per value.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import gradbridge_ext

SEED = 0
BATCH = 64  # per domain and step
HIDDEN = 32
LR = 0.1
NUISANCE = 6  # input features that carry no label: noise around 0 in source, ...
OFFSET = 1.0  # ... around OFFSET in target (a sensor offset)
ROTATION = math.radians(15)  # and the target's moons are rotated
IN_FEATURES = 2 + NUISANCE


def grl_lambda(progress: float) -> float:
    """The paper's schedule: 0 at the start of training, close to 1 at the end."""
    return 2.0 / (1.0 + math.exp(-10.0 * progress)) - 1.0


def learning_rate(progress: float) -> float:
    """The paper's annealing, ``LR / (1 + 10 p) ** 0.75``: it keeps the adversarial game stable."""
    return LR / (1.0 + 10.0 * progress) ** 0.75


# ---------------------------------------------------------------------------- data


def moons(n: int, generator: torch.Generator, noise: float = 0.1) -> tuple[Tensor, Tensor]:
    """``n`` points on two interleaved half circles, label 0 or 1, with Gaussian noise."""
    labels = torch.randint(0, 2, (n,), generator=generator)
    angle = torch.rand(n, generator=generator) * math.pi
    upper = torch.stack((torch.cos(angle), torch.sin(angle)), dim=1)
    lower = torch.stack((1 - torch.cos(angle), 0.5 - torch.sin(angle)), dim=1)
    points = torch.where(labels[:, None] == 0, upper, lower)
    return points + noise * torch.randn(n, 2, generator=generator), labels


def domain(n: int, generator: torch.Generator, target: bool) -> tuple[Tensor, Tensor]:
    """``n`` inputs and labels: moons (rotated about their centre in target) and nuisance features."""
    points, labels = moons(n, generator)
    if target:
        c, s = math.cos(ROTATION), math.sin(ROTATION)
        centre = torch.tensor((0.5, 0.25))
        rotation = torch.tensor(((c, s), (-s, c)))  # row vectors times this turn counter-clockwise
        points = (points - centre) @ rotation + centre
    nuisance = 0.5 * torch.randn(n, NUISANCE, generator=generator) + (OFFSET if target else 0.0)
    return torch.cat((points, nuisance), dim=1), labels


@dataclass
class Domains:
    """Labelled source, unlabelled target (its labels only evaluate), on one device."""

    source: tuple[Tensor, Tensor]
    target: tuple[Tensor, Tensor]

    @classmethod
    def make(cls, n: int, seed: int, device: str) -> Domains:
        generator = torch.Generator().manual_seed(seed)
        xs, ys = domain(n, generator, target=False)
        xt, yt = domain(n, generator, target=True)
        return cls((xs.to(device), ys.to(device)), (xt.to(device), yt.to(device)))


# ---------------------------------------------------------------------------- model


class DANN(nn.Module):
    """features -> label head; features -> reversal -> domain head."""

    def __init__(self, reversal: nn.Module) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Linear(IN_FEATURES, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, HIDDEN), nn.ReLU()
        )
        self.label_head = nn.Linear(HIDDEN, 2)
        self.reversal = reversal
        self.domain_head = nn.Sequential(nn.Linear(HIDDEN, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, 2))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        f = self.features(x)
        return self.label_head(f), self.domain_head(self.reversal(f))


@dataclass(frozen=True)
class Reversal:
    """How to build a gradient reversal layer and set its lambda."""

    make: Callable[[], nn.Module]
    set_lambda: Callable[[nn.Module, float], None]


def _bridge_set(layer: nn.Module, lam: float) -> None:
    layer.grad_scale = -lam  # a Python float; -0.0 at the first step gives no gradient


def _revgrad_set(layer: nn.Module, lam: float) -> None:
    layer._alpha.fill_(lam)  # a plain tensor attribute (no grad); backward multiplies by -alpha


def reversals() -> dict[str, Reversal]:
    """The reversal layers installed here: Bridge always, the PyPI ones when importable."""
    # attach=True keeps Bridge in the graph while lambda is still 0 at the first step,
    # so later steps can change grad_scale on the same module.
    found = {"bridge": Reversal(lambda: gradbridge_ext.Bridge(-1.0, attach=True), _bridge_set)}
    try:
        from pytorch_revgrad import RevGrad
    except ImportError:
        pass
    else:
        found["pytorch-revgrad"] = Reversal(lambda: RevGrad(alpha=1.0), _revgrad_set)
    try:  # PyPI's torch-gradient-reversal installs the module gradient_reversal
        from gradient_reversal import GradientReversalLayer
    except ImportError:
        pass
    else:
        found["torch-gradient-reversal"] = Reversal(
            lambda: GradientReversalLayer(alpha=1.0), lambda layer, lam: layer.set_alpha(lam)
        )
    return found


NOT_REVERSED = Reversal(lambda: gradbridge_ext.Bridge(0.0, attach=True), lambda layer, lam: None)
"""The control: the domain head learns, but no gradient from it reaches the features."""

ALL_NAMES = ("bridge", "pytorch-revgrad", "torch-gradient-reversal")


# ---------------------------------------------------------------------------- training


@dataclass
class History:
    """Per-epoch accuracies and lambda, the loss of every step, and the parameters at the end."""

    source_acc: list[float] = field(default_factory=list)
    target_acc: list[float] = field(default_factory=list)
    domain_acc: list[float] = field(default_factory=list)
    lam: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    state: dict[str, Tensor] = field(default_factory=dict)


def build(reversal: Reversal, device: str, seed: int = SEED) -> DANN:
    torch.manual_seed(seed)  # the same weights whichever reversal layer is plugged in
    return DANN(reversal.make()).to(device)


@torch.no_grad()
def evaluate(model: nn.Module, data: Domains) -> tuple[float, float, float]:
    """Label accuracy on source and target, and the domain head's accuracy on both."""
    xs, ys = data.source
    xt, yt = data.target
    label_s, domain_s = model(xs)
    label_t, domain_t = model(xt)
    domain_ok = (domain_s.argmax(1) == 0).sum() + (domain_t.argmax(1) == 1).sum()
    return (
        (label_s.argmax(1) == ys).float().mean().item(),
        (label_t.argmax(1) == yt).float().mean().item(),
        domain_ok.item() / (len(xs) + len(xt)),
    )


def _step(
    forward: Callable[[Tensor], tuple[Tensor, Tensor]],
    optimizer: torch.optim.Optimizer,
    xs: Tensor,
    ys: Tensor,
    xt: Tensor,
) -> Tensor:
    label_logits, domain_logits = forward(torch.cat((xs, xt)))
    domain = torch.cat((torch.zeros_like(ys), torch.ones_like(ys)))
    # The label loss sees labelled source only; the domain loss sees both domains.
    loss = F.cross_entropy(label_logits[: len(xs)], ys) + F.cross_entropy(domain_logits, domain)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss.detach()


def train(
    steps: int = 600,
    *,
    epochs: int = 6,
    reversal: str | Reversal = "bridge",
    device: str = "cpu",
    compile: bool = False,
    backend: str | Callable[..., Any] = "inductor",
    seed: int = SEED,
    verbose: bool = False,
) -> History:
    """Train a DANN for ``steps`` steps and evaluate it ``epochs`` times along the way.

    ``reversal`` names a layer of :func:`reversals` or is a :class:`Reversal` (e.g.
    ``NOT_REVERSED``). With ``compile``, the model's forward runs under
    ``torch.compile(fullgraph=True)``; lambda changes every step without recompiling
    (with a gradbridge_ext whose compile rule takes grad_scale as a symbolic float).
    Evaluation runs the eager model, so the compiled graph serves training steps only.
    """
    layer = reversals()[reversal] if isinstance(reversal, str) else reversal
    data = Domains.make(4 * BATCH * 8, seed, device)
    model = build(layer, device, seed)
    forward = torch.compile(model, backend=backend, fullgraph=True) if compile else model
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    generator = torch.Generator().manual_seed(seed + 1)
    n = len(data.source[0])
    history = History()
    for step in range(steps):
        lam = grl_lambda(step / steps)
        layer.set_lambda(model.reversal, lam)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step / steps)
        i = torch.randint(0, n, (BATCH,), generator=generator).to(device)
        j = torch.randint(0, n, (BATCH,), generator=generator).to(device)
        loss = _step(forward, optimizer, data.source[0][i], data.source[1][i], data.target[0][j])
        history.losses.append(loss.item())
        if (step + 1) * epochs // steps != step * epochs // steps or step + 1 == steps:
            accuracies = evaluate(model, data)
            for values, value in zip((history.source_acc, history.target_acc, history.domain_acc), accuracies):
                values.append(value)
            history.lam.append(lam)
            if verbose:
                epoch = len(history.lam)
                print(
                    f"epoch {epoch:2d}  step {step + 1:5d}  lambda {lam:.3f}  "
                    f"label acc: source {accuracies[0]:.3f} target {accuracies[1]:.3f}  "
                    f"domain acc {accuracies[2]:.3f}"
                )
    history.state = {name: p.detach().clone() for name, p in model.named_parameters()}
    return history


def time_step(
    reversal: Reversal,
    device: str,
    *,
    steps: int = 200,
    compile: bool = False,
    backend: str = "inductor",
) -> float:
    """Seconds per training step (forward, backward, SGD, lambda update) with this layer."""
    data = Domains.make(4 * BATCH, SEED, device)
    model = build(reversal, device)
    forward = torch.compile(model, backend=backend, fullgraph=True) if compile else model
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    xs, ys = data.source[0][:BATCH], data.source[1][:BATCH]
    xt = data.target[0][:BATCH]

    def run(count: int) -> None:
        for step in range(count):
            reversal.set_lambda(model.reversal, grl_lambda(step / count))
            _step(forward, optimizer, xs, ys, xt)
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    run(max(10, steps // 10))  # warm up: caches, allocator, compilation
    start = time.perf_counter()
    run(steps)
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=600, help="training steps (default 600)")
    parser.add_argument("--epochs", type=int, default=6, help="evaluations along the way")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--compile", action="store_true", help="also train under torch.compile")
    parser.add_argument("--timing-steps", type=int, default=200, help="steps timed per layer")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (default 1)")
    args = parser.parse_args()
    # NB: one thread by default. The tensors are tiny, so intra-op threads only add
    # synchronisation, and on a busy 2-core machine their spinning cost 10x per step.
    torch.set_num_threads(args.threads)

    environment = f"torch {torch.__version__}, device {args.device}, {torch.get_num_threads()} CPU thread(s)"
    print(f"{environment}; {args.steps} steps of {BATCH} source + {BATCH} target points")
    modes = [False, True] if args.compile else [False]
    for compiled in modes:
        print(f"\nDANN, reversal layer Bridge, {'torch.compile(fullgraph=True)' if compiled else 'eager'}")
        train(args.steps, epochs=args.epochs, device=args.device, compile=compiled, verbose=True)
    print("\ncontrol: grad_scale 0 (the domain head learns, the features ignore it)")
    train(args.steps, epochs=args.epochs, reversal=NOT_REVERSED, device=args.device, verbose=True)

    found = reversals()
    print(f"\ntime per training step, same model and data ({environment}):")
    for name in ALL_NAMES:
        if name not in found:
            print(f"  {name:24} not installed: skipped")
            continue
        for compiled in modes:
            label = f"{name} ({'compiled' if compiled else 'eager'})"
            try:
                seconds = time_step(found[name], args.device, steps=args.timing_steps, compile=compiled)
            except Exception as error:  # e.g. a layer that cannot compile with fullgraph=True
                print(f"  {label:35} failed: {type(error).__name__}: {str(error).splitlines()[0]}")
                continue
            print(f"  {label:35} {seconds * 1e6:8.1f} us")


if __name__ == "__main__":
    main()
