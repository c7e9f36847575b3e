"""The Python face of gradbridge::bridge, and its rules for the rest of the stack.

``bridge`` and ``straight_through`` (the compiled entry points themselves),
``Bridge``, ``BridgeFunction`` and ``strict`` are defined here; ``gradbridge_ext`` re-exports them. Below them are
bridge's rules for torch.compile, torch.func.vmap and torch.export, each where
torch's own API asks for one:

- Dynamo cannot trace into a C function, so it would break the graph at every
  bridge. ``torch.compiler.substitute_in_graph`` gives it a stand-in written with
  ops that functionalization understands; eager calls never run it. In a
  compiled graph a cut is ``t.detach()``, whose version counter is ``t``'s (what
  :func:`strict` gives in eager), and an attached result is what the eager op
  returns: a custom Function's view of ``t`` with bridge's backward. It is
  registered when torch._dynamo is imported, which is seconds that a program
  that never compiles should not pay.
- vmap has no rule for a custom operator, and its fallback refuses aliasing ops;
  bridge of a batch is the batch of bridges, so the rule bridges the batched
  tensor whole. torch.func.grad needs nothing: the autograd kernel serves every
  level.
- torch.export keeps the operator in the graph it captures, so ``ep.module()``
  keeps bridge's backward; functionalization (``run_decompositions``, ONNX) then
  needs a decomposition, and below autograd every setting is the same alias.
- DTensor's sharding rule lives in ``_dtensor.py``, registered when
  torch.distributed.tensor is imported.
"""

from __future__ import annotations

import contextlib
import numbers
import os
import sys
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from torch.overrides import handle_torch_function, has_torch_function, has_torch_function_unary

from . import _extension, _fallback
from ._import_hooks import when_imported

__all__ = ["NATIVE", "Bridge", "BridgeFunction", "bridge", "straight_through", "strict"]

_C = _extension.load()
# Whether the native operator serves the calls; False where none could be had
# (the import warned why), and the pure-Python kernels of _fallback.py do.
NATIVE: bool = _C is not None

_BRIDGE_DOC = r"""bridge(t, /, grad_scale=0.0, *, attach=None)
--

Return an alias of ``t`` whose backward is zero, or ``grad_scale`` times the gradient.

The forward is the same for every setting: the result shares ``t``'s storage (no
copy, no allocation, no kernel launch) and starts with its sizes, strides,
storage offset, dtype, device and conj/neg bits. It owns its metadata, so
``resize_``, ``set_``, ``as_strided_``, ``unsqueeze_`` ... change it and never
``t``. A cut also owns its version counter, so in-place ops on one do not bump
the other's ``_version`` (``t.detach()`` shares ``t``'s; see :func:`strict`); the
settings that keep the result in the graph share ``t``'s, as a gradient reversal
layer's view does, in every grad mode. A result recorded in the graph (``t``
requires grad, grad mode on) is what an autograd.Function returns for a view:
``_base`` is ``t`` and an in-place op on it raises autograd's "is a view and is
being modified inplace"; any other result is no autograd view of ``t`` (for a
Tensor subclass, torch's default ``__torch_function__`` rewraps it with
``as_subclass``, as it does ``detach()``'s result). What differs is the backward:

==================  ===========  =====================  ==========================
call                in the graph  gradient to ``t``      use
==================  ===========  =====================  ==========================
``bridge(t)``       no (a leaf)   none                   independent layers, probes
``bridge(t, s)``    yes           ``s * grad``           ``s = -lambda``: gradient
                                                         reversal; ``0 < s < 1``:
                                                         damped auxiliary head
``bridge(t,         yes           none (``None``, not    hooks upstream still run,
attach=True)``                    zeros)                 e.g. DDP with
                                                         ``find_unused_parameters
                                                         =False``
==================  ===========  =====================  ==========================

``grad_scale`` may also be a floating (or bool) tensor on ``t``'s device: 0-dim
(or 0-dim on the CPU), or a mask of any shape that broadcasts to ``t``'s
(``bridge(emb.weight, new_rows[:, None])`` trains only the new rows of an embedding). It is saved for
the backward like any input (change it in place between steps, not between
forward and backward), always multiplies, and gets no gradient itself.
A number ``grad_scale`` must be finite (not a bool); ``attach=None`` means
"attached if ``grad_scale`` is not 0", and ``attach=False`` with a nonzero
``grad_scale`` is an error. An attached result keeps ``t``'s graph alive until
backward, like any op's output, and refuses forward-mode AD (its backward is
not a derivative of its forward); a cut drops the tangent, as ``detach()`` does.

Accepts dense strided tensors of every dtype on every device (one
device-generic kernel: CPU, CUDA, meta and out-of-tree backends alike); raises
``TypeError`` for non-tensors and ``NotImplementedError`` for sparse, nested,
quantized and mkldnn tensors.

Examples::

    >>> import torch, gradbridge_ext
    >>> x = torch.ones(3, requires_grad=True)
    >>> b = x * 2                        # B's output
    >>> w = torch.ones(3, requires_grad=True)
    >>> (gradbridge_ext.bridge(b) * w).sum().backward()
    >>> w.grad                           # C learns from b ...
    tensor([2., 2., 2.])
    >>> print(x.grad)                    # ... and nothing reaches B or A
    None
    >>> gradbridge_ext.bridge(b, -0.5).sum().backward()   # gradient reversal
    >>> x.grad                           # -0.5 * 2 per element
    tensor([-1., -1., -1.])
    >>> r = gradbridge_ext.bridge(b, attach=True)
    >>> r.grad_fn.name(), r.requires_grad
    ('BridgeBackward', True)
"""

