"""bridge, straight_through and rotate_to in pure Python: kernels that need no compiler.

Where no native operator can be had (``gradbridge_ext.NATIVE`` is False), these
kernels serve every call, behind the same Python entry points (ops.py). They give
the native operator's values, aliases, gradients and errors (_rules.py) wherever
Python can; docs/semantics.md ("The pure-Python fallback") lists where it cannot:
a cut is ``t.detach()``, so it shares ``t``'s version counter (``strict()`` is
always on); each call runs Python; ``torch.ops.gradbridge`` holds no operator, so
what needs one (TorchScript, an export that keeps a backward) says so.
The native path never imports this module.
"""

from __future__ import annotations

from torch import Tensor
from torch.autograd import forward_ad

from . import _compile, _rules, _tracing
from ._functions import eager_functions


def _has_tangent(t: Tensor) -> bool:
    # No dual level, no tangent: the common case costs one lookup.
    return getattr(forward_ad, "_current_level", 0) >= 0 and forward_ad.unpack_dual(t).tangent is not None


def _traced_without_the_operator() -> bool:
    """Whether a tracer would keep only a Function's forward here (torch < 2.6's export; make_fx)."""
    return _tracing.old_export_traces() or _tracing.make_fx_traces()


def bridge(t: Tensor, grad_scale: float | Tensor, attach: bool | None) -> Tensor:
    """bridge's kernel, its arguments parsed by ops.py: a cut is ``t.detach()``."""
    if _tracing.compiling():
        return _compile.traced_bridge(t, grad_scale, attach, operator=False)
    attached = _rules.check_bridge(t, grad_scale, attach)
    if _has_tangent(t):
        _rules.check_forward_ad("bridge", attached)
    if not attached or not _rules.recorded(t):
        return t.detach()
    if _traced_without_the_operator():
        _rules.check_exportable("bridge", True)
    scale = grad_scale if isinstance(grad_scale, Tensor) or grad_scale != 0 else None
    return eager_functions().Bridge.apply(t, scale)


def straight_through(x: Tensor, q: Tensor, grad_scale: float | Tensor) -> Tensor:
    """straight_through's kernel, its arguments parsed by ops.py."""
    if _tracing.compiling():
        return _compile.traced_straight_through(x, q, grad_scale, operator=False)
    _rules.check_straight_through(x, q, grad_scale)
    if _has_tangent(x) or _has_tangent(q):
        _rules.check_forward_ad("straight_through", True)
    if not _rules.recorded(x):
        return q.detach()
    _rules.check_q_not_inference(q)
    if _traced_without_the_operator():
        _rules.check_exportable("straight_through", True)
    scale = grad_scale if isinstance(grad_scale, Tensor) or grad_scale != 0 else None
    return eager_functions().StraightThrough.apply(x, q, scale)


def rotate_to(x: Tensor, q: Tensor) -> Tensor:
    """rotate_to's kernel, its arguments parsed by ops.py."""
    if _tracing.compiling():
        return _compile.traced_rotate_to(x, q, operator=False)
    _rules.check_rotate_to(x, q)
    if _has_tangent(x) or _has_tangent(q):
        _rules.check_forward_ad("rotate_to", True)
    if not _rules.recorded(x):
        return q.detach()
    _rules.check_q_not_inference(q, "rotate_to")
    if _traced_without_the_operator():
        _rules.check_exportable("rotate_to", True)
    return eager_functions().RotateTo.apply(x, q)


_strict = False


def set_strict(enabled: bool) -> bool:
    """What strict() sets; a no-op here, where every cut already shares its input's version counter."""
    global _strict
    previous, _strict = _strict, bool(enabled)
    return previous
