"""The public face: ``bridge``, ``straight_through``, ``rotate_to``, ``strict``, ``Bridge`` and ``BridgeFunction``.

``gradbridge_ext`` re-exports them. With the native operator, ``bridge``,
``straight_through`` and ``rotate_to`` are its C entry points (csrc/python.cpp), which handle the
plain calls and hand every other to the Python entry points below; without it
the Python entry points are the public functions, over the fallback's kernels.
docs/design.md draws the modules and which imports which.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torch import Tensor, nn
from torch.overrides import handle_torch_function, has_torch_function, has_torch_function_unary

from . import _compile, _docstrings, _rules  # noqa: F401  (_compile: the compile rules, registered when dynamo is imported)
from ._extension import _C, NATIVE, flag_from_environment

if NATIVE:
    from . import _operator  # noqa: F401  (the operator's vmap and decomposition rules)
else:
    from . import _fallback

__all__ = ["NATIVE", "Bridge", "BridgeFunction", "Kernels", "bridge", "entry_points", "rotate_to", "straight_through", "strict"]

_NO_SCALE = 0.0


class Kernels(NamedTuple):
    """What the Python entry points call once they have parsed the arguments: the native operator's, or the fallback's."""

    bridge: Callable[[Tensor, float | Tensor, bool | None], Tensor]
    straight_through: Callable[[Tensor, Tensor, float | Tensor], Tensor]
    rotate_to: Callable[[Tensor, Tensor], Tensor]
    set_strict: Callable[[bool], bool]


class EntryPoints(NamedTuple):
    bridge: Callable[..., Tensor]
    straight_through: Callable[..., Tensor]
    rotate_to: Callable[..., Tensor]
    strict: Callable[..., contextlib.AbstractContextManager[None]]


def entry_points(kernels: Kernels, public: tuple[Callable, Callable, Callable] | None = None) -> EntryPoints:
    """The Python entry points over ``kernels``: the one way to choose an implementation.

    The package builds its own with it; the tests and the benchmark build the
    fallback's beside the native ones with ``entry_points(Kernels(_fallback.bridge,
    _fallback.straight_through, _fallback.rotate_to, _fallback.set_strict))``. ``public`` names what a
    ``__torch_function__`` override is handed (the C entry points where they are
    the public functions; by default the functions made here).
    """

    def bridge(t: Tensor, /, grad_scale: float | Tensor = _NO_SCALE, *, attach: bool | None = None) -> Tensor:
        # torch's check also answers yes for a class that defines __torch_function__
        # (torch.Tensor itself), though no override applies to a class passed as an
        # argument; only a mode, which a check of None detects, should see one.
        if has_torch_function_unary(t) and (not isinstance(t, type) or has_torch_function_unary(None)):
            args = (t,) if grad_scale is _NO_SCALE else (t, grad_scale)
            return handle_torch_function(public_bridge, (t,), *args, **({} if attach is None else {"attach": attach}))
        _rules.check_tensor("bridge", "t", t)
        _rules.check_attach_type(attach)
        if type(grad_scale) is not float and not isinstance(grad_scale, Tensor):
            grad_scale = _rules.as_float(grad_scale, "bridge")
        return kernels.bridge(t, grad_scale, attach)

    def straight_through(x: Tensor, q: Tensor, /, grad_scale: float | Tensor = 1.0) -> Tensor:
        if has_torch_function((x, q)):
            # NB: the type first: comparing a tensor (a mask, a traced scale) to 1.0 would ask for its value.
            args = (x, q) if type(grad_scale) is float and grad_scale == 1.0 else (x, q, grad_scale)
            return handle_torch_function(public_straight_through, (x, q), *args)
        _rules.check_tensor("straight_through", "x", x)
        _rules.check_tensor("straight_through", "q", q)
        if type(grad_scale) is not float and not isinstance(grad_scale, Tensor):
            grad_scale = _rules.as_float(grad_scale, "straight_through")
        return kernels.straight_through(x, q, grad_scale)

    def rotate_to(x: Tensor, q: Tensor, /) -> Tensor:
        if has_torch_function((x, q)):
            return handle_torch_function(public_rotate_to, (x, q), x, q)
        _rules.check_tensor("rotate_to", "x", x)
        _rules.check_tensor("rotate_to", "q", q)
        return kernels.rotate_to(x, q)

    @contextlib.contextmanager
    def strict(enabled: bool = True) -> Iterator[None]:
        previous = kernels.set_strict(enabled)
        try:
            yield
        finally:
            kernels.set_strict(previous)

    public_bridge, public_straight_through, public_rotate_to = public or (bridge, straight_through, rotate_to)
    for function in (bridge, straight_through, rotate_to, strict):  # Python's own argument errors name the function called
        function.__qualname__ = function.__name__
    bridge.__doc__ = _docstrings.BRIDGE.split("--\n\n", 1)[1]
    straight_through.__doc__ = _docstrings.STRAIGHT_THROUGH.split("--\n\n", 1)[1]
    rotate_to.__doc__ = _docstrings.ROTATE_TO.split("--\n\n", 1)[1]
    strict.__doc__ = _docstrings.STRICT
    return EntryPoints(bridge, straight_through, rotate_to, strict)


if NATIVE:
    # NB: the public names are the C entry points themselves (csrc/python.cpp),
    # which handle bridge(t), straight_through(x, q) and rotate_to(x, q) and hand every
    # other call to the Python entry points: even a Python wrapper costs more than the alias.
    _python = entry_points(
        Kernels(_C._bridge_parsed, _C._straight_through_parsed, _C._rotate_to_parsed, _C._set_strict),
        (_C.bridge, _C.straight_through, _C.rotate_to),
    )
    _C._bridge_with_options, _C._straight_through_with_options = _python.bridge, _python.straight_through
    _C._rotate_to_in_python = _python.rotate_to
    bridge, straight_through, rotate_to, strict = _C.bridge, _C.straight_through, _C.rotate_to, _python.strict
    for _function, _doc in (
        (bridge, _docstrings.BRIDGE), (straight_through, _docstrings.STRAIGHT_THROUGH), (rotate_to, _docstrings.ROTATE_TO)
    ):
        if _function.__doc__ is None:
            torch._C._add_docstr(_function, _doc)
else:
    bridge, straight_through, rotate_to, strict = entry_points(
        Kernels(_fallback.bridge, _fallback.straight_through, _fallback.rotate_to, _fallback.set_strict)
    )

if TYPE_CHECKING:

    def bridge(t: Tensor, /, grad_scale: float | Tensor = 0.0, *, attach: bool | None = None) -> Tensor: ...
    def straight_through(x: Tensor, q: Tensor, /, grad_scale: float | Tensor = 1.0) -> Tensor: ...
    def rotate_to(x: Tensor, q: Tensor, /) -> Tensor: ...
    def strict(enabled: bool = True) -> contextlib.AbstractContextManager[None]: ...


STRICT_ENV = "GRADBRIDGE_STRICT"
if flag_from_environment(STRICT_ENV):  # for the whole process, from its import
    (_C._set_strict if NATIVE else _fallback.set_strict)(True)


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
    # call, a large part of its cost; torch.func transforms are what would need it.
    @staticmethod
    def forward(ctx: Any, t: Tensor) -> Tensor:
        output = bridge(t)
        ctx.mark_non_differentiable(output)
        return output

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> None:
        return None


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
        # The rules, not a call of the operator: a module is built inside compiled code too.
        _rules.check_attach_type(attach)
        if not isinstance(grad_scale, Tensor):
            grad_scale = _rules.as_float(grad_scale, "bridge")
        self.attach = bool(_rules.bridge_attaches(grad_scale, attach))
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