_STRAIGHT_THROUGH_DOC = r"""straight_through(x, q, /, grad_scale=1.0)
--

Return ``q``, exactly, with ``x``'s gradient: the straight-through estimator.

What ``x + (q - x).detach()`` means, without its two kernels, its two temporaries
and its rounding: the result is an alias of ``q`` (same storage, no copy, no
allocation, no kernel; bitwise ``q``), and its backward sends ``grad_scale *
grad`` to ``x`` (no kernel at 1.0) and nothing to ``q``. The argument order is
vector-quantize-pytorch's ``straight_through(src, tgt)``: ``x`` is the source of
the gradient, ``q`` (its quantized, rounded or one-hot form) gives the values.

``x`` and ``q`` must have the same shape (no broadcasting: the result is ``q``)
and device, and both be floating (or both complex); their dtypes may differ: the
result has ``q``'s, and the gradient reaches ``x`` in ``x``'s. ``grad_scale`` is a
finite number, or a floating (or bool) tensor on ``x``'s device (or 0-dim on the
CPU) that broadcasts to ``x``'s shape, saved for the backward. The result is recorded in the graph when ``x`` requires
grad (grad mode on): then it is a custom Function's view of ``q``, so an in-place
op on it raises autograd's "is a view and is being modified inplace" instead of
silently writing ``q``. It always shares ``q``'s version counter. Otherwise (``x``
needs no grad, ``no_grad``, inference mode) it is a plain alias of ``q`` that does
not require grad, as the trick's result would not. Forward-mode AD is refused.

Examples::

    >>> import torch, gradbridge_ext
    >>> w = torch.tensor([0.4, -1.3, 0.1], requires_grad=True)
    >>> q = w.detach().round().clamp(-1, 1)        # ternary weights
    >>> y = gradbridge_ext.straight_through(w, q)
    >>> y                                          # q's values, exactly
    tensor([ 0., -1.,  0.], grad_fn=<StraightThroughBackward>)
    >>> y.data_ptr() == q.data_ptr()               # q itself, no copy
    True
    >>> (y * torch.tensor([1.0, 2.0, 3.0])).sum().backward()
    >>> w.grad                                     # the gradient goes straight through to w
    tensor([1., 2., 3.])
"""

if TYPE_CHECKING:

    def bridge(t: Tensor, /, grad_scale: float | Tensor = 0.0, *, attach: bool | None = None) -> Tensor: ...

elif NATIVE:
    # NB: the public name is the C entry point itself (csrc/python.cpp), which
    # handles the cut, bridge(t), and hands every other call to
    # _bridge_with_options below: even a Python wrapper costs more than the alias.
    bridge = _C.bridge
    if bridge.__doc__ is None:
        torch._C._add_docstr(bridge, _BRIDGE_DOC)

