"""Gradient routing with ``bridge(encoding, mask)``: an autoencoder whose encoding is split by digit.

Cloud, Goldman-Wetzler, Wybitul, Miller and Turner, "Gradient Routing: Masking Gradients to
Localize Computation in Neural Networks" (arXiv 2410.04332), first result: an MNIST
autoencoder is trained with the gradient of its encoding masked per example, so that digits
0-4 train one half of the encoding and digits 5-9 the other; the loss is unchanged, every
image still decodes from the whole encoding. A decoder trained afterwards on one half alone
(a "certificate") then reconstructs that half's digits and not the others. This script
reproduces that on scikit-learn's digits (8x8 images, shipped with the package: no download)
over several seeds, and checks it.

The routing is one call, ``gradbridge_ext.bridge(encoding, mask)``, with ``mask`` of shape
(batch, 32) built from each example's label: 1 on its group's half, 0 on the other. The
forward is ``encoding`` itself (an alias, no kernel); the backward is ``mask * grad``. The
authors write it ``mask * x + (1 - mask) * x.detach()`` (``idiom`` below, as in their posts
and code): four elementwise kernels and three temporaries in the forward. Three models train
side by side from the same start, on the same batches: routed with ``bridge``, routed with
the idiom, and the control, not routed (every other term the same).

Settings, and where they come from:

- from the authors' code (``projects/mnist/representation_splitting.py`` and
  ``runs_for_paper_main.py`` in their repository, the paper's main MNIST setting): an MLP
  encoder with two hidden layers and ReLU, a 32-dimensional encoding, its last layer without
  bias; one decoder, the encoder's mirror, for both groups; pixels scaled to [-1, 1]; the
  loss is the mean absolute error of each group's reconstructions (one mean per group,
  summed), plus 3e-3 times an L1 penalty on each half of the encoding (the sum over its
  dimensions of the mean |value|) and 0.1 times the mean absolute correlation between the
  two halves' dimensions over the batch; both penalties see the encoding before routing.
  Adam with weight decay 5e-5. Certificates: the decoder's shape from one half (16
  dimensions), trained with the same loss on the encoder's output, evaluated by per-image
  squared error on held-out images, averaged per digit.
- what 8x8 digits change, and why: hidden layers of 256 and 128 (theirs, for 784 pixels,
  2048 and 512); 1347 training and 450 held-out images (MNIST's 60,000 and 10,000); batches
  of 128 and 800 steps at learning rate 3e-3 (theirs: 2048, 200 epochs, 1e-3), which keeps
  a seed to seconds on one CPU thread (at 2e-3 the control's halves drifted further apart by
  chance, up to 1.8 times). The certificates are trained after the autoencoder, 400 steps on
  the frozen encoder, one per half (theirs: one, on one half, alongside training on a
  detached encoding; nothing flows back either way, so the two are the same measurement).

Checked on every seed (``SPLIT`` says how the bar was chosen): each half's certificate
reconstructs its own digits at least ``SPLIT`` times better than the other group's; the
control shows no such split; the losses of ``bridge`` and the idiom are equal at every step
and their encoders end equal (both bitwise: with a 0/1 mask each of the idiom's operations
is exact, see ``TOLERANCE``); ``bridge``'s result is the encoder's output itself, bitwise and
in the same memory, and with a weighted mask (0.1 for the other half) the idiom's values move
off the encoder's output while ``bridge``'s do not. The step time, bridge / idiom, is printed,
not checked (the routing is a small part of this step). ``--plot PATH`` draws each half's
reconstruction error per digit.

    python examples/gradient_routing.py [--seeds 0,1,2] [--steps 800] [--plot PATH]
"""

from __future__ import annotations

import argparse
import importlib.util
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from sklearn.datasets import load_digits
from torch import Tensor, nn

import gradbridge_ext

