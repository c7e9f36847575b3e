"""Crash search for bridge's and straight_through's Python entry points, with arbitrary arguments (hypothesis).

    python fuzz/fuzz_bridge.py --seconds 60 --seed 0 [--last-input FILE]

Calls bridge, torch.ops.gradbridge.bridge, BridgeFunction.apply, Bridge(...)(t),
straight_through (two plain tensors take the C entry's fast path, any other call
the parsed path) and torch.ops.gradbridge.straight_through and its .Tensor
overload with arguments of many kinds: tensors of every dtype and layout, built
by Python expressions so that every input prints as code that rebuilds it, pairs
of tensors of one shape for straight_through, and Python values of every sort. A
call may return an alias of its tensor (bridge: t; straight_through: q; same
data_ptr and shape, an autograd view only if recorded; then backward runs if it
requires grad) or raise TypeError, ValueError, NotImplementedError or
RuntimeError with a message. Anything else is a finding: the script prints the
shrunk input and exits 1, as it does when some entry never returned a result. A
crash kills the process, so each input is written to --last-input before its call.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import logging
import math
import sys
import time
import traceback
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.autograd.forward_ad as fwAD
from hypothesis import HealthCheck, given, reject, seed, settings
from hypothesis import strategies as st
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.testing._internal.two_tensor import TwoTensor
from torch.utils._python_dispatch import TorchDispatchMode

import gradbridge_ext
from gradbridge_ext import Bridge, BridgeFunction, bridge, straight_through

class Sabotaged(Exception):
    """What Weird's conversions raise; bridge lets it through, as float() does."""


# The documented errors, torch's RuntimeErrors for what its parser or a mode
# refuses, and a bad argument's own error. An internal assert is never allowed.
ALLOWED = (TypeError, ValueError, NotImplementedError, RuntimeError, Sabotaged)


class Weird:
    """A value whose number and truth conversions raise or return nonsense."""

    def __init__(self, how: str) -> None:
        self.how = how

    def _convert(self, name: str):
        if self.how == "raise":
            raise Sabotaged(name)
        return {"str": "1", "nan": math.nan, "huge": 10**400, "neg": -1}[self.how]

    def __float__(self):
        return self._convert("__float__")

    def __index__(self):
        return self._convert("__index__")

    def __bool__(self):
        return self._convert("__bool__")

    def __eq__(self, other):
        return self._convert("__eq__")

    __int__, __ne__, __hash__ = __index__, __eq__, None

    def __repr__(self) -> str:
        return f"Weird({self.how!r})"


class Tagged(torch.Tensor):
    """A Tensor subclass with torch's default __torch_function__."""


class TensorLike:
    """Not a Tensor, but it answers torch functions, as torch.overrides allows."""

    ANSWER = "answered by TensorLike"

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        return cls.ANSWER