if TYPE_CHECKING:

    def straight_through(x: Tensor, q: Tensor, /, grad_scale: float | Tensor = 1.0) -> Tensor: ...

elif NATIVE:
    # NB: as for bridge, the C entry point handles straight_through(x, q) and
    # hands every other call to _straight_through_with_options.
    straight_through = _C.straight_through
    if straight_through.__doc__ is None:
        torch._C._add_docstr(straight_through, _STRAIGHT_THROUGH_DOC)

_NO_SCALE = 0.0


def _bridge_with_options(t: Tensor, /, grad_scale: float | Tensor = _NO_SCALE, *, attach: bool | None = None) -> Tensor:
    """``bridge`` for every call but a plain tensor's cut: its arguments parsed here, their values checked by the operator."""
    # torch's check also answers yes for a class that defines __torch_function__
    # (torch.Tensor itself), though no override applies to a class passed as an
    # argument; only a mode, which a check of None detects, should see one.
    if has_torch_function_unary(t) and (not isinstance(t, type) or has_torch_function_unary(None)):
        args = (t,) if grad_scale is _NO_SCALE else (t, grad_scale)
        return handle_torch_function(bridge, (t,), *args, **({} if attach is None else {"attach": attach}))
    if not isinstance(t, Tensor):
        raise TypeError(f"bridge(): argument 't' must be a torch.Tensor, not {_type_name(t)}")
    if attach is not None and attach is not True and attach is not False:
        raise _attach_type_error(attach)
    if type(grad_scale) is not float and not isinstance(grad_scale, Tensor):
        grad_scale = _as_float(grad_scale, "bridge")
    return _bridge_kernel(t, grad_scale, attach)


def _straight_through_with_options(x: Tensor, q: Tensor, /, grad_scale: float | Tensor = 1.0) -> Tensor:
    """``straight_through`` for every call but two plain tensors': parsed here, checked by the operator."""
    if has_torch_function((x, q)):
        # NB: the type first: comparing a tensor (a mask, a traced scale) to 1.0 would ask for its value.
        args = (x, q) if type(grad_scale) is float and grad_scale == 1.0 else (x, q, grad_scale)
        return handle_torch_function(straight_through, (x, q), *args)
    for name, value in (("x", x), ("q", q)):
        if not isinstance(value, Tensor):
            raise TypeError(f"straight_through(): argument '{name}' must be a torch.Tensor, not {_type_name(value)}")
    if type(grad_scale) is not float and not isinstance(grad_scale, Tensor):
        grad_scale = _as_float(grad_scale, "straight_through")
    return _straight_through_kernel(x, q, grad_scale)


# Python's own argument errors name the function the user called.
_bridge_with_options.__qualname__ = _bridge_with_options.__name__ = "bridge"
_straight_through_with_options.__qualname__ = _straight_through_with_options.__name__ = "straight_through"
if NATIVE:
    _bridge_kernel, _straight_through_kernel, _set_strict = _C._bridge_parsed, _C._straight_through_parsed, _C._set_strict
    _C._bridge_with_options = _bridge_with_options
    _C._straight_through_with_options = _straight_through_with_options
elif not TYPE_CHECKING:
    # Without the C entry points every call is parsed in Python; the docstrings
    # lose the C convention's signature line, which a Python function has of its own.
    _bridge_kernel, _straight_through_kernel, _set_strict = _fallback.bridge, _fallback.straight_through, _fallback.set_strict
    bridge, straight_through = _bridge_with_options, _straight_through_with_options
    bridge.__doc__ = _BRIDGE_DOC.split("--\n\n", 1)[1]
    straight_through.__doc__ = _STRAIGHT_THROUGH_DOC.split("--\n\n", 1)[1]


def _type_name(value: Any) -> str:
    cls = type(value)
    return cls.__name__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"


# The type rules torch.ops's parser would not state as bridge's TypeErrors (it
# takes a bool as a float and an int as a bool, and raises RuntimeError).
def _attach_type_error(attach: Any) -> TypeError:
    return TypeError(f"bridge(): argument 'attach' must be a bool or None, not {_type_name(attach)}")