SEEDS = (0, 1, 2)
STEPS = 800
CERTIFICATE_STEPS = 400
BATCH = 128
LR = 3e-3
WEIGHT_DECAY = 5e-5
HIDDEN = (256, 128)
LATENT = 32
L1 = 3e-3  # per half
CORRELATION = 0.1
TEST = 450  # held-out images, of 1797
GROUPS = {"0-4": range(0, 5), "5-9": range(5, 10)}
HALVES = {"0-4": slice(0, LATENT // 2), "5-9": slice(LATENT // 2, LATENT)}  # each group's half
# Each half's certificate must reconstruct the other group's digits SPLIT times worse than its
# own, and the control's must not favour either group by that much. Over seeds 0-9 the routed
# halves' ratios ran from 2.77 to 3.82, the control's up to 1.67 either way: its halves do favour
# one group by chance (the L1 and correlation penalties still pull them apart), so its bar is
# on the ratio either way up, and the bar sits between the two, about as far from each.
SPLIT = 2.2
# With a 0/1 mask the idiom's forward is exact (x * 1 = x, x * 0 = 0, x + 0 = x) and its
# backward is mask * grad, as bridge's: the two trainings are the same arithmetic, so their
# losses are compared bitwise. They differ in cost, and in values where the mask is weighted.
TOLERANCE = 0.0
LEAK = 0.1  # the weighted mask's value on the other group's half


def idiom(x: Tensor, mask: Tensor) -> Tensor:
    """The authors' spelling: x's values (up to rounding), mask * grad to x."""
    return mask * x + (1 - mask) * x.detach()


ROUTES: dict[str, Callable[[Tensor, Tensor], Tensor] | None] = {
    "bridge": gradbridge_ext.bridge,
    "idiom": idiom,
    "no routing": None,  # the control
}
CERTIFIED = ("bridge", "no routing")  # the idiom's encoder is checked equal to bridge's instead


def routing_mask(labels: Tensor, other: float = 0.0) -> Tensor:
    """(batch, LATENT): 1 on the half of each example's digit group, ``other`` on the other half."""
    mask = torch.full((len(labels), LATENT), other)
    for group, digits in GROUPS.items():
        rows = (labels >= digits.start) & (labels < digits.stop)
        mask[rows, HALVES[group]] = 1.0
    return mask


@dataclass
class Digits:
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor

    @classmethod
    def load(cls) -> Digits:
        digits = load_digits()
        x = torch.tensor(digits.data, dtype=torch.float32) / 8 - 1  # [-1, 1], as the authors' MNIST
        y = torch.tensor(digits.target)
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))  # one split for every seed
        train, test = order[TEST:], order[:TEST]
        return cls(x[train], y[train], x[test], y[test])


