"""Every setting of bridge and of straight_through, fed every kind of input: full alias semantics, or a clear error.

A dense strided tensor on CPU, CUDA or meta, in any autograd role, gets the
alias; anything else gets an exception that names what was given. The matrix
below is the contract; test_bridge.py covers each semantic in depth for the cut,
test_straight_through.py for straight_through. The fast tier runs a covering
subset of each table (st_settings.covering), the full tier all of it.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable

import numpy as np
import pytest
import torch
from conftest import DEVICES, requires_torch, torch_at_least
from torch import Tensor, nn
from helpers import (
    FLOAT8, GRAD_SCALE, SETTINGS, SHARES_VERSION, assert_alias, assert_view_only_if_recorded, layouts, raw_bytes,
    unsupported_kinds, unsupported_tensors,
)  # fmt: skip
from st_settings import ST_GRAD_SCALE, ST_PYTHON_ENTRY, ST_SETTINGS, covering



PYTHON_ENTRY = [name for name in SETTINGS if not name.startswith("torch.ops")]


def dense_inputs(device: str) -> dict[str, Callable[[], Tensor]]:
    """Builders of every dense input kind bridge must alias (called fresh per test)."""
    z = torch.randn(5, dtype=torch.complex64, device=device)

    def inference_output() -> Tensor:
        with torch.inference_mode():
            return torch.randn(3, 4, device=device) * 2

    def with_hooks() -> Tensor:
        t = torch.randn(3, 4, device=device, requires_grad=True) * 1
        t.register_hook(lambda grad: grad)
        t.retain_grad()
        return t

    built: dict[str, Callable[[], Tensor]] = {
        name: (lambda name=name: layouts(device)[name]) for name in layouts(device)
    }
    built |= {
        "conj view": lambda: z.conj(),
        "neg view": lambda: z.conj().imag,
        "leaf requiring grad": lambda: torch.randn(3, 4, device=device, requires_grad=True),
        "non-leaf": lambda: torch.randn(3, 4, device=device, requires_grad=True) * 2,
        "parameter": lambda: nn.Parameter(torch.randn(3, 4, device=device)),
        "with hooks": with_hooks,
        "inference_mode output": inference_output,
        "meta": lambda: torch.empty(3, 5, device="meta", requires_grad=True).t(),  # the same for either device
        "integer": lambda: torch.arange(12, device=device).view(3, 4)[:, 1:],
    }
    return built


def assert_graph_role(setting: str, result: Tensor, t: Tensor) -> None:
    """Called where the result was made: grad mode decides whether it is attached."""
    attached = setting in GRAD_SCALE and t.requires_grad and torch.is_grad_enabled()
    assert_view_only_if_recorded(result, t)
    assert result.requires_grad == attached
    assert (result.grad_fn.name() if attached else result.grad_fn) == ("BridgeBackward" if attached else None)
    assert result.is_inference() == t.is_inference()


def assert_gradient(setting: str, result: Tensor, t: Tensor) -> Tensor | None:
    if not result.requires_grad:
        return None
    (grad,) = torch.autograd.grad(result.sum(), t, allow_unused=True, materialize_grads=False)
    assert_scaled_gradient(grad, t, GRAD_SCALE[setting])
    return grad


def assert_scaled_gradient(grad: Tensor | None, t: Tensor, scale: float) -> None:
    """The gradient a sum sends to ``t`` through a setting of this scale: None (not zeros) at 0."""
    if scale == 0:
        assert grad is None  # not zeros
    elif t.is_meta:
        assert grad.is_meta and grad.shape == t.shape
    else:
        assert torch.equal(grad, torch.full_like(t, scale))


def assert_versions_and_writes(setting: str, result: Tensor, t: Tensor) -> None:
    if t.is_inference() or torch._debug_has_internal_overlap(t) != 0:
        return  # no version counter; one element at several indices makes writes ambiguous
    versions = t._version, result._version
    fresh = torch.ones_like(t) if t.dtype == torch.bool else torch.full_like(t, 3)
    with torch.no_grad():
        result.copy_(fresh)
    shared = setting in SHARES_VERSION
    assert (t._version, result._version) == (versions[0] + shared, versions[1] + 1)
    if not t.is_meta:
        assert torch.equal(raw_bytes(t), raw_bytes(fresh))
        with torch.no_grad():
            t.copy_(fresh.logical_not() if t.dtype == torch.bool else fresh * 2)
        assert torch.equal(raw_bytes(result.detach()), raw_bytes(t))  # a recorded view may not be read after t changed


GRAD_MODES = {"grad": torch.enable_grad, "no_grad": torch.no_grad, "inference_mode": torch.inference_mode}


# Fast tier: every setting in every grad mode on a non-leaf, the reversal on every kind, and CUDA once.
@pytest.mark.parametrize(
    *covering(device=DEVICES, setting=SETTINGS, kind=dense_inputs("cpu"), mode=GRAD_MODES,
              prefer={"setting": "reversal", "kind": "non-leaf"}, together=[("setting", "mode")])
)  # fmt: skip
def test_every_dense_input_gets_the_alias(setting: str, kind: str, mode: str, device: str) -> None:
    t = dense_inputs(device)[kind]()
    seen_by_hook: list[Tensor | None] = []
    if t.requires_grad:
        t.register_hook(seen_by_hook.append)
    with GRAD_MODES[mode]():
        result = SETTINGS[setting](t)
        assert_alias(result, t)
        assert_graph_role(setting, result, t)
    grad = assert_gradient(setting, result, t)
    # A tensor hook on t sees exactly what autograd delivers to t, None included.
    assert len(seen_by_hook) == result.requires_grad
    if seen_by_hook:
        assert seen_by_hook[0] is grad or torch.equal(seen_by_hook[0], grad)
    assert_versions_and_writes(setting, result, t)


@pytest.mark.parametrize(
    "answered_by",
    [pytest.param("TwoTensor", marks=requires_torch("2.2", "torch.testing._internal.two_tensor")), "FakeTensorMode"],
)
@pytest.mark.parametrize("setting", sorted(SHARES_VERSION))
def test_version_sharing_holds_when_python_answers_the_op(setting: str, answered_by: str) -> None:
    # A wrapper subclass or a mode builds the result itself, below autograd;
    # the settings that share t's version counter must share it all the same.
    if answered_by == "TwoTensor":
        from torch.testing._internal.two_tensor import TwoTensor

        t, context = TwoTensor(torch.zeros(3), torch.zeros(3)), contextlib.nullcontext()
    else:
        from torch._subclasses.fake_tensor import FakeTensorMode

        context = FakeTensorMode()
        with context:
            t = torch.zeros(3)
    with context:
        result = SETTINGS[setting](t)
        with torch.no_grad():
            result.add_(1)
    assert t._version == result._version == 1


@pytest.mark.parametrize("setting", SETTINGS)
def test_more_than_2_to_the_31_elements(setting: str, device: str) -> None:
    # Never written but for one element: on CPU the pages stay untouched.
    t = torch.empty(2**31 + 3, dtype=torch.uint8, device=device)
    result = SETTINGS[setting](t)
    assert_alias(result, t)
    assert result.numel() == t.numel()
    result[-1] = 7
    assert t[-1].item() == 7


class Opaque:
    """An object with no tensor about it."""


NON_TENSORS = {
    "NoneType": None, "int": 3, "float": 3.0, "bool": True, "str": "t", "bytes": b"t",
    "list": [1.0, 2.0], "tuple": (1.0,), "dict": {"t": 1.0}, "numpy.ndarray": np.zeros(3),
    "numpy.float32": np.float32(1.0), "torch.Size": torch.Size([2]), "torch.dtype": torch.float32,
    "torch.device": torch.device("cpu"), "torch.storage.UntypedStorage": torch.ones(2).untyped_storage(),
    "test_inputs.Opaque": Opaque(), "type": Opaque,
    "torch._C._TensorMeta": torch.Tensor,  # the class, which carries __torch_function__
}  # fmt: skip


# Fast tier: every setting given None (the operator refuses it) and an int (torch.ops's parser does), the cut every type.
@pytest.mark.parametrize(*covering(setting=SETTINGS, name=NON_TENSORS, prefer=[{}, {"name": "int"}]))
def test_non_tensors_raise_naming_the_type(setting: str, name: str) -> None:
    given = NON_TENSORS[name]
    if setting in PYTHON_ENTRY:
        with pytest.raises(TypeError, match=rf"argument 't' must be a torch.Tensor, not {re.escape(name)}$"):
            SETTINGS[setting](given)
        return
    # torch.ops parses arguments itself, as for any operator; bridge must fail
    # as detach does there, and say what it was given.
    with pytest.raises(Exception) as expected:
        torch.ops.aten.detach(given)
    with pytest.raises(type(expected.value)) as error:
        SETTINGS[setting](given)
    named = "None" if given is None else f"found type '{re.escape(type(given).__name__)}'"
    if given is None and not torch_at_least("2.5"):
        # NB: once FakeTensorMode has run the operator, the dispatcher of torch
        # before 2.5 refuses an undefined tensor itself, before any kernel, in its own words.
        named = "None|tensor does not have a device"
    assert re.search(named, str(error.value)), error.value


@pytest.mark.filterwarnings("ignore::UserWarning")  # quantized and nested tensors warn on creation
@pytest.mark.parametrize(
    *covering(setting=SETTINGS, kind=unsupported_kinds(),
              inference_mode=[pytest.param(False, id=""), pytest.param(True, id="in inference_mode")])
)  # fmt: skip
def test_unsupported_layouts_raise_naming_the_layout(setting: str, kind: str, inference_mode: bool) -> None:
    t = unsupported_tensors()[kind]
    message = "got .*" + re.escape(kind.split()[0])
    if kind == "nested jagged" and setting.startswith("torch.ops"):
        message = re.escape("gradbridge.bridge")  # a Python tensor subclass answers ops it does not know
    with torch.inference_mode(inference_mode), pytest.raises(NotImplementedError, match=message):
        SETTINGS[setting](t)


# --- straight_through(x, q): q's alias, recorded when x requires grad (st_settings.ST_SETTINGS)

FLOATING_KINDS = [kind for kind in dense_inputs("cpu") if kind != "integer"]


def partner(t: Tensor, requires_grad: bool) -> Tensor:
    """A fresh plain tensor of t's shape, dtype and device."""
    return torch.randn(t.shape, dtype=t.dtype, device=t.device).requires_grad_(requires_grad)


