"""bridge inside torch.compile, torch.func.vmap and torch.export.

Dynamo cannot trace into a C function, so it would break the graph at every
bridge. ``torch.compiler.substitute_in_graph`` gives it this stand-in, written
with ops that functionalization understands; eager calls never run it. In a
compiled graph a cut is ``t.detach()``, whose version counter is ``t``'s (what
:func:`gradbridge_ext.strict` gives in eager), and an attached result is what
the eager op returns: a custom Function's view of ``t`` with bridge's backward.

vmap has no rule for a custom operator, and its fallback refuses aliasing ops;
bridge of a batch is the batch of bridges, so the rule bridges the batched
tensor whole. torch.func.grad needs nothing: the operator's autograd kernel
serves every level.

torch.export keeps the operator in the graph it captures, so ``ep.module()``
keeps bridge's backward; functionalization (``run_decompositions``, ONNX) then
needs a decomposition, and below autograd every setting is the same alias.
"""

from __future__ import annotations

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
    """The attached forms: a view forward; ``grad_scale * grad``, or ``None`` for ``grad_scale=None``."""

    @staticmethod
    def forward(t: Tensor, grad_scale: float | Tensor | None) -> Tensor:
        return t.view_as(t)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Tensor, float | Tensor | None], output: Tensor) -> None:
        grad_scale = inputs[1]
        ctx.scale_is_tensor = isinstance(grad_scale, Tensor)
        if ctx.scale_is_tensor:
            ctx.save_for_backward(grad_scale)  # as the eager kernel saves it: its value at the forward
        else:
            ctx.grad_scale = grad_scale

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, None]:
        if ctx.scale_is_tensor:
            (scale,) = ctx.saved_tensors
            if scale.device != grad.device and scale.device.type != "cpu":
                scale = scale.to(grad.device)
            return grad * scale, None
        return (None if ctx.grad_scale is None else grad * ctx.grad_scale), None


def _check_scale_tensor(grad_scale: Tensor) -> None:
    if grad_scale.dim() != 0 or not grad_scale.is_floating_point():
        raise ValueError(
            "gradbridge::bridge: a grad_scale tensor must be 0-dim and floating, "
            f"got a {grad_scale.dim()}-dim {grad_scale.dtype} tensor"
        )


@_register_if_available(torch.compiler, "substitute_in_graph", _C.bridge)
def bridge(t: Tensor, /, grad_scale: float | Tensor = 0.0, *, attach: bool | None = None) -> Tensor:
    # The eager entry's checks (csrc/python.cpp, csrc/bridge.cpp), at trace time.
    if attach is not None and not isinstance(attach, bool):
        raise TypeError(f"bridge(): argument 'attach' must be a bool or None, not {type(attach).__name__}")
    if isinstance(grad_scale, Tensor):
        _check_scale_tensor(grad_scale)
        if attach is False:
            raise ValueError(f"bridge(): attach=False cuts the graph, but grad_scale={grad_scale!r} needs it")
        return _AttachedBridge.apply(t, grad_scale)
    if isinstance(grad_scale, bool) or not isinstance(grad_scale, numbers.Real):
        raise TypeError(f"bridge(): argument 'grad_scale' must be a number, not {type(grad_scale).__name__}")
    # NB: a float that changes between calls reaches us as a symbol (automatic
    # dynamic), which math.isfinite cannot take and whose finiteness cannot be
    # decided while tracing; x - x is nonzero only for a constant nan or inf.
    if grad_scale - grad_scale != 0:
        raise ValueError(f"gradbridge::bridge: grad_scale must be a finite number, got {grad_scale}")
    nonzero = grad_scale != 0
    if attach is False and nonzero:
        raise ValueError(f"bridge(): attach=False cuts the graph, but grad_scale={grad_scale!r} needs it")
    if not (attach or nonzero):
        return t.detach()
    return _AttachedBridge.apply(t, grad_scale if nonzero else None)


@_register_if_available(torch.library, "register_vmap", "gradbridge::bridge")
def _bridge_vmap(
    info: Any, in_dims: tuple[int | None, ...], t: Tensor, grad_scale: float = 0.0, attach: bool = False
) -> tuple[Tensor, int | None]:
    return torch.ops.gradbridge.bridge(t, grad_scale, attach), in_dims[0]


@_register_if_available(torch.library, "register_vmap", "gradbridge::bridge.Tensor")
def _bridge_tensor_vmap(
    info: Any, in_dims: tuple[int | None, ...], t: Tensor, grad_scale: Tensor
) -> tuple[Tensor, int | None]:
    if in_dims[1] is not None:
        raise ValueError("bridge under vmap: a grad_scale tensor must be the same for the whole batch")
    return torch.ops.gradbridge.bridge.Tensor(t, grad_scale), in_dims[0]


def _alias(t: Tensor, *options: Any) -> Tensor:
    return torch.ops.aten.alias.default(t)


# NB: functionalization decomposes an op whose schema aliases its input through
# the op's Python CompositeImplicitAutograd kernel. Registered with py_impl it
# is seen only by tracing (the Python dispatcher); eager calls keep the C++
# kernels. tests/test_export.py pins this, so a torch that changes it fails there.
for _overload in (torch.ops.gradbridge.bridge.default, torch.ops.gradbridge.bridge.Tensor):
    _overload.py_impl(torch._C.DispatchKey.CompositeImplicitAutograd)(_alias)