def _grad_scale_type_error(grad_scale: Any, function: str = "bridge") -> TypeError:
    hint = " (attach=True is a keyword argument)" if isinstance(grad_scale, bool) and function == "bridge" else ""
    return TypeError(f"{function}(): argument 'grad_scale' must be a number or a tensor, not {_type_name(grad_scale)}{hint}")


def _as_float(grad_scale: Any, function: str) -> float:
    """A number as C reads a double (``__float__`` or ``__index__``); not a bool or a string."""
    if isinstance(grad_scale, (bool, str, bytes, bytearray)):
        raise _grad_scale_type_error(grad_scale, function)
    try:
        return float(grad_scale)
    except TypeError:
        raise _grad_scale_type_error(grad_scale, function) from None
    except OverflowError:
        raise ValueError(f"gradbridge::{function}: grad_scale must be a finite number, got an int too large for a float") from None


class BridgeFunction(torch.autograd.Function):
    """``bridge`` as a ``torch.autograd.Function``: bridge's forward (the cut), no gradient back.

    ``BridgeFunction.apply(t)`` gives exactly what ``bridge(t)`` gives. Its output
    is marked non-differentiable, so autograd records no edge to ``t`` and
    ``backward`` returns ``None`` (autograd's zero) rather than a materialized
    ``zeros_like(grad)``, which would run B's backward on zeros.

    ``bridge`` is the faster call: ``Function.apply`` costs several microseconds
    per call, and a cut edge has nothing for it to record.

    Example::

        >>> import torch, gradbridge_ext
        >>> b = torch.ones(2, requires_grad=True) * 3
        >>> c = gradbridge_ext.BridgeFunction.apply(b)
        >>> c.requires_grad, c.grad_fn, c.data_ptr() == b.data_ptr()
        (False, None, True)
    """

    # NB: forward takes ctx and there is no setup_context. With setup_context,
    # Function.apply binds its arguments through inspect.signature on every
    # call, which measured 4x slower here (torch 2.13); torch.func transforms
    # are what would need it.
    @staticmethod
    def forward(ctx: Any, t: Tensor) -> Tensor:
        output = bridge(t)
        ctx.mark_non_differentiable(output)
        return output

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> None:
        return None


STRICT_ENV = "GRADBRIDGE_STRICT"


@contextlib.contextmanager
def strict(enabled: bool = True) -> Iterator[None]:
    """While active, ``bridge``'s results share ``t``'s version counter, as ``detach()``'s do.

    The one thing ``bridge`` gives up for its speed: the result keeps its own
    version counter, so if C saved the result for its backward (a ``Linear``
    does) and ``t`` is then changed in place, C's gradient silently uses the new
    values. Under ``strict()`` autograd raises "modified by an inplace
    operation" instead, exactly as with ``detach()``. It is the first thing to
    try when results look wrong. Setting the environment variable
    ``GRADBRIDGE_STRICT=1`` turns it on for the whole process at import.

    The setting is process-wide (like ``torch.autograd.set_detect_anomaly``)
    and applies to results made while it is on. Entering and leaving it from
    several threads at once is not supported: each exit restores the setting
    its own entry saw.

    Example::

        >>> import torch, gradbridge_ext
        >>> b = torch.ones(2, requires_grad=True) * 1
        >>> w = torch.ones(2, requires_grad=True)
        >>> with gradbridge_ext.strict():
        ...     c = gradbridge_ext.bridge(b) * w   # mul saves the bridged b for w's grad
        >>> with torch.no_grad():
        ...     _ = b.add_(1)                      # ... which this in-place change stales
        >>> c.sum().backward()
        Traceback (most recent call last):
        ...
        RuntimeError: one of the variables needed for gradient computation has been modified by an inplace operation...
    """
    previous = _set_strict(enabled)
    try:
        yield
    finally:
        _set_strict(previous)


if _extension.flag_from_environment(STRICT_ENV):
    _set_strict(True)