def downstream(result: Tensor) -> Tensor:
    """A real scalar that uses every element of the result once."""
    return (result.real if result.is_complex() else result).sum()


def assert_straight_through_gradient(setting: str, result: Tensor, x: Tensor, q: Tensor) -> Tensor | None:
    """x gets grad_scale * grad, q nothing; None where the result is not recorded or the scale is 0."""
    if not result.requires_grad:
        return None
    inputs = [x, q] if q.requires_grad else [x]
    grad, *grad_q = torch.autograd.grad(downstream(result), inputs, allow_unused=True, materialize_grads=False)
    assert grad_q in ([], [None])  # never q's, even where q requires grad
    assert_scaled_gradient(grad, x, ST_GRAD_SCALE[setting])
    return grad


def assert_writes_shared_and_qs_version_counter(result: Tensor, q: Tensor, x: Tensor) -> None:
    if q.is_inference() or torch._debug_has_internal_overlap(q) != 0:
        return  # no version counter; one element at several indices makes writes ambiguous
    def x_version() -> int | None:
        return None if x.is_inference() else x._version

    versions = q._version, result._version, x_version()
    fresh = torch.full_like(q, 3)
    with torch.no_grad():
        result.copy_(fresh)
    assert (q._version, result._version, x_version()) == (versions[0] + 1, versions[1] + 1, versions[2])  # q's, always
    if not q.is_meta:
        assert torch.equal(raw_bytes(q), raw_bytes(fresh))
        with torch.no_grad():
            q.copy_(fresh * 2)
        assert torch.equal(raw_bytes(result.detach()), raw_bytes(q))


