"""Seed experiment: three linear layers A -> B -> C, where C learns from B's output.

With no cut, C's loss also trains A and B. Cutting the graph between B and C with
``b.detach()``, the ``zeros_like`` + ``set_`` trick or ``gradbridge_ext.bridge(b)``
gives bitwise-identical results: C's loss then trains only C, B's loss only A and B.
"""

from __future__ import annotations

import random
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import gradbridge_ext

SEED = 1000
MODES = {0: "loss on B only", 1: "loss on C only", 2: "loss on B + loss on C"}


def _set_cut(b: Tensor) -> Tensor:
    # The two-step trick people use today: a fresh tensor re-pointed at b's storage.
    with torch.no_grad():
        br = torch.zeros_like(b)
        br.set_(b)
    return br


CUTS: dict[str, Callable[[Tensor], Tensor]] = {
    "none": lambda b: b,
    "detach": Tensor.detach,
    "set_": _set_cut,
    "bridge": gradbridge_ext.bridge,
}


class ABC(nn.Module):
    """The seed model: A -> B -> C, where C learns from B's output through ``cut``.

    B is ``depth`` linear layers; the benchmark scales width and depth up, and
    the tests and this experiment use it as it is.
    """

    def __init__(self, cut: Callable[[Tensor], Tensor], width: int = 2, depth: int = 1) -> None:
        super().__init__()
        self.A = nn.Linear(width, width)
        self.B = nn.Sequential(*[nn.Linear(width, width) for _ in range(depth)])
        self.C = nn.Linear(width, width)
        self.cut = cut

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        b = self.B(self.A(x))
        return b, self.C(self.cut(b))


def loss(b: Tensor, c: Tensor, targets: tuple[Tensor, Tensor], mode: int) -> Tensor:
    """The seed's loss: on B's output (mode 0), on C's (1), or both (2)."""
    loss_b, loss_c = F.mse_loss(b, targets[0]), F.mse_loss(c, targets[1])
    return (loss_b, loss_c, loss_b + loss_c)[mode]


def _build(cut: str) -> tuple[ABC, Tensor]:
    # Seeding right before construction gives every run the same weights and input.
    random.seed(SEED)
    np.random.seed(SEED)
    torch.manual_seed(SEED)
    return ABC(CUTS[cut]), torch.randn(2)


def _state(model: ABC) -> dict[str, Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def initial_state() -> dict[str, Tensor]:
    """Parameters of A, B, C before any step."""
    return _state(_build("none")[0])


def run(cut: str, mode: int) -> dict[str, Tensor]:
    """Take one SGD step with the given cut ("none", "detach", "set_", "bridge")
    and mode (0: loss on B, 1: loss on C, 2: both); return the parameters after it."""
    model, x = _build(cut)
    opt = torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9)
    b, c = model(x)
    opt.zero_grad()
    loss(b, c, (torch.zeros(2), torch.ones(2)), mode).backward()
    # SGD skips parameters whose .grad is None, so layers the loss never reached
    # stay bitwise unchanged.
    opt.step()
    return _state(model)


def _rows(state: dict[str, Tensor]) -> list[str]:
    """Two text lines, one per output unit: `w0 w1 | bias` for A, B, C side by side."""
    layers = {name[0]: name.rsplit(".", 1)[0] for name in state}  # "B" -> "B.0"
    return [
        "   ".join(
            f"{state[f'{layers[n]}.weight'][i, 0]:8.4f}{state[f'{layers[n]}.weight'][i, 1]:8.4f} |"
            f"{state[f'{layers[n]}.bias'][i]:8.4f}"
            for n in "ABC"
        )
        for i in range(2)
    ]


def _table(title: str, states: dict[str, dict[str, Tensor]]) -> str:
    header = "   ".join(f"{n + ' (weight | bias)':^26}" for n in "ABC")
    lines = [title, f"{'':8}{header}".rstrip()]
    for label, state in states.items():
        first, second = _rows(state)
        lines += [f"{label:8}{first}", f"{'':8}{second}"]
    return "\n".join(lines)


def _same(a: dict[str, Tensor], b: dict[str, Tensor], layers: str = "ABC") -> bool:
    """Bitwise equal parameters of the given layers."""
    return all(torch.equal(a[name], b[name]) for name in a if name[0] in layers)


def conclusions(states: dict[int, dict[str, dict[str, Tensor]]]) -> list[tuple[str, bool]]:
    """What the tables show, checked on them: each statement and whether it holds."""
    initial = initial_state()
    return [
        (
            "detach, the set_ trick and bridge give bitwise the same weights in every mode",
            all(_same(by_cut["detach"], by_cut[cut]) for by_cut in states.values() for cut in ("set_", "bridge")),
        ),
        ("with no cut, C's loss (mode 1) also trains A and B",
         not _same(states[1]["none"], initial, "A") and not _same(states[1]["none"], initial, "B")),
        ("with bridge, C's loss (mode 1) leaves A and B unchanged", _same(states[1]["bridge"], initial, "AB")),
        ("with bridge, C's loss trains C", not _same(states[1]["bridge"], initial, "C")),
        ("with bridge, B's loss (mode 0) leaves C unchanged", _same(states[0]["bridge"], initial, "C")),
    ]


def main() -> int:
    print("Parameters of A, B and C after one SGD step, for each cut between B and C.")
    print(_table("initial", {"": initial_state()}))
    states = {mode: {cut: run(cut, mode) for cut in CUTS} for mode in MODES}
    for mode, description in MODES.items():
        print()
        print(_table(f"mode {mode}: {description}", states[mode]))
    print("\nChecked on the tables above:")
    checked = conclusions(states)
    for statement, holds in checked:
        print(f"  [{'yes' if holds else 'NO '}] {statement}")
    return 0 if all(holds for _, holds in checked) else 1


if __name__ == "__main__":
    raise SystemExit(main())