class Bridge(nn.Module):
    """:func:`bridge` as a module, for ``nn.Sequential`` and module hooks.

    ``Bridge()`` cuts, ``Bridge(grad_scale=-1.0)`` reverses the gradient (a
    gradient reversal layer), ``Bridge(attach=True)`` keeps its output in the
    graph with no gradient (``None``). The arguments are checked as :func:`bridge`
    checks them.

    Example::

        >>> import torch, gradbridge_ext
        >>> head = torch.nn.Sequential(gradbridge_ext.Bridge(grad_scale=-1.0), torch.nn.Linear(4, 2))
        >>> head[0]
        Bridge(grad_scale=-1.0: gradient to the input times -1.0, reversed)
    """

    def __init__(self, grad_scale: float | Tensor = 0.0, *, attach: bool | None = None) -> None:
        super().__init__()
        with torch.enable_grad():  # the operator checks the options and says whether they attach
            # A mask fits a probe of its own shape; the operator refuses one that is not dense.
            dense = isinstance(grad_scale, Tensor) and _fallback.is_dense(grad_scale)
            probe = torch.empty(grad_scale.shape if dense else (), device="meta", requires_grad=True)
            self.attach = bridge(probe, grad_scale.to("meta") if dense else grad_scale, attach=attach).requires_grad
        if isinstance(grad_scale, Tensor):
            # A buffer, so it moves with the module; update it in place for a schedule.
            self.register_buffer("grad_scale", grad_scale)
        else:
            self.grad_scale = float(grad_scale)

    def __prepare_scriptable__(self) -> Bridge:
        # torch.jit.script calls this first: a scripted Bridge calls the operator, which the fallback has not.
        if not NATIVE:
            raise RuntimeError(
                "gradbridge_ext.Bridge: TorchScript calls torch.ops.gradbridge.bridge, which only the native operator "
                "registers, and this process runs the pure-Python fallback (gradbridge_ext.NATIVE is False; the "
                "import warned why). Use torch.compile or torch.export, or install the native operator."
            )
        return self

    def forward(self, t: Tensor) -> Tensor:
        if torch.jit.is_scripting():  # TorchScript sees the operator, not the C entry point
            if isinstance(self.grad_scale, Tensor):
                return torch.ops.gradbridge.bridge(t, self.grad_scale)
            return torch.ops.gradbridge.bridge(t, self.grad_scale, self.attach)
        if not self.attach:
            return bridge(t)  # the cut's fast path reads one argument
        return bridge(t, self.grad_scale, attach=True)

    def extra_repr(self) -> str:
        if isinstance(self.grad_scale, Tensor):
            return "grad_scale=tensor: gradient to the input times the buffer grad_scale"
        if not self.attach:
            return "cut: no gradient to the input"
        if self.grad_scale == 0:
            return "attach=True: in the graph, no gradient to the input"
        reversed_ = ", reversed" if self.grad_scale < 0 else ""
        return f"grad_scale={self.grad_scale}: gradient to the input times {self.grad_scale}{reversed_}"


# --- bridge's rules for torch.compile, vmap and export


def _register_if_available(module: Any, name: str, *args: Any) -> Any:
    """``module.name(*args)`` as a decorator, or leave the function alone where torch lacks it.

    NB: substitute_in_graph and register_vmap are torch 2.5's. Without them bridge
    still works eagerly; torch.compile breaks the graph at it, and vmap raises
    torch's own error for a custom operator. Each registers a rule for the native
    operator, so the fallback, which has none, registers nothing.
    """
    register = getattr(module, name, None) if NATIVE else None
    return register(*args) if register is not None else lambda function: function


def _scaled(ctx: Any, grad: Tensor) -> Tensor | None:
    """The eager ScaledGradBackward: ``grad_scale * grad``, or ``None`` for ``grad_scale=None``."""
    if ctx.scale_is_tensor:
        (scale,) = ctx.saved_tensors
        if scale.device != grad.device and scale.device.type != "cpu":
            scale = scale.to(grad.device)
        return grad * scale
    return None if ctx.scale is None else grad * ctx.scale