# Fast tier: every setting in every grad mode on a non-leaf q, every kind as q and as x, and CUDA once.
@pytest.mark.parametrize(
    *covering(device=DEVICES, setting=ST_SETTINGS, role=["q", "x"], kind=FLOATING_KINDS, mode=GRAD_MODES,
              prefer={"kind": "non-leaf"}, together=[("setting", "mode"), ("role", "kind")])
)  # fmt: skip
def test_every_dense_floating_input_gets_straight_throughs_alias(
    setting: str, role: str, kind: str, mode: str, device: str
) -> None:
    # role "q": the kind gives the values, and x (q's shape and dtype) requires grad;
    # role "x": the kind is the source of the gradient, and q is a plain tensor of its shape.
    given = dense_inputs(device)[kind]()
    x, q = (partner(given, requires_grad=True), given) if role == "q" else (given, partner(given, requires_grad=False))
    if role == "q" and kind == "inference_mode output" and mode == "grad":
        # autograd records nothing on an inference tensor's alias: x's gradient would be lost, so it is refused.
        with pytest.raises(RuntimeError, match=r"q is an inference tensor .* so x would get no gradient"):
            ST_SETTINGS[setting](x, q)
        return
    hooks: dict[str, list] = {"x": [], "q": []}
    for name, t in (("x", x), ("q", q)):
        if t.requires_grad:
            t.register_hook(hooks[name].append)
    with GRAD_MODES[mode]():
        result = ST_SETTINGS[setting](x, q)
        recorded = x.requires_grad and torch.is_grad_enabled()
        assert_alias(result, q)
        assert_view_only_if_recorded(result, q)
        assert result.requires_grad == recorded
        assert (result.grad_fn.name() if recorded else result.grad_fn) == ("StraightThroughBackward" if recorded else None)
        assert result.is_inference() == q.is_inference()
    grad = assert_straight_through_gradient(setting, result, x, q)
    # Hooks see what autograd delivers: x's gradient (None included), and nothing for q.
    assert len(hooks["x"]) == result.requires_grad and hooks["q"] == []
    if hooks["x"]:
        assert hooks["x"][0] is grad or torch.equal(hooks["x"][0], grad)
    assert_writes_shared_and_qs_version_counter(result, q, x)


