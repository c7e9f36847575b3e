"""bridge's and straight_through's contract as properties over random strided layouts, dtypes and settings.

Each example builds t = base.as_strided(size, stride, offset) on a random 1-D
base: strides may be 0 or smaller than the sizes, so elements of t can overlap,
and some examples carry a conj or neg bit. bridge aliases t; straight_through
aliases t as its q, with an x of t's shape (and a floating dtype of t's kind) as
the source of the gradient. Writes are checked against a model: the same write
applied to a clone of the base through t's own layout.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch


from helpers import DTYPES, FLOAT8, SETTINGS, SHARES_VERSION, assert_alias, assert_view_only_if_recorded, metadata, random_values
from st_settings import ST_SETTINGS

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings
from hypothesis import strategies as st

# Four rows of the settings table: one per way the version counter and the graph go.
PROPERTY_SETTINGS = ("cut", "reversal", "attach", "strict cut")
# Four of straight_through's (its result always shares q's counter): recorded through
# the C entry, the parsed path and torch.ops, and not recorded (x needs no grad).
# Each: (the row of ST_SETTINGS, whether x requires grad).
ST_PROPERTY_SETTINGS = {
    "straight_through": ("straight_through", True),
    "straight_through, x needs no grad": ("straight_through", False),
    "straight_through mask": ("mask", True),
    "straight_through torch.ops": ("torch.ops", True),
}
EXAMPLES = settings(max_examples=150, deadline=None)  # per setting; 1200 a property
ST_DTYPES = [d for d in DTYPES if d.is_floating_point or d.is_complex]


def bytes_of(t: torch.Tensor) -> torch.Tensor:
    """t's elements as bytes, for every layout (raw_bytes keeps the stride 0 of a size-1 dim)."""
    flat = t.detach().resolve_conj().resolve_neg().reshape(-1)
    return flat.clone(memory_format=torch.contiguous_format).view(torch.uint8)


def differentiable(dtype: torch.dtype) -> bool:
    return dtype.is_floating_point or dtype.is_complex


def reach(size: list[int], stride: list[int]) -> int:
    """How far past its storage offset a layout reads."""
    return sum((n - 1) * s for n, s in zip(size, stride)) if all(size) else 0