# NOTE [A compiled attached result is a copy]
# In eager mode an attached result is a custom Function's view of t (of q), at
# no cost. Inside a compiled graph no alias can keep that backward:
#   - AOTAutograd rebuilds an output that aliases an intermediate which another
#     output also aliases (its base returned beside it, two results of one t)
#     outside the compiled graph, as a plain view of that other output: the
#     custom backward is gone and a reversal trains as the identity;
#   - an alias that is no autograd view (detach) escapes that, but inductor then
#     returns the result and its base as one tensor object, with one grad_fn.
# So the forwards below return a copy, which AOTAutograd treats as any op's
# output. Inductor drops the copy wherever doing so makes no two outputs of the
# compiled graph share storage, which is wherever the result is used inside the
# graph or returned without its base: a copy kernel runs only where eager would
# have returned two aliases (tests/test_compiled_gradients.py counts them).
class _AttachedBridge(torch.autograd.Function):
    """The attached forms: a copy (see the NOTE above); ``grad_scale * grad``, or ``None`` for ``grad_scale=None``."""

    @staticmethod
    def forward(t: Tensor, grad_scale: float | Tensor | None) -> Tensor:
        return t.clone()

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Tensor, float | Tensor | None], output: Tensor) -> None:
        _fallback.save_scale(ctx, inputs[1])

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, None]:
        return _scaled(ctx, grad), None


class _StraightThrough(torch.autograd.Function):
    """straight_through in a compiled graph: a copy of ``q``; ``grad_scale * grad`` to ``x``, in ``x``'s dtype."""

    @staticmethod
    def forward(x: Tensor, q: Tensor, grad_scale: float | Tensor | None) -> Tensor:
        return q.clone()

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Tensor, Tensor, float | Tensor | None], output: Tensor) -> None:
        ctx.x_dtype = inputs[0].dtype
        _fallback.save_scale(ctx, inputs[2])

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, None, None]:
        scaled = _scaled(ctx, grad)
        return (None if scaled is None else scaled.to(ctx.x_dtype)), None, None


# NB: strict export puts the operator itself in the graph dynamo captures, as
# non-strict export does without dynamo, so that ep.module() runs bridge's
# backward; export would inline the Functions above into their forwards, under
# no_grad, dropping the backward. _register_compile_rule sets this.
_is_exporting: Callable[[], bool] = lambda: False


def _bridge_for_dynamo(t: Tensor, /, grad_scale: float | Tensor = 0.0, *, attach: bool | None = None) -> Tensor:
    """What dynamo traces in place of ``bridge``.

    Dynamo cannot call the operator's checks (csrc/bridge.cpp) while it traces,
    so it runs their restatement in _fallback.py; a float that changes between
    calls reaches us as a symbol, so its value is checked only as far as tracing can.
    """
    if attach is not None and not isinstance(attach, bool):
        raise _attach_type_error(attach)
    if not isinstance(grad_scale, Tensor) and (isinstance(grad_scale, bool) or not isinstance(grad_scale, numbers.Real)):
        raise _grad_scale_type_error(grad_scale)
    attached = _fallback.check_bridge(t, grad_scale, attach)
    if _is_exporting():
        if not NATIVE:
            return _fallback.unexportable("bridge", attached and _fallback.recorded(t), t)
        if isinstance(grad_scale, Tensor):
            return torch.ops.gradbridge.bridge.Tensor(t, grad_scale, attach)
        return torch.ops.gradbridge.bridge.default(t, grad_scale, attach)
    if not attached or not _fallback.recorded(t):
        return t.detach()
    if isinstance(grad_scale, Tensor):
        return _AttachedBridge.apply(t, grad_scale)
    return _AttachedBridge.apply(t, grad_scale if grad_scale != 0 else None)


def _straight_through_for_dynamo(x: Tensor, q: Tensor, /, grad_scale: float | Tensor = 1.0) -> Tensor:
    """What dynamo traces in place of ``straight_through``: the operator's checks, restated as for bridge."""
    if not isinstance(grad_scale, Tensor) and (isinstance(grad_scale, bool) or not isinstance(grad_scale, numbers.Real)):
        raise _grad_scale_type_error(grad_scale, "straight_through")
    _fallback.check_straight_through(x, q, grad_scale)
    if _is_exporting():
        if not NATIVE:
            return _fallback.unexportable("straight_through", _fallback.recorded(x), q)
        if isinstance(grad_scale, Tensor):
            return torch.ops.gradbridge.straight_through.Tensor(x, q, grad_scale)
        return torch.ops.gradbridge.straight_through.default(x, q, grad_scale)
    if not _fallback.recorded(x):
        return q.detach()
    if isinstance(grad_scale, Tensor):
        return _StraightThrough.apply(x, q, grad_scale)
    return _StraightThrough.apply(x, q, grad_scale if grad_scale != 0 else None)