SCALAR_TYPE = {
    torch.uint8: "Byte", torch.int8: "Char", torch.int16: "Short", torch.int32: "Int", torch.int64: "Long",
    torch.bool: "Bool", torch.float32: "Float", torch.complex64: "ComplexFloat",
}  # fmt: skip
# The dtype given to x or to q, the other being float32 (complex64: float32 beside complex64).
NOT_FLOATING = [torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.bool, torch.complex64]


@pytest.mark.parametrize(*covering(setting=ST_SETTINGS, which=["x", "q"], dtype=NOT_FLOATING))
def test_integer_bool_or_mixed_complex_dtypes_raise_naming_both(setting: str, which: str, dtype: torch.dtype) -> None:
    odd, other = torch.ones(2, 3, dtype=dtype), torch.ones(2, 3, requires_grad=which == "q")
    x, q = (odd, other) if which == "x" else (other, odd)
    expected = rf"both be floating \(or both complex\), got {SCALAR_TYPE[x.dtype]} and {SCALAR_TYPE[q.dtype]}$"
    with pytest.raises(TypeError, match=expected):
        ST_SETTINGS[setting](x, q)


@pytest.mark.parametrize(*covering(setting=ST_SETTINGS, which=["x", "q"], name=NON_TENSORS, prefer=[{}, {"name": "int"}]))
def test_straight_through_non_tensors_raise_naming_the_type(setting: str, which: str, name: str) -> None:
    given, tensor = NON_TENSORS[name], torch.ones(3, requires_grad=which == "q")
    args = (given, tensor) if which == "x" else (tensor, given)
    if setting in ST_PYTHON_ENTRY:
        with pytest.raises(TypeError, match=rf"argument '{which}' must be a torch.Tensor, not {re.escape(name)}$"):
            ST_SETTINGS[setting](*args)
        return
    # torch.ops parses its arguments itself, as for any operator; None reaches the
    # operator as an undefined tensor, which it refuses by name.
    with pytest.raises((TypeError, RuntimeError)) as error:
        ST_SETTINGS[setting](*args)
    if given is None:
        assert type(error.value) is TypeError and "expected two tensors, got None" in str(error.value)
    else:
        named = f"for argument '{which}' but instead found type '{type(given).__name__}'"
        assert named in str(error.value), error.value


@pytest.mark.filterwarnings("ignore::UserWarning")  # quantized and nested tensors warn on creation
@pytest.mark.parametrize(
    *covering(setting=ST_SETTINGS, which=["x", "q"], kind=unsupported_kinds(),
              inference_mode=[pytest.param(False, id=""), pytest.param(True, id="in inference_mode")])
)  # fmt: skip
def test_straight_through_unsupported_layouts_raise_naming_the_layout(
    setting: str, which: str, kind: str, inference_mode: bool
) -> None:
    odd, dense = unsupported_tensors()[kind], torch.zeros(4, 4)
    x, q = (odd, dense) if which == "x" else (dense, odd)
    message = rf"\): {which} must be a dense strided tensor, .*got .*" + re.escape(kind.split()[0])
    if kind == "nested jagged" and setting.startswith("torch.ops") and inference_mode:
        # Below autograd, a Python tensor subclass answers ops it does not know.
        message = re.escape("gradbridge.straight_through")
    with torch.inference_mode(inference_mode), pytest.raises(NotImplementedError, match=message):
        ST_SETTINGS[setting](x, q)


