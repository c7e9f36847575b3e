"""What dynamo traces in place of the operator: the compile stand-ins, and their registration.

Dynamo cannot trace into a C function, so it would break the graph at every
call. ``torch.compiler.substitute_in_graph`` (torch 2.5) gives it these
stand-ins, written with ops that functionalization understands; eager calls
never run them, and the fallback's kernels call them while dynamo traces. A cut
is ``t.detach()``, whose version counter is ``t``'s (what ``strict()`` gives in
eager); an attached result is a copy with the operator's backward (NOTE [A
compiled attached result is a copy] in _functions.py). Under torch.export the
native operator itself goes into the graph, so that ``ep.module()`` keeps its
backward. The stand-ins check their arguments with _rules.py, as the operator
does; a number that changes between calls reaches them as a symbol, so its value
is checked only as far as tracing can. Registered when torch._dynamo is
imported: its import is slow, and a program that never compiles should not pay for it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from . import _rules, _tracing
from ._extension import _C, NATIVE
from ._functions import BridgeCopy, RotateToCopy, StraightThroughCopy
from ._import_hooks import when_imported

# NB: strict export puts the operator itself in the graph dynamo captures, as
# non-strict export does without dynamo, so that ep.module() runs its backward;
# export would inline the Functions into their forwards, under no_grad,
# dropping the backward. _register sets this.
_is_exporting: Callable[[], bool] = lambda: False


def _scale_or_none(grad_scale: float | Tensor) -> float | Tensor | None:
    """None where a number scale is 0: no gradient (attach=True), not a gradient of zeros."""
    return grad_scale if isinstance(grad_scale, Tensor) or grad_scale != 0 else None


def bridge_for_dynamo(t: Tensor, /, grad_scale: float | Tensor = 0.0, *, attach: bool | None = None) -> Tensor:
    """What dynamo traces in place of the C entry point ``bridge``."""
    return traced_bridge(t, grad_scale, attach, operator=True)


def straight_through_for_dynamo(x: Tensor, q: Tensor, /, grad_scale: float | Tensor = 1.0) -> Tensor:
    """What dynamo traces in place of the C entry point ``straight_through``."""
    return traced_straight_through(x, q, grad_scale, operator=True)


def rotate_to_for_dynamo(x: Tensor, q: Tensor, /) -> Tensor:
    """What dynamo traces in place of the C entry point ``rotate_to``."""
    return traced_rotate_to(x, q, operator=True)


def traced_bridge(t: Tensor, grad_scale: float | Tensor, attach: bool | None, operator: bool) -> Tensor:
    """bridge while dynamo traces; ``operator``: whether torch.ops.gradbridge serves export (the fallback's has none)."""
    _rules.check_attach_type(attach)
    _rules.check_grad_scale_type(grad_scale, "bridge")
    attached = _rules.check_bridge(t, grad_scale, attach)
    if _is_exporting():
        if not operator:
            _rules.check_exportable("bridge", attached and _rules.recorded(t))
            return t.detach()
        overload = torch.ops.gradbridge.bridge.Tensor if isinstance(grad_scale, Tensor) else torch.ops.gradbridge.bridge.default
        return overload(t, grad_scale, attach)
    if not attached or not _rules.recorded(t):
        return t.detach()
    return BridgeCopy.apply(t, _scale_or_none(grad_scale))


def traced_straight_through(x: Tensor, q: Tensor, grad_scale: float | Tensor, operator: bool) -> Tensor:
    """straight_through while dynamo traces, as :func:`traced_bridge`."""
    _rules.check_grad_scale_type(grad_scale, "straight_through")
    _rules.check_straight_through(x, q, grad_scale)
    if _is_exporting():
        if not operator:
            _rules.check_exportable("straight_through", _rules.recorded(x))
            return q.detach()
        op = torch.ops.gradbridge.straight_through
        return (op.Tensor if isinstance(grad_scale, Tensor) else op.default)(x, q, grad_scale)
    if not _rules.recorded(x):
        return q.detach()
    return StraightThroughCopy.apply(x, q, _scale_or_none(grad_scale))


def traced_rotate_to(x: Tensor, q: Tensor, operator: bool) -> Tensor:
    """rotate_to while dynamo traces, as :func:`traced_straight_through`."""
    _rules.check_rotate_to(x, q)
    if _is_exporting():
        if not operator:
            _rules.check_exportable("rotate_to", _rules.recorded(x))
            return q.detach()
        return torch.ops.gradbridge.rotate_to.default(x, q)
    if not _rules.recorded(x):
        return q.detach()
    return RotateToCopy.apply(x, q)


def _register() -> None:
    global _is_exporting
    _is_exporting = getattr(torch.compiler, "is_exporting", None) or torch._dynamo.assume_constant_result(
        _tracing.dynamo_is_exporting
    )
    substitute = getattr(torch.compiler, "substitute_in_graph", None)  # torch 2.5; before it, a graph break
    if NATIVE and substitute is not None:  # the fallback's Python functions are traced as they are
        substitute(_C.bridge)(bridge_for_dynamo)
        substitute(_C.straight_through)(straight_through_for_dynamo)
        substitute(_C.rotate_to)(rotate_to_for_dynamo)


when_imported("torch._dynamo", _register)