class PassThroughFunctions(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


class PassThroughDispatch(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


def base(n: int, dtype: torch.dtype, device: str = "cpu", grad: bool = False) -> torch.Tensor:
    """0, 1, 2, ... as dtype (uninitialized where it has no conversion); grad=True: a leaf that requires grad."""
    try:
        t = torch.arange(n, device=device).to(dtype)
    except (RuntimeError, TypeError):
        t = torch.empty(n, dtype=dtype, device=device)
    return t.requires_grad_() if grad else t


def inference(make):
    with torch.inference_mode():
        return make()


def freed(t: torch.Tensor) -> torch.Tensor:
    t.untyped_storage().resize_(0)  # sizes stay, the bytes are gone (as FSDP does to parameters)
    return t


def like(t: torch.Tensor, dtype: torch.dtype | None = None, grad: bool = False) -> torch.Tensor:
    """A fresh tensor of t's shape and device (and dtype, unless given): straight_through's other argument.
    grad: requiring grad, where its dtype can."""
    made = torch.ones(t.shape, dtype=dtype or t.dtype, device=t.device)
    return made.requires_grad_() if grad and (made.is_floating_point() or made.is_complex()) else made


NAMESPACE = {
    "torch": torch, "np": np, "nn": nn, "base": base, "inference": inference, "freed": freed, "like": like,
    "Weird": Weird, "Tagged": Tagged, "TensorLike": TensorLike, "TwoTensor": TwoTensor, "nan": math.nan,
    "inf": math.inf,
}  # fmt: skip
DTYPES = sorted({d for d in vars(torch).values() if isinstance(d, torch.dtype)}, key=str)
FLOATING = [d for d in DTYPES if d.is_floating_point or d.is_complex]  # requires_grad is allowed
# A neg bit on other dtypes (quantized ones) makes a tensor that torch itself crashes on.
NEGATABLE = [torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.complex32, torch.complex64,
             torch.complex128, torch.int8, torch.int16, torch.int32, torch.int64]  # fmt: skip


class Code(str):
    """A value given by the Python expression that builds it (NAMESPACE), shown as that expression."""

    def __repr__(self) -> str:
        return str(self)


@st.composite
def dense_tensors(draw: st.DrawFn, freed_ok: bool, dtypes: list[torch.dtype] = DTYPES) -> Code:
    """Strided tensors. freed_ok: also ones whose storage is freed, which torch's repr crashes on,
    so they go only where torch.ops's parser accepts them (its errors print the argument they refuse)."""
    dtype = draw(st.sampled_from(dtypes))
    device = draw(st.sampled_from(["cpu", "cpu", "meta"]))
    grad = dtype in FLOATING and draw(st.booleans())
    ndim = draw(st.integers(0, 4))
    size = draw(st.lists(st.integers(0, 4), min_size=ndim, max_size=ndim))
    stride = draw(st.lists(st.integers(0, 5), min_size=ndim, max_size=ndim))
    offset = draw(st.integers(0, 6))
    reach = sum((n - 1) * s for n, s in zip(size, stride)) if all(size) else 0
    code = f"base({offset + reach + 1}, {dtype}, {device!r}, grad={grad})"
    code += draw(st.sampled_from(["", f".as_strided({tuple(size)}, {tuple(stride)}, {offset})"]))
    code += draw(st.sampled_from(["", ".conj()", ".mul(1)", ".detach()", ".unsqueeze(0).expand(2, -1)", "[1:]"]))
    wraps = ["{}", "{}", "inference(lambda: {})", "{}.as_subclass(Tagged)", "TwoTensor({0}, {0})"]
    wraps += ["torch._neg_view({})"] if dtype in NEGATABLE else []
    wraps += ["freed({})"] if freed_ok else []
    if dtype in FLOATING:
        wraps += ["nn.Parameter({}.detach())", "{}.detach().requires_grad_()"]
    wrap = draw(st.sampled_from(wraps))
    return Code(wrap.format(code))


OTHER_TENSORS = [
    "torch.eye(3).to_sparse()", "torch.eye(3).to_sparse_csr()", "torch.eye(3).to_sparse_csc()",
    "torch.eye(4).to_sparse_bsr((2, 2))", "torch.eye(4).to_sparse_bsc((2, 2))",
    "torch.eye(3).to_sparse().requires_grad_()", "torch.empty(3, 3, device='meta').to_sparse()",
    "torch.nested.nested_tensor([torch.ones(2), torch.ones(3)])",
    "torch.nested.nested_tensor([torch.ones(2), torch.ones(3)], layout=torch.jagged, requires_grad=True)",
    "torch.quantize_per_tensor(torch.ones(4), 0.1, 0, torch.quint8)",
    "torch.quantize_per_channel(torch.ones(2, 2), torch.ones(2), torch.zeros(2), 0, torch.qint8)",
    "torch.ones(4).to_mkldnn()", "torch.Tensor()", "torch.empty(0, 3).set_()",
    "torch.empty(2**62, device='meta')", "torch.empty(0, 2**62)",
]  # fmt: skip
NUMBER_LIKE = [
    "np.float64(nan)", "np.float32(-2.0)", "np.int64(-3)", "np.bool_(True)", "np.complex64(1j)", "np.array(2.0)",
    "np.array([1.5])", "np.zeros((2, 2))", "torch.tensor(-2.0)", "torch.tensor([1.0, 2.0])", "torch.tensor(nan)",
    "torch.tensor(1.0, device='meta')", "torch.tensor(1.0, requires_grad=True)", "Weird('raise')", "Weird('str')",
    "Weird('nan')", "Weird('huge')", "Weird('neg')",
]  # fmt: skip
OTHER_VALUES = [
    "np.array([], dtype=np.float16)", "torch.Size([2, 3])", "torch.float32", "torch.device('meta')",
    "torch.UntypedStorage(4)", "torch.ones(3).untyped_storage()", "TensorLike()", "object()", "Tagged", "print",
    "Ellipsis", "NotImplemented",
]  # fmt: skip
# grad_scale tensors that any x on the CPU takes (0-dim CPU ones broadcast to every shape
# and serve every device), and masks and scales that some x takes and others refuse.
SCALE_TENSORS = ["torch.tensor(0.5)", "torch.tensor(True)", "torch.tensor(-2.0, dtype=torch.float64)", "torch.ones(1)"]
ODD_SCALE_TENSORS = [
    "torch.ones(4)", "torch.tensor([1.0, 0.0, -1.0])", "torch.ones(2, 1, dtype=torch.float16)",
    "torch.tensor([True, False])", "torch.ones(3, device='meta')", "torch.tensor(2.0, dtype=torch.float64, device='meta')",
    "torch.tensor(1)", "torch.ones(3).to_sparse()", "torch.empty(0)", "torch.tensor(inf)",
    "torch.ones(4, requires_grad=True)",
]  # fmt: skip
tensors = st.one_of(dense_tensors(freed_ok=False), st.sampled_from(OTHER_TENSORS).map(Code))
numbers = st.one_of(
    st.floats(), st.integers(-3, 3), st.integers(), st.sampled_from([-1.0, 0.5, -0.0, 2**63, 10**400]),
    st.sampled_from(NUMBER_LIKE).map(Code),
)  # fmt: skip
plain = st.one_of(numbers, st.none(), st.booleans(), st.text(max_size=5), st.binary(max_size=5),
                  st.sampled_from(OTHER_VALUES).map(Code))  # fmt: skip
values = st.one_of(plain, tensors, st.lists(st.one_of(plain, tensors), max_size=2), st.tuples(tensors))
options = st.one_of(numbers, st.booleans(), st.none(), values)  # what grad_scale and attach are given
keywords = st.dictionaries(st.sampled_from(["grad_scale", "grad_scale", "attach", "attach", "t", "scale"]),
                           options, max_size=2)  # fmt: skip
CONTEXTS = ["plain", "no_grad", "inference_mode", "strict", "autocast", "function mode", "dispatch mode",
            "fake", "vmap", "forward AD"]  # fmt: skip


@dataclass
class Call:
    entry: str
    args: list = field(default_factory=list)
    kwargs: dict = field(default_factory=dict)
    context: str = "plain"
    module_args: tuple = ((), {})

    def __repr__(self) -> str:
        arguments = [repr(a) for a in self.args] + [f"{k}={v!r}" for k, v in self.kwargs.items()]
        entry = self.entry
        if entry == "Bridge":
            entry = f"Bridge(*{self.module_args[0]!r}, **{self.module_args[1]!r})"
        return f"[{self.context}] {entry}({', '.join(arguments)})"


# torch's own internal asserts, not ours, both in torch.ops's argument parsing
# and the same for any operator; bridge refuses these calls with a TypeError:
#   - a defaulted argument given by position and by keyword trips torch's schema
#     matching (torch.ops.aten.hardtanh.default(x, -1.0, min_val=None) too);
#     found by seed 0, chunk 15;
#   - its error message prints the arguments, and printing a tensor of a
#     quantized dtype that has no quantizer asserts; found by seed 1, chunk 23.
TORCH_INTERNAL_ASSERTS = dict.fromkeys(
    ["torch.ops", "torch.ops.straight_through", "torch.ops.straight_through.Tensor"],
    ("!argument.default_value()", "cannot call qscheme on UnknownQuantizer"),
)

# torch's own assert, not ours: a wrapper subclass that answers an op through
# torch.utils._python_dispatch.return_and_correct_aliasing (TwoTensor) asserts
# when the input the schema aliases is of another type than the output, as q is
# in straight_through(TwoTensor(...), q) with a plain q; found by seed 0, chunk 0.
TORCH_ALIASING_ASSERT = ("torch/utils/_python_dispatch.py", "But expected types to match")


def torch_aliasing_assert(error: AssertionError) -> bool:
    frames = traceback.extract_tb(error.__traceback__)
    where, message = TORCH_ALIASING_ASSERT
    return bool(frames) and frames[-1].filename.replace("\\", "/").endswith(where) and message in str(error)


# Calls that once gave a finding, run first on every search.
REGRESSIONS: list[Call] = [
    Call("straight_through", [Code("TwoTensor(like(torch.Tensor()), like(torch.Tensor()))"), Code("torch.Tensor()")]),
    # Ours, since fixed: under vmap, torch.ops's None for q raised an AttributeError from the
    # vmap rule, not the operator's TypeError (tests/test_inputs.py,
    # test_straight_through_under_vmap_refuses_none_as_it_does_outside).
    Call("torch.ops.straight_through", [Code("torch.ones(2, 3)"), None], context="vmap"),
    Call("torch.ops.straight_through.Tensor", [Code("torch.ones(2, 3)"), None, Code("torch.tensor(0.5)")], context="vmap"),
    Call("torch.ops", [Code("torch.eye(3).to_sparse()"), 0.0], {"grad_scale": None}),
    Call("bridge", [Code("torch.eye(3)"), 0.0], {"grad_scale": None}),
    Call("torch.ops", [(Code("base(1, torch.qint32, 'cpu', grad=False)"),)]),
    Call("bridge", [(Code("base(1, torch.qint32, 'cpu', grad=False)"),)]),
]


def arguments(first: st.SearchStrategy, more: st.SearchStrategy, keywords: st.SearchStrategy) -> dict:
    return {
        "args": st.tuples(first, st.lists(more, max_size=2)).map(lambda a: [a[0], *a[1]]),
        "kwargs": keywords,
        "module_args": st.tuples(st.lists(more, max_size=1).map(tuple), keywords),
    }


attach = st.dictionaries(st.just("attach"), st.one_of(st.booleans(), st.none()), max_size=1)
entries = st.sampled_from(["bridge", "torch.ops", "BridgeFunction.apply", "Bridge"])
contexts = st.sampled_from(CONTEXTS)
# Calls of the right shape with odd tensors reach the operator; calls of any shape test the parsing.
well_formed = arguments(st.one_of(tensors, dense_tensors(freed_ok=True)), st.floats() | st.integers(-3, 3), attach)
any_shape = arguments(st.one_of(tensors, values), options, keywords)

ST_ENTRIES = ["straight_through", "torch.ops.straight_through", "torch.ops.straight_through.Tensor"]
st_entries = st.sampled_from(ST_ENTRIES)
# x beside a drawn q (its expression, Q, built again): q's shape and device, so that the
# call reaches the operator; as q's dtype or another, requiring grad or not, wrapped or not.
X_LIKE = [
    "like({q}, grad=True)", "like({q}, grad=True)", "like({q})", "like({q}, torch.float64, grad=True)",
    "like({q}, torch.float16, grad=True)", "like({q}, torch.complex64, grad=True)", "like({q}, torch.int64)",
    "nn.Parameter(like({q}))", "like({q}, grad=True).as_subclass(Tagged)", "TwoTensor(like({q}), like({q}))",
    "inference(lambda: like({q}))", "like({q}, grad=True)[None]", "like({q}, grad=True).mul(2)",
]  # fmt: skip
scales = st.one_of(
    numbers, st.sampled_from(SCALE_TENSORS).map(Code), st.sampled_from(ODD_SCALE_TENSORS).map(Code),
    dense_tensors(freed_ok=False),
)  # fmt: skip


@st.composite
def straight_through_pairs(draw: st.DrawFn, entry: str) -> list:
    """[x, q] of one shape (mostly), and a grad_scale: a number or a tensor, a tensor for the .Tensor overload."""
    q = draw(st.one_of(dense_tensors(freed_ok=True, dtypes=FLOATING), dense_tensors(freed_ok=True), tensors))
    x = Code(draw(st.sampled_from(X_LIKE)).format(q=q)) if draw(st.integers(0, 4)) else draw(tensors)
    tensor_scales = st.one_of(st.sampled_from(SCALE_TENSORS).map(Code), st.just(Code(f"like({q}, torch.float32)")))
    if entry.endswith(".Tensor"):
        return [x, q, draw(st.one_of(tensor_scales, tensor_scales, scales))]
    return [x, q, *draw(st.lists(st.one_of(scales, tensor_scales), max_size=1))]


@st.composite
def straight_through_calls(draw: st.DrawFn, keywords: bool) -> Call:
    entry = draw(st_entries)
    kwargs = draw(st_keywords) if keywords else {}
    return Call(entry, draw(straight_through_pairs(entry)), kwargs, draw(contexts))


st_keywords = st.dictionaries(st.sampled_from(["grad_scale", "grad_scale", "x", "q", "attach"]), options, max_size=2)
calls = st.one_of(
    st.builds(Call, entry=entries, context=contexts, **well_formed),
    st.builds(Call, entry=entries, context=contexts, **any_shape),
    straight_through_calls(keywords=False),
    straight_through_calls(keywords=True),
    st.builds(Call, entry=st_entries, context=contexts,
              args=st.lists(st.one_of(tensors, values, options), min_size=1, max_size=4), kwargs=st_keywords),
)  # fmt: skip


def build(value):
    """Evaluate the Code inside value (possibly nested)."""
    if isinstance(value, Code):
        return eval(value, NAMESPACE)  # our own expressions
    if isinstance(value, (list, tuple)):
        return type(value)(build(v) for v in value)
    if isinstance(value, dict):
        return {k: build(v) for k, v in value.items()}
    return value


def context(name: str):
    from torch._subclasses.fake_tensor import FakeTensorMode

    return {
        "no_grad": torch.no_grad, "inference_mode": torch.inference_mode, "strict": gradbridge_ext.strict,
        "autocast": lambda: torch.autocast("cpu"), "function mode": PassThroughFunctions,
        "dispatch mode": PassThroughDispatch, "forward AD": fwAD.dual_level,
        "fake": lambda: FakeTensorMode(allow_non_fake_inputs=True),  # the inputs are built inside, most are fake
    }.get(name, contextlib.nullcontext)()  # fmt: skip


# torch's refusals of the arithmetic a gradient needs in some dtypes: no kernel
# (float8, complex32, ...), and no promotion of a float8 gradient by a float32
# grad_scale tensor (found by seed 0, chunk 4, for straight_through).
BACKWARD_KERNEL_GAPS = ("not implemented for", "Promotion for Float8 Types is not supported")


def ones(t: torch.Tensor) -> torch.Tensor:
    """Ones of t's shape, dtype and device. NB: not ones_like(t), which segfaults torch 2.13 where t has a
    conj bit and freed storage (torch.ones_like(torch.ones(2, dtype=torch.complex64).conj()) after its
    storage's resize_(0)), as an alias of such a q is; found by seed 2."""
    return torch.ones(t.shape, dtype=t.dtype, device=t.device)


ENTRIES = {
    "bridge": bridge, "torch.ops": torch.ops.gradbridge.bridge, "BridgeFunction.apply": BridgeFunction.apply,
    "straight_through": straight_through, "torch.ops.straight_through": torch.ops.gradbridge.straight_through,
    "torch.ops.straight_through.Tensor": torch.ops.gradbridge.straight_through.Tensor,
}  # fmt: skip


def check_alias(result, t, backward: bool = True) -> None:
    """The invariants of a call that returned: an alias of t, an autograd view only if recorded."""
    if isinstance(result, str) and result == TensorLike.ANSWER:
        return  # any argument may answer, torch.ops looks at all of them
    assert isinstance(t, torch.Tensor), f"a non-tensor {type(t)} was accepted"
    assert isinstance(result, torch.Tensor), type(result)
    assert result.shape == t.shape and result.dtype == t.dtype, (result.shape, t.shape)
    if type(t) in (torch.Tensor, nn.Parameter):  # a subclass is re-wrapped by as_subclass, a view, as detach() is
        # An attached result in the graph is a custom Function's view of t (it refuses in-place ops).
        assert result._base is (None if not result.requires_grad else t if t._base is None else t._base)
    assert_same_data(result, t)
    if backward and result.requires_grad and result.numel() < 1000:
        try:
            result.backward(ones(result))
        except RuntimeError as error:  # dtypes without the kernels a gradient needs
            if not any(gap in str(error) for gap in BACKWARD_KERNEL_GAPS) or "INTERNAL ASSERT" in str(error):
                raise


def assert_same_data(result, t) -> None:
    try:
        data_ptr = t.data_ptr()
    except RuntimeError:  # wrapper subclasses, fake and batched tensors have none
        return
    assert result.data_ptr() == data_ptr


PLAIN = (torch.Tensor, nn.Parameter)  # a subclass is re-wrapped by as_subclass, a view, as detach() is


def check_straight_through(result, x, q, backward: bool = True) -> None:
    """The invariants of a straight_through call that returned: an alias of q, recorded only if x requires grad."""
    if isinstance(result, str) and result == TensorLike.ANSWER:
        return  # any argument may answer
    assert isinstance(x, torch.Tensor) and isinstance(q, torch.Tensor), f"a non-tensor was accepted: {type(x)}, {type(q)}"
    assert isinstance(result, torch.Tensor), type(result)
    assert result.shape == q.shape and result.dtype == q.dtype, (result.shape, q.shape, result.dtype, q.dtype)
    assert x.shape == q.shape, f"shapes {x.shape} and {q.shape} were accepted"
    plain = type(x) in PLAIN and type(q) in PLAIN
    if plain:
        assert result.requires_grad == (x.requires_grad and torch.is_grad_enabled()), (result.requires_grad, x.requires_grad)
        # A recorded result is a custom Function's view of q (it refuses in-place ops).
        assert result._base is (None if not result.requires_grad else q if q._base is None else q._base)
    assert_same_data(result, q)
    if backward and result.requires_grad and result.numel() < 1000:
        q_grad = q.grad if plain and q.is_leaf else None
        try:
            result.backward(ones(result))
        except RuntimeError as error:  # dtypes without the kernels a gradient needs
            if not any(gap in str(error) for gap in BACKWARD_KERNEL_GAPS) or "INTERNAL ASSERT" in str(error):
                raise
            return
        if plain and q.is_leaf:
            assert q.grad is q_grad, "q got a gradient"
        if plain and x.is_leaf and x.grad is not None:
            assert x.grad.shape == x.shape and x.grad.dtype == x.dtype, (x.grad.shape, x.grad.dtype)


def run(call: Call, stats: collections.Counter, last_input: str | None) -> None:
    if last_input:
        with open(last_input, "w") as f:
            f.write(repr(call) + "\n")
            f.flush()
    with context(call.context):
        try:
            args, kwargs = build(call.args), build(call.kwargs)
            module_args = build(call.module_args)
        except Exception:  # noqa: BLE001 (not every construction exists in every context)
            stats["inputs that could not be built"] += 1
            reject()
        if call.context == "forward AD" and isinstance(args[0], torch.Tensor):
            with contextlib.suppress(RuntimeError, ValueError):  # integer dtypes, layouts without tangents
                args[0] = fwAD.make_dual(args[0], torch.zeros_like(args[0]))
        t = args[0]
        is_straight_through = call.entry in ST_ENTRIES
        path = call.entry
        q = None
        if is_straight_through:  # q may come by keyword where torch.ops takes one
            q = args[1] if len(args) > 1 else kwargs.get("q")
            # The C entry's own path (csrc/python.cpp): two plain tensors, nothing else, no torch function mode.
            if (call.entry == "straight_through" and len(args) == 2 and not kwargs
                    and all(type(a) in PLAIN for a in args) and call.context != "function mode"):  # fmt: skip
                path = "straight_through(x, q)"

        def invoke(*args):
            if call.entry == "Bridge":
                return Bridge(*module_args[0], **module_args[1])(*args, **kwargs)
            return ENTRIES[call.entry](*args, **kwargs)

        def check(result, x, q, backward: bool = True) -> None:
            if is_straight_through:
                check_straight_through(result, x, q, backward=backward)
            else:
                check_alias(result, x, backward=backward)

        def checked(*batch):  # under vmap: checked inside, where the batched tensors are
            result = invoke(*batch, *args[len(batch):])
            check(result, batch[0], batch[1] if len(batch) > 1 else q, backward=False)
            return result

        batched = call.context == "vmap" and isinstance(t, torch.Tensor) and t.dim() > 0
        try:
            if batched and is_straight_through and len(args) > 1 and isinstance(q, torch.Tensor):
                # q batched too where it can be (x's batch size), else x alone.
                in_dims = (0, 0) if q.dim() > 0 and q.shape[0] == t.shape[0] else (0, None)
                torch.vmap(checked, in_dims=in_dims)(t, q)
            elif batched:  # an AssertionError raised inside is a finding: not caught below
                torch.vmap(checked)(t)
            else:
                result = invoke(*args)
        except ALLOWED as error:
            assert str(error), f"{type(error).__name__} with an empty message"
            if "INTERNAL ASSERT" in str(error):
                known = TORCH_INTERNAL_ASSERTS.get(call.entry, ())
                assert any(message in str(error) for message in known), error
            stats[type(error).__name__] += 1
            return
        except AssertionError as error:
            if not torch_aliasing_assert(error):
                raise
            stats["torch's aliasing assert"] += 1
            return
        if not batched:  # outside the try, so that a failed check is a finding
            check(result, t, q)
        stats["results"] += 1
        stats[f"results: {path}"] += 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--last-input", help="file that holds the input of the call in progress")
    options = parser.parse_args()
    warnings.simplefilter("ignore")
    logging.disable(logging.CRITICAL)  # FakeTensorMode logs the errors it raises
    stats: collections.Counter = collections.Counter()
    for call in REGRESSIONS:
        run(call, stats, options.last_input)
    start = time.monotonic()
    chunk = 0
    try:
        while time.monotonic() - start < options.seconds:
            # Fixed-size chunks, each with its own seed, so a run is reproducible up to where it stopped.
            @seed(options.seed * 1_000_003 + chunk)
            @settings(max_examples=200, deadline=None, database=None, suppress_health_check=list(HealthCheck))
            @given(calls)
            def test(call: Call) -> None:
                run(call, stats, options.last_input)

            test()
            chunk += 1
    except Exception:
        print(f"FINDING (seed {options.seed}, chunk {chunk}); the shrunk input is above", file=sys.stderr)
        raise
    finally:
        print(f"seed {options.seed}: {sum(stats.values())} calls in {time.monotonic() - start:.0f} s, "
              f"{chunk} chunks: {dict(stats)}")  # fmt: skip
    if not stats["results"]:
        print("no call returned a result: the search tried nothing that works", file=sys.stderr)
        return 1
    # Each entry, and straight_through's fast path and parsed path, must have returned at least once.
    paths = ["bridge", "torch.ops", "BridgeFunction.apply", "Bridge", "straight_through(x, q)", *ST_ENTRIES]
    untried = [path for path in paths if not stats[f"results: {path}"]]
    if untried:
        print(f"no call of {', '.join(untried)} returned a result: the search tried nothing that works there", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
