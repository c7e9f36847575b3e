"""straight_through's settings table, as helpers.SETTINGS is bridge's, and the fast tier of a parametrized table.

Shared by test_inputs, test_lifetime, test_concurrency and test_properties.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable

import pytest
import torch
from torch import Tensor

import gradbridge_ext

ParameterSet = type(pytest.param(None))  # what pytest.param returns


def _mask(x: Tensor) -> Tensor:
    """A grad_scale tensor that broadcasts to x from its last dimension (0-dim for a 0-dim x), on x's device;
    for an x with no plain shape (straight_through refuses it first), a 0-dim one."""
    if isinstance(x, Tensor) and x.layout == torch.strided and not x.is_nested:
        return torch.full(x.shape[-1:], 0.5, device=x.device)
    return torch.tensor(0.5)


# Every way to call straight_through(x, q). Each looks the function up on the
# package when called (conftest.implementation swaps in the fallback there).
# "straight_through" is the C entry's fast path (two plain tensors); every other
# Python call goes through ops._straight_through_with_options.
ST_SETTINGS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "straight_through": lambda x, q: gradbridge_ext.straight_through(x, q),
    "grad_scale": lambda x, q: gradbridge_ext.straight_through(x, q, -0.5),
    "grad_scale keyword": lambda x, q: gradbridge_ext.straight_through(x, q, grad_scale=2.0),
    "zero grad_scale": lambda x, q: gradbridge_ext.straight_through(x, q, 0.0),
    "tensor grad_scale": lambda x, q: gradbridge_ext.straight_through(x, q, torch.tensor(0.25)),
    "mask": lambda x, q: gradbridge_ext.straight_through(x, q, _mask(x)),
    "torch.ops": lambda x, q: torch.ops.gradbridge.straight_through(x, q),
    "torch.ops tensor": lambda x, q: torch.ops.gradbridge.straight_through.Tensor(x, q, torch.tensor(3.0)),
}
# The gradient each setting sends to x per unit of incoming gradient (0: autograd's None).
ST_GRAD_SCALE = {
    "straight_through": 1.0, "grad_scale": -0.5, "grad_scale keyword": 2.0, "zero grad_scale": 0.0,
    "tensor grad_scale": 0.25, "mask": 0.5, "torch.ops": 1.0, "torch.ops tensor": 3.0,
}  # fmt: skip
# The Python entries, which raise straight_through's own TypeErrors; torch.ops parses its arguments itself.
ST_PYTHON_ENTRY = [name for name in ST_SETTINGS if not name.startswith("torch.ops")]


def covering(
    *, prefer: dict[str, object] | list[dict[str, object]] | None = None, together: Iterable[Iterable[str]] = (),
    **axes: Iterable,
) -> tuple:
    """``parametrize`` arguments for the product of ``axes``, the fast tier a covering subset of it.

    The fast tier runs every value of every axis once: the representative row
    (each axis' first value, or the one ``prefer`` names) and each other value of
    one axis with the representative of the rest (``together``: axes whose values
    the fast tier crosses in full). ``prefer`` may list several representatives,
    for a table where one value takes another code path (None, beside other
    non-tensors): the fast tier is then the union of each one's rows. Every other
    combination is marked ``slow``. A value may be a ``pytest.param``: its marks and id are kept.
    """
    names = list(axes)
    rows: dict[str, list[ParameterSet]] = {}
    for name, values in axes.items():
        rows[name] = []
        for value in values:
            param = value if isinstance(value, ParameterSet) else pytest.param(value)
            if param.id is None:
                shown = param.values[0]
                ident = shown if isinstance(shown, str) else str(shown) if isinstance(shown, (bool, int, float)) else None
                ident = str(shown).removeprefix("torch.") if isinstance(shown, torch.dtype) else ident
                param = pytest.param(shown, marks=param.marks, id=f"{name}{len(rows[name])}" if ident is None else ident)
            rows[name].append(param)
    representatives = []
    for chosen in prefer if isinstance(prefer, list) else [prefer or {}]:
        representatives.append(
            {name: next(i for i, p in enumerate(rows[name]) if name not in chosen or p.values[0] == chosen[name]) for name in names}
        )
    groups = [set(group) for group in together]
    params = []
    for picks in itertools.product(*(range(len(rows[name])) for name in names)):
        fast = False
        for first in representatives:
            differing = {name for name, i in zip(names, picks) if i != first[name]}
            fast = fast or len(differing) <= 1 or any(differing <= group for group in groups)
        chosen = [rows[name][i] for name, i in zip(names, picks)]
        marks = [mark for p in chosen for mark in p.marks] + ([] if fast else [pytest.mark.slow])
        params.append(pytest.param(*(p.values[0] for p in chosen), marks=marks, id="-".join(p.id for p in chosen)))
    return names, params