@_register_if_available(torch.library, "register_vmap", "gradbridge::bridge")
def _bridge_vmap(
    info: Any, in_dims: tuple[int | None, ...], t: Tensor, grad_scale: float = 0.0, attach: bool | None = None
) -> tuple[Tensor, int | None]:
    return torch.ops.gradbridge.bridge(t, grad_scale, attach), in_dims[0]


@_register_if_available(torch.library, "register_vmap", "gradbridge::bridge.Tensor")
def _bridge_tensor_vmap(
    info: Any, in_dims: tuple[int | None, ...], t: Tensor, grad_scale: Tensor, attach: bool | None = None
) -> tuple[Tensor, int | None]:
    if t is None:  # torch.ops passes None on: the operator refuses it, as outside vmap
        return torch.ops.gradbridge.bridge.Tensor(t, grad_scale, attach), None
    if in_dims[1] is not None:
        raise ValueError("bridge under vmap: a grad_scale tensor must be the same for the whole batch")
    # A mask broadcasts from the right, so the batch goes first, where it cannot meet the mask.
    return torch.ops.gradbridge.bridge.Tensor(_batch_first(t, in_dims[0], info), grad_scale, attach), 0


def _batch_first(t: Tensor, in_dim: int | None, info: Any) -> Tensor:
    """``t`` with its batch dimension first: moved there, or ``t`` expanded to the batch (a view either way)."""
    if in_dim is None:
        return t.expand(info.batch_size, *t.shape)
    return t.movedim(in_dim, 0)


def _straight_through_vmap(
    info: Any, in_dims: tuple[int | None, ...], x: Tensor, q: Tensor, grad_scale: float | Tensor = 1.0
) -> tuple[Tensor, int | None]:
    if x is None or q is None:  # torch.ops passes None on: the operator refuses it, as outside vmap
        op = torch.ops.gradbridge.straight_through
        return (op.Tensor if isinstance(grad_scale, Tensor) else op.default)(x, q, grad_scale), None
    if isinstance(grad_scale, Tensor) and in_dims[2] is not None:
        raise ValueError("straight_through under vmap: a grad_scale tensor must be the same for the whole batch")
    return straight_through(_batch_first(x, in_dims[0], info), _batch_first(q, in_dims[1], info), grad_scale), 0


for _overload in ("gradbridge::straight_through", "gradbridge::straight_through.Tensor"):
    _register_if_available(torch.library, "register_vmap", _overload)(_straight_through_vmap)


def _alias(t: Tensor, grad_scale: float | Tensor = 0.0, attach: bool | None = None) -> Tensor:
    cut = not isinstance(grad_scale, Tensor) and grad_scale == 0 and attach is not True
    return _decomposition("bridge", cut, t, t)


def _alias_of_q(x: Tensor, q: Tensor, grad_scale: Any = 1.0) -> Tensor:
    return _decomposition("straight_through", False, q, x, q)


def _decomposition(op: str, cut: bool, alias_of: Tensor, *tensors: Tensor) -> Tensor:
    """What the operator decomposes to, for the callers that must decompose it; NotImplemented for the others.

    A cut is ``t.detach()``, exactly; the other settings are an alias below autograd.
    """
    if _EXPORT_KEEPS_THE_OPERATOR:
        if not _functionalizing(*tensors):
            return NotImplemented
    elif _fallback.python_dispatcher_traces():
        if not cut:
            _refuse_to_drop_the_backward(op, *tensors)
    elif not _functionalizing(*tensors):
        return NotImplemented
    return torch.ops.aten.detach.default(alias_of) if cut else torch.ops.aten.alias.default(alias_of)