MISMATCHES = {
    "shape": (lambda: torch.ones(3), lambda: torch.ones(2), r"same shape \(no broadcasting.*got \[3\] and \[2\]$"),
    "rank": (lambda: torch.ones(3, 1), lambda: torch.ones(3), r"same shape .*got \[3, 1\] and \[3\]$"),
    "device, q on meta": (lambda: torch.ones(3), lambda: torch.ones(3, device="meta"), "same device, got cpu and meta$"),
    "device, x on meta": (lambda: torch.ones(3, device="meta"), lambda: torch.ones(3), "same device, got meta and cpu$"),
}


@pytest.mark.parametrize("mismatch", MISMATCHES)
@pytest.mark.parametrize("setting", ST_SETTINGS)
def test_shape_or_device_mismatch_raises_value_error(setting: str, mismatch: str) -> None:
    make_x, make_q, message = MISMATCHES[mismatch]
    with pytest.raises(ValueError, match=message):
        ST_SETTINGS[setting](make_x().requires_grad_(), make_q())


@pytest.mark.parametrize("setting", ST_SETTINGS)
def test_straight_through_of_more_than_2_to_the_31_elements(setting: str, device: str) -> None:
    # Never written but for one element: on CPU the pages stay untouched; x is one
    # element expanded, so only q's 2 GiB (float8) are reserved.
    shape = (2**16, 2**15 + 1)
    q = torch.empty(shape, dtype=FLOAT8[0] if FLOAT8 else torch.float16, device=device)
    x = torch.zeros((), device=device, requires_grad=True).expand(shape)
    result = ST_SETTINGS[setting](x, q)
    assert_alias(result, q)
    assert result.numel() == q.numel() > 2**31 and result.requires_grad
    with torch.no_grad():  # through bytes: float8 has no fill kernel before torch 2.6
        result.view(torch.uint8)[-1, -1] = 7
    assert q.view(torch.uint8)[-1, -1].item() == 7


@pytest.mark.parametrize(
    "answered_by",
    [pytest.param("TwoTensor", marks=requires_torch("2.2", "torch.testing._internal.two_tensor")), "FakeTensorMode"],
)
@pytest.mark.parametrize("setting", ST_SETTINGS)
def test_straight_through_shares_qs_counter_when_python_answers_the_op(setting: str, answered_by: str) -> None:
    # A wrapper subclass or a mode builds the result itself, below autograd; it
    # must share q's version counter all the same.
    if answered_by == "TwoTensor":
        from torch.testing._internal.two_tensor import TwoTensor

        x, q = TwoTensor(torch.zeros(3), torch.zeros(3)), TwoTensor(torch.zeros(3), torch.zeros(3))
        context = contextlib.nullcontext()
    else:
        from torch._subclasses.fake_tensor import FakeTensorMode

        context = FakeTensorMode()
        with context:
            x, q = torch.zeros(3, requires_grad=True), torch.zeros(3)
    with context:
        result = ST_SETTINGS[setting](x, q)
        with torch.no_grad():
            result.add_(1)
    assert q._version == result._version == 1 and x._version == 0




@requires_torch("2.5", "torch.library.register_vmap, straight_through's rule for vmap")
@pytest.mark.parametrize("which", ["x", "q"])
@pytest.mark.parametrize("setting", ["torch.ops", "torch.ops tensor"])
def test_straight_through_under_vmap_refuses_none_as_it_does_outside(setting: str, which: str) -> None:
    def call(t: Tensor) -> Tensor:
        return ST_SETTINGS[setting](None, t) if which == "x" else ST_SETTINGS[setting](t, None)

    with pytest.raises(TypeError, match="expected two tensors, got None"):
        call(torch.ones(2, 3))
    try:
        torch.vmap(call)(torch.ones(2, 3))
    except TypeError as error:
        assert "expected two tensors, got None" in str(error)
    except Exception as error:  # noqa: BLE001 (what the finding raises instead)
        raise AssertionError(f"{type(error).__name__}: {error}") from error
    else:
        raise AssertionError("vmap accepted None")