@st.composite
def strided_sources(draw: st.DrawFn, setting: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(base, t): t is an as_strided view of base, its conj or its neg."""
    dtype = draw(st.sampled_from(ST_DTYPES if setting in ST_PROPERTY_SETTINGS else DTYPES))
    ndim = draw(st.integers(0, 4))
    size = draw(st.lists(st.integers(0, 5), min_size=ndim, max_size=ndim))
    stride = draw(st.lists(st.integers(0, 6), min_size=ndim, max_size=ndim))
    offset = draw(st.integers(0, 7))
    length = offset + reach(size, stride) + 1 + draw(st.integers(0, 3))
    with torch.random.fork_rng(devices=[]):  # values from a drawn seed, so a failing example replays
        torch.manual_seed(draw(st.integers(0, 2**32 - 1)))
        base = random_values((length,), dtype, "cpu")
    if setting in ("reversal", "attach") and differentiable(dtype):
        base.requires_grad_()  # t is then a non-leaf view that requires grad
    elif setting in ST_PROPERTY_SETTINGS and differentiable(dtype) and dtype not in FLOAT8:
        base.requires_grad_(draw(st.booleans()))  # q's own graph, which straight_through never sends to
    t = base.as_strided(size, stride, offset)
    bits = ["", "conj" if dtype.is_complex else "", "neg" if dtype not in (torch.bool, *FLOAT8) else ""]
    bit = draw(st.sampled_from(bits))
    if bit == "conj":
        t = t.conj()
    elif bit == "neg":
        t = torch._neg_view(t)
    return base, t


def each_setting(test: Callable) -> Callable:
    """A hypothesis property over random strided sources, for each setting of bridge and of straight_through."""
    return pytest.mark.parametrize("setting", [*PROPERTY_SETTINGS, *ST_PROPERTY_SETTINGS])(
        EXAMPLES(given(data=st.data())(test))
    )


@dataclass
class Aliased:
    """A random source (the strided view t of base), its alias in one setting, and what the alias must be."""

    base: torch.Tensor
    t: torch.Tensor
    result: torch.Tensor
    recorded: bool  # in the graph: a custom Function's view of t
    shares_counter: bool  # t's version counter
    backward: str  # the recorded result's grad_fn


def bridged(setting: str, data: st.DataObject) -> Aliased:
    """t bridged in this setting, or straight_through(x, t) with a random x of t's shape."""
    base, t = data.draw(strided_sources(setting))
    if setting in PROPERTY_SETTINGS:
        recorded = t.requires_grad and setting in ("reversal", "attach")
        return Aliased(base, t, SETTINGS[setting](t), recorded, setting in SHARES_VERSION, "BridgeBackward")
    row, requires_grad = ST_PROPERTY_SETTINGS[setting]
    kind = [torch.complex64, torch.complex128] if t.dtype.is_complex else [torch.float16, torch.bfloat16, torch.float32, torch.float64]
    x = random_values(tuple(t.shape), data.draw(st.sampled_from(kind)), "cpu").requires_grad_(requires_grad)
    return Aliased(base, t, ST_SETTINGS[row](x, t), requires_grad, True, "StraightThroughBackward")


@each_setting
def test_result_has_the_metadata_of_t_and_is_a_view_only_if_recorded(setting: str, data: st.DataObject) -> None:
    case = bridged(setting, data)
    result, t = case.result, case.t
    assert_alias(result, t)
    assert_view_only_if_recorded(result, t)
    assert result.requires_grad == case.recorded
    if result.requires_grad:
        assert result.grad_fn.name() == case.backward
    else:
        assert result.grad_fn is None and result.is_leaf


def a_value_not_at_the_first_element(t: torch.Tensor, choices: tuple) -> object:
    """A value that changes t's first element, so that a write that does not land is seen."""
    if t.numel() == 0:
        return choices[0]
    first = t.detach().reshape(-1)[0].to(torch.complex128).item()  # float8 has no ==
    return next(v for v in choices if torch.tensor(v).to(t.dtype).to(torch.complex128).item() != first)


def written_values(t: torch.Tensor) -> tuple:
    if t.dtype == torch.bool:
        return (True, False)
    return (1 + 2j, -3 + 0.5j, 2) if t.dtype.is_complex else (1, 2, 3)


@each_setting
def test_writes_are_shared_both_ways_even_where_elements_overlap(setting: str, data: st.DataObject) -> None:
    # fill_ writes one value, and a write to one element is one store, so both
    # are exact where elements of t overlap; an elementwise copy_ would not be.
    # torch refuses fill_ where a conj or neg bit meets memory it sees overlap.
    case = bridged(setting, data)
    base, t, result = case.base, case.t, case.result
    model_base = base.detach().clone()
    model = model_base.as_strided(t.shape, t.stride(), t.storage_offset())
    model = model.conj() if t.is_conj() else torch._neg_view(model) if t.is_neg() else model
    index = tuple(data.draw(st.integers(0, n - 1)) for n in t.shape) if t.numel() else None
    can_fill = not (t.is_conj() or t.is_neg()) or torch._debug_has_internal_overlap(t) != 1

    def write(through: torch.Tensor, seen_by: torch.Tensor) -> None:
        value = a_value_not_at_the_first_element(seen_by, written_values(t))
        with torch.no_grad():
            for target in (through, model):
                if can_fill:
                    target.fill_(value)
                if index is not None:
                    target[index] = written_values(t)[-1]
        assert torch.equal(bytes_of(seen_by), bytes_of(model))
        assert torch.equal(bytes_of(base), bytes_of(model_base))  # and nothing else moved

    write(through=result, seen_by=t)
    write(through=t, seen_by=result)


@each_setting
def test_inplace_ops_bump_a_shared_counter_only_where_it_is_shared(setting: str, data: st.DataObject) -> None:
    case = bridged(setting, data)
    t, result, shares_counter = case.t, case.result, case.shares_counter
    # A one-element write is an in-place op torch takes on every layout (fill_ is
    # refused where a conj or neg bit meets overlap); an empty tensor has none.
    index = (0,) * t.dim() if t.numel() else ...
    for written, other in ((result, t), (t, result)):
        before = (written._version, other._version)
        with torch.no_grad():  # t may require grad; autograd's checks are not the point here
            written[index] = written_values(t)[0]
        assert written._version == before[0] + 1
        assert other._version == (before[1] + 1 if shares_counter else before[1])


@st.composite
def metadata_change(draw: st.DrawFn, r: torch.Tensor) -> tuple[str, Callable[[], object]]:
    """An in-place change of r's metadata that stays inside r's storage as it is now.

    Growing the storage moves t's data too, which is by design (README; test_bridge.py's
    test_resize_past_the_storage_reallocates_the_shared_storage), so no change here does.
    """
    room = r.untyped_storage().nbytes() // r.element_size()
    shape = draw(st.lists(st.integers(0, 4), max_size=3))
    dim = draw(st.sampled_from([0, -1]))
    kinds = ["as_strided_", "set_()", "set_(tensor)", "unsqueeze_", "t_"]
    kind = draw(st.sampled_from(kinds + ([] if r.requires_grad else ["resize_"])))  # resize_ refuses those
    if kind == "as_strided_":
        stride = draw(st.lists(st.integers(0, 3), min_size=len(shape), max_size=len(shape)))
        if reach(shape, stride) >= room:
            shape, stride = [0, *shape], [1, *stride]  # empty, so it needs no storage
        offset = draw(st.integers(0, max(room - reach(shape, stride) - 1, 0)))
        return kind, lambda: r.as_strided_(shape, stride, offset)
    if kind == "resize_":
        shape = shape if math.prod(shape) <= room - r.storage_offset() else [0]
        return kind, lambda: r.resize_(shape)
    return kind, {
        "set_()": lambda: r.set_(),
        "set_(tensor)": lambda: r.set_(torch.zeros(shape, dtype=r.dtype)),
        "unsqueeze_": lambda: r.unsqueeze_(dim),
        "t_": lambda: r.t_() if r.dim() <= 2 else r.transpose_(0, -1),
    }[kind]


@each_setting
def test_metadata_changes_on_the_result_leave_t_as_it_was(setting: str, data: st.DataObject) -> None:
    case = bridged(setting, data)
    t, result = case.t, case.result
    before = metadata(t), t.data_ptr(), t.untyped_storage().data_ptr(), bytes_of(t).clone()
    for _ in range(data.draw(st.integers(1, 3))):
        name, change = data.draw(metadata_change(result))
        if result.requires_grad:  # a recorded result refuses in-place ops, metadata ones too
            with pytest.raises(RuntimeError, match="is a view and is being modified inplace"):
                change()
        else:
            change()
        after = metadata(t), t.data_ptr(), t.untyped_storage().data_ptr(), bytes_of(t)
        assert after[:3] == before[:3], name
        assert torch.equal(after[3], before[3]), name