def _functionalizing(*tensors: Tensor) -> bool:
    """Whether functionalization asks for the decomposition, by its mode or its tensors."""
    mode_key = getattr(torch._C, "_TorchDispatchModeKey", None)
    if mode_key is not None and torch._C._get_dispatch_mode(mode_key.FUNCTIONAL) is not None:
        return True
    functional = sys.modules.get("torch._subclasses.functional_tensor")  # none exists before it is imported
    return any(torch._is_functional_tensor(t) or (functional and isinstance(t, functional.FunctionalTensor)) for t in tensors)


# torch 2.5's export, and its make_fx where the Python dispatcher is on
# (symbolic and pre-dispatch tracing), capture the decomposition in place of the
# operator (the trace runs under the Python dispatcher, with autograd on):
# aten.alias's gradient would silently replace the operator's, so an attached
# setting is refused there and a cut is detach. Newer torch decomposes it only
# below autograd (run_decompositions, ONNX), where the alias is all there is.
_EXPORT_KEEPS_THE_OPERATOR = _extension._minor(torch.__version__) >= (2, 6)


def _refuse_to_drop_the_backward(op: str, *tensors: Tensor) -> None:
    if not torch.is_grad_enabled() or not any(t.requires_grad for t in tensors):
        return
    raise RuntimeError(
        f"gradbridge::{op}: torch {torch.__version__} decomposes the operator when it traces under the Python "
        "dispatcher (torch.export, make_fx with symbolic or pre-dispatch tracing), which would drop its backward "
        "(the traced graph would train it as an identity). Trace under torch.no_grad() for inference, or use "
        "torch 2.6 or newer, which keeps the operator."
    )


# NB: functionalization decomposes an op whose schema aliases its input through
# the op's Python CompositeImplicitAutograd kernel. Registered with py_impl it
# is seen only by tracing (the Python dispatcher); eager calls keep the C++
# kernels. tests/test_export.py pins this, so a torch that changes it fails there.
# Every other caller of the decomposition (make_fx's proxy mode, fake tensors,
# the flop counter) takes NotImplemented as "record the operator itself": make_fx
# asks whenever no kernel is registered at the tensor's backend key
# (torch.utils._python_dispatch.autograd_would_have_decomposed), which misses
# our CompositeExplicitAutograd kernel, and an aten.alias in a traced graph
# would rerun with the identity's gradient (tests/test_compiled_gradients.py).
if NATIVE:
    for _overload in (torch.ops.gradbridge.bridge.default, torch.ops.gradbridge.bridge.Tensor):
        _overload.py_impl(torch._C.DispatchKey.CompositeImplicitAutograd)(_alias)
    for _overload in (torch.ops.gradbridge.straight_through.default, torch.ops.gradbridge.straight_through.Tensor):
        _overload.py_impl(torch._C.DispatchKey.CompositeImplicitAutograd)(_alias_of_q)


def _dynamo_is_exporting() -> bool:
    """Whether dynamo traces for torch.export, where torch has no torch.compiler.is_exporting (2.5): its tracer says."""
    from torch._dynamo.symbolic_convert import InstructionTranslator

    # No dynamo frame (none yet: an AttributeError; none since the last: None) while
    # compiling is the fallback under torch 2.5's non-strict export.
    try:
        tx = InstructionTranslator.current_tx()
    except AttributeError:
        tx = None
    return tx is None or bool(getattr(tx, "export", False))


def _register_compile_rule() -> None:
    global _is_exporting
    _is_exporting = getattr(torch.compiler, "is_exporting", None) or torch._dynamo.assume_constant_result(_dynamo_is_exporting)
    if NATIVE:  # the fallback's Python functions are traced as they are (_fallback._compiling)
        _register_if_available(torch.compiler, "substitute_in_graph", _C.bridge)(_bridge_for_dynamo)
        _register_if_available(torch.compiler, "substitute_in_graph", _C.straight_through)(_straight_through_for_dynamo)


when_imported("torch._dynamo", _register_compile_rule)

from . import _dtensor  # noqa: E402,F401  (DTensor's rule, registered when torch.distributed.tensor is imported)