def mlp(sizes: tuple[int, ...], last_bias: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (fan_in, fan_out) in enumerate(zip(sizes, sizes[1:])):
        last = i == len(sizes) - 2
        layers.append(nn.Linear(fan_in, fan_out, bias=last_bias or not last))
        if not last:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class Autoencoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = mlp((64, *HIDDEN, LATENT), last_bias=False)
        self.decoder = mlp((LATENT, *HIDDEN[::-1], 64))


def correlation(z: Tensor) -> Tensor:
    """Mean |correlation| between the first half's dimensions and the second's, over the batch."""
    z = (z - z.mean(0)) / z.std(0)
    first, second = z[:, HALVES["0-4"]], z[:, HALVES["5-9"]]
    return (first.T @ second / len(z)).abs().mean()


def loss(model: Autoencoder, route: Callable[[Tensor, Tensor], Tensor] | None, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The step's loss, the encoder's output and what the decoder was given (the same tensor unrouted)."""
    z = model.encoder(x)
    routed = z if route is None else route(z, routing_mask(y))
    error = (model.decoder(routed) - x).abs().mean(1)  # per image
    low = y < 5
    reconstruction = error[low].mean() + error[~low].mean()  # one mean per group, as the authors'
    penalty = sum(z[:, half].abs().mean(0).sum() for half in HALVES.values())
    return reconstruction + L1 * penalty + CORRELATION * correlation(z), z, routed


@dataclass
class SeedRun:
    seed: int
    losses: dict[str, list[float]] = field(default_factory=dict)  # per route, every step
    times: dict[str, list[float]] = field(default_factory=dict)  # seconds per step, per route
    bridge_exact: bool = True  # bridge's result was the encoder's output at every step
    encoders_equal: bool = False  # bridge's and the idiom's encoders end bitwise equal
    errors: dict[tuple[str, str], list[float]] = field(default_factory=dict)  # (route, half) -> MSE per digit
    leaked: dict[str, float] = field(default_factory=dict)  # share of values off z, weighted mask


def train(seed: int, data: Digits, steps: int = STEPS) -> tuple[SeedRun, dict[str, Autoencoder]]:
    """The three models from one start, on one batch order, their steps interleaved so that times pair up."""
    run, models, optimizers = SeedRun(seed), {}, {}
    for name in ROUTES:
        torch.manual_seed(seed)  # the same weights for every route
        models[name] = Autoencoder()
        optimizers[name] = torch.optim.Adam(models[name].parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
        run.losses[name], run.times[name] = [], []
    batches, order = torch.Generator().manual_seed(seed + 1000), random.Random(seed)
    for step in range(steps + 1):  # step 0 warms up and is not timed
        i = torch.randint(0, len(data.x_train), (BATCH,), generator=batches)
        x, y = data.x_train[i], data.y_train[i]
        # Shuffled: in a fixed order (bridge first after each batch) bridge's steps timed 1.08 of the
        # idiom's; in shuffled order, 1.00.
        for name in order.sample(list(ROUTES), len(ROUTES)):
            route = ROUTES[name]
            start = time.perf_counter()
            value, z, routed = loss(models[name], route, x, y)
            optimizers[name].zero_grad(set_to_none=True)
            value.backward()
            optimizers[name].step()
            if step:
                run.times[name].append(time.perf_counter() - start)
            run.losses[name].append(value.item())
            if name == "bridge":  # outside the timed step: the idiom's has no such check
                run.bridge_exact &= routed.data_ptr() == z.data_ptr() and torch.equal(routed, z)
    encoders = [dict(models[name].encoder.named_parameters()) for name in ("bridge", "idiom")]
    run.encoders_equal = all(torch.equal(p, encoders[1][n]) for n, p in encoders[0].items())
    with torch.no_grad():
        z = models["bridge"].encoder(data.x_test)
        weighted = routing_mask(data.y_test, other=LEAK)
        run.leaked = {"bridge": (gradbridge_ext.bridge(z, weighted) != z).float().mean().item(),
                      "idiom": (idiom(z, weighted) != z).float().mean().item()}  # fmt: skip
    return run, models


def certify(run: SeedRun, models: dict[str, Autoencoder], data: Digits, steps: int = CERTIFICATE_STEPS) -> None:
    """Per certified route and half: a decoder trained on that half of the frozen encoding, its test error per digit."""
    for name in CERTIFIED:
        with torch.no_grad():
            z_train, z_test = models[name].encoder(data.x_train), models[name].encoder(data.x_test)
        for group, half in HALVES.items():
            torch.manual_seed(run.seed + 2000)
            certificate = mlp((LATENT // 2, *HIDDEN[::-1], 64))
            optimizer = torch.optim.Adam(certificate.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
            batches = torch.Generator().manual_seed(run.seed + 3000)
            for _ in range(steps):
                i = torch.randint(0, len(z_train), (BATCH,), generator=batches)
                value = (certificate(z_train[i, half]) - data.x_train[i]).abs().mean()
                optimizer.zero_grad(set_to_none=True)
                value.backward()
                optimizer.step()
            with torch.no_grad():
                error = (certificate(z_test[:, half]) - data.x_test).square().mean(1)
            run.errors[(name, group)] = [error[data.y_test == d].mean().item() for d in range(10)]


def run_seeds(seeds: tuple[int, ...] = SEEDS, steps: int = STEPS, certificate_steps: int = CERTIFICATE_STEPS) -> list[SeedRun]:
    data = Digits.load()
    runs = []
    for seed in seeds:
        run, models = train(seed, data, steps)
        certify(run, models, data, certificate_steps)
        runs.append(run)
    return runs


def group_error(run: SeedRun, route: str, half: str, group: str) -> float:
    """Mean over the group's digits of a half's certificate's per-digit test error."""
    return statistics.mean(run.errors[(route, half)][d] for d in GROUPS[group])


def split(run: SeedRun, route: str) -> dict[str, float]:
    """Per half: the other group's error over its own group's (above 1: it favours its own digits)."""
    other = {"0-4": "5-9", "5-9": "0-4"}
    return {half: group_error(run, route, half, other[half]) / group_error(run, route, half, half) for half in HALVES}


def conclusions(runs: list[SeedRun]) -> list[tuple[str, bool]]:
    """What the runs show, checked on every seed: each statement and whether it holds."""
    routed = [r for run in runs for r in split(run, "bridge").values()]
    control = [max(r, 1 / r) for run in runs for r in split(run, "no routing").values()]
    gap = max(abs(a - b) for run in runs for a, b in zip(run.losses["bridge"], run.losses["idiom"]))
    seeds = f"seeds {', '.join(str(run.seed) for run in runs)}"
    return [
        (f"routed with bridge, each half's certificate reconstructs the other group's digits at least {SPLIT:g} "
         f"times worse than its own ({min(routed):.2f} to {max(routed):.2f} times, {seeds})", min(routed) >= SPLIT),
        (f"not routed (the control), no half's certificate favours either group by {SPLIT:g} times "
         f"(at most {max(control):.2f} times, either way)", max(control) < SPLIT),
        (f"routed with bridge and with the idiom, the losses agree to {TOLERANCE:g} at every step "
         f"(largest gap {gap:.1e}) and the encoders end bitwise equal",
         gap <= TOLERANCE and all(run.encoders_equal for run in runs)),
        ("bridge's routed encoding is the encoder's output at every step: bitwise, in the same memory",
         all(run.bridge_exact for run in runs)),
        (f"with a weighted mask ({LEAK:g} on the other half), the idiom's values are off the encoder's output in "
         f"{min(r.leaked['idiom'] for r in runs):.1%} to {max(r.leaked['idiom'] for r in runs):.1%} of the "
         "held-out encodings' elements, bridge's in none",
         all(r.leaked["bridge"] == 0 < r.leaked["idiom"] for r in runs)),
    ]  # fmt: skip


def step_time_ratio(runs: list[SeedRun]) -> float:
    """Median over paired steps of bridge's step time over the idiom's."""
    return statistics.median(a / b for run in runs for a, b in zip(run.times["bridge"], run.times["idiom"]))


def plot(runs: list[SeedRun], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    width = 0.4
    for ax, route, title in zip(axes, CERTIFIED, ("routed with bridge(encoding, mask)", "not routed (control)")):
        for k, (half, color) in enumerate(zip(HALVES, ("C0", "C1"))):
            per_seed = torch.tensor([run.errors[(route, half)] for run in runs])  # [seeds, digit]
            xs = torch.arange(10) + (k - 0.5) * width
            ax.bar(xs, per_seed.mean(0), width, color=color, label=f"certificate on the {half} half")
            for row in per_seed:
                ax.plot(xs, row, "k.", markersize=3)
        ax.axvline(4.5, color="k", linestyle=":")
        ax.set_xticks(range(10))
        ax.set_xlabel("digit (held-out images)")
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("reconstruction error (MSE)")
    axes[1].legend(loc="upper center")  # the control's bars leave the room
    seeds = ", ".join(str(run.seed) for run in runs)
    fig.suptitle(f"scikit-learn digits: a decoder on one half of the encoding (bars: mean of seeds {seeds}; dots: each seed)")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    print(f"wrote {path}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", default=",".join(map(str, SEEDS)), help="comma-separated seeds (default %(default)s)")
    parser.add_argument("--steps", type=int, default=STEPS, help=f"autoencoder steps per model (default {STEPS})")
    parser.add_argument("--plot", metavar="PATH", help="write each half's reconstruction error per digit to this PNG")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (default 1)")
    args = parser.parse_args()
    if args.plot and importlib.util.find_spec("matplotlib") is None:
        # Before training, not after it: a missing plotter must not cost the run its conclusions.
        parser.error("--plot needs matplotlib: pip install -r examples/requirements.txt")
    torch.set_num_threads(args.threads)  # small tensors: more threads only add contention
    seeds = tuple(int(s) for s in args.seeds.split(","))

    start = time.perf_counter()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU thread(s); digits: {1797 - TEST} train, "
          f"{TEST} test images; seeds {args.seeds}: {args.steps} steps of {BATCH} per model, "
          f"{CERTIFICATE_STEPS} per certificate")  # fmt: skip
    runs = run_seeds(seeds, args.steps)
    print("\ncertificate test error (MSE), mean over each group's digits: digits 0-4 / digits 5-9")
    print(f"{'seed':>5}  {'routed, 0-4 half':>18}{'routed, 5-9 half':>18}{'control, 0-4 half':>19}{'control, 5-9 half':>19}")
    for run in runs:
        cells = [f"{group_error(run, route, half, '0-4'):.3f} / {group_error(run, route, half, '5-9'):.3f}"
                 for route in CERTIFIED for half in HALVES]  # fmt: skip
        print(f"{run.seed:>5}  {cells[0]:>18}{cells[1]:>18}{cells[2]:>19}{cells[3]:>19}")
    print("\nper digit, mean over seeds (routed with bridge; control):")
    print("  half     " + "".join(f"{d:>7}" for d in range(10)))
    for route in CERTIFIED:
        for half in HALVES:
            mean = [statistics.mean(run.errors[(route, half)][d] for run in runs) for d in range(10)]
            label = f"{'routed' if route == 'bridge' else 'control'} {half}"
            print(f"  {label:<9}" + "".join(f"{e:7.3f}" for e in mean))
    final = {name: statistics.mean(run.losses[name][-1] for run in runs) for name in ROUTES}
    print("\nfinal training loss, mean over seeds: " + ", ".join(f"{n} {v:.4f}" for n, v in final.items()))
    print(f"step time bridge / idiom (median of paired steps, not checked): {step_time_ratio(runs):.3f}")
    print(f"whole run: {time.perf_counter() - start:.1f} s")
    print("\nChecked on the runs above:")
    checked = conclusions(runs)
    for statement, holds in checked:
        print(f"  [{'yes' if holds else 'NO '}] {statement}")
    if args.plot:
        plot(runs, args.plot)
    return 0 if all(holds for _, holds in checked) else 1


if __name__ == "__main__":
    raise SystemExit(main())
