"""bridge inside torch.compile and torch.func.vmap.

Dynamo cannot trace into a C function, so it would break the graph at every
bridge. ``torch.compiler.substitute_in_graph`` gives it this stand-in, written
with ops that functionalization understands; eager calls never run it. In a
compiled graph a cut is ``t.detach()``, whose version counter is ``t``'s (what
:func:`gradbridge_ext.strict` gives in eager), and an attached result is an
autograd view of ``t`` with bridge's backward.

vmap has no rule for a custom operator, and its fallback refuses aliasing ops;
bridge of a batch is the batch of bridges, so the rule bridges the batched
tensor whole. torch.func.grad needs nothing: the operator's autograd kernel
serves every level.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch
from torch import Tensor

from . import _C


def _register_if_available(module: Any, name: str, *args: Any) -> Any:
    """``module.name(*args)`` as a decorator, or leave the function alone where torch lacks it.

    NB: substitute_in_graph and register_vmap are torch 2.5's. Without them bridge
    still works eagerly; torch.compile breaks the graph at it, and vmap raises
    torch's own error for a custom operator.
    """
    register = getattr(module, name, None)
    return register(*args) if register is not None else lambda function: function


class _AttachedBridge(torch.autograd.Function):
    """The attached forms: identity forward, ``grad_scale * grad`` or ``None`` backward."""

    @staticmethod
    def forward(t: Tensor, grad_scale: float) -> Tensor:
        return t.view_as(t)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Tensor, float], output: Tensor) -> None:
        ctx.grad_scale = inputs[1]

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, None]:
        return (None if ctx.grad_scale == 0 else grad * ctx.grad_scale), None


@_register_if_available(torch.compiler, "substitute_in_graph", _C.bridge)
def bridge(t: Tensor, /, grad_scale: float = 0.0, *, attach: bool | None = None) -> Tensor:
    # The same checks as the eager entry (csrc/python.cpp), at trace time.
    if isinstance(grad_scale, bool) or not isinstance(grad_scale, numbers.Real):
        raise TypeError(f"bridge(): argument 'grad_scale' must be a number, not {type(grad_scale).__name__}")
    if attach is not None and not isinstance(attach, bool):
        raise TypeError(f"bridge(): argument 'attach' must be a bool or None, not {type(attach).__name__}")
    if not math.isfinite(grad_scale):
        raise ValueError(f"gradbridge::bridge: grad_scale must be a finite number, got {grad_scale}")
    if attach is None:
        attach = grad_scale != 0
    elif not attach and grad_scale != 0:
        raise ValueError(f"bridge(): attach=False cuts the graph, but grad_scale={grad_scale!r} needs it")
    if not attach:
        return t.detach()
    return _AttachedBridge.apply(t, grad_scale)


@_register_if_available(torch.library, "register_vmap", "gradbridge::bridge")
def _bridge_vmap(
    info: Any, in_dims: tuple[int | None, ...], t: Tensor, grad_scale: float = 0.0, attach: bool = False
) -> tuple[Tensor, int | None]:
    return torch.ops.gradbridge.bridge(t, grad_scale, attach), in_dims[0]
