"""The autograd Functions of both Python paths, over one scaled backward and one rotated one.

The pure-Python fallback's kernels return a custom Function's view (``Bridge``,
``StraightThrough``, ``RotateTo``, named as the native backward nodes are), and the
compile stand-ins (_compile.py) return a copy (``BridgeCopy``, ``StraightThroughCopy``,
``RotateToCopy``; see NOTE [A compiled attached result is a copy]). The scaled ones
save their scale with :func:`save_scale` and apply it with :func:`scaled`, which does
what the native ScaledGradBackward does (csrc/autograd.cpp); the rotated ones call
:func:`rotated_gradient`, csrc/rotate_to.cpp's formula. Imports only torch.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


def save_scale(ctx: Any, scale: float | Tensor | None, x: Tensor | None = None) -> None:
    """What every backward here reads: the scale (None: no gradient), and the dtype the gradient goes back in."""
    ctx.scale_is_tensor = isinstance(scale, Tensor)
    if ctx.scale_is_tensor:
        ctx.save_for_backward(scale)  # its value at the forward, as the native kernel saves it
    else:
        ctx.scale = scale
    ctx.x_dtype = None if x is None else x.dtype


def scaled(ctx: Any, grad: Tensor) -> Tensor | None:
    """``scale * grad`` in the input's dtype; ``None`` for no scale; ``grad`` itself at 1.0, as the native backward."""
    scale = ctx.saved_tensors[0] if ctx.scale_is_tensor else ctx.scale
    if scale is None:
        return None
    # NB: a tensor scale is on the gradient's device or a 0-dim CPU tensor (the rules), which any multiply reads.
    result = grad if not isinstance(scale, Tensor) and scale == 1.0 else grad * scale
    return result if ctx.x_dtype is None else result.to(ctx.x_dtype)


def _backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
    return (scaled(ctx, grad),) + (None,) * ctx.other_inputs


ROTATION_EPS = 1e-6  # vector-quantize-pytorch's clamp, on |x|, |q| and |u + w|


def _row_norm(t: Tensor) -> Tensor:
    return torch.linalg.vector_norm(t, dim=-1, keepdim=True)


def rotated_gradient(grad: Tensor, x: Tensor, q: Tensor) -> Tensor:
    """The rotation trick's gradient to ``x``, row by row: csrc/rotate_to.cpp's, op for op (NOTE [The rotation trick's gradient])."""
    acc = torch.promote_types(torch.float32, torch.promote_types(torch.promote_types(x.dtype, q.dtype), grad.dtype))
    e, t, g = x.to(acc), q.to(acc), grad.to(acc)
    norm_e = _row_norm(e).clamp_min(ROTATION_EPS)
    norm_q = _row_norm(t)
    lam = norm_q.div(norm_e)
    norm_q_clamped = norm_q.clamp_min(ROTATION_EPS)
    s = e.div(norm_e).add(t.div(norm_q_clamped))  # u + w
    norm_s = _row_norm(s).clamp_min(ROTATION_EPS)
    coef_s = s.mul(g).sum(-1, keepdim=True).div(norm_s.square()).mul(lam).mul(-2)
    coef_e = t.mul(g).sum(-1, keepdim=True).div(norm_q_clamped.mul(norm_e)).mul(lam).mul(2)
    return g.mul(lam).addcmul(s, coef_s).addcmul(e, coef_e).to(x.dtype)


def _rotated_backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, None]:
    # NB: x and q detached: lam and R are constants, so under create_graph the
    # gradient is differentiable in grad (a linear map) and in nothing else.
    x, q = ctx.saved_tensors
    return rotated_gradient(grad, x.detach(), q.detach()), None


# NB: each forward takes ctx, with no setup_context: Function.apply then skips
# binding its arguments through inspect.signature, a large part of its cost
# (benchmarks' fallback section measures the calls). torch.func's transforms
# need setup_context: the Functions in UnderTransforms.
class Bridge(torch.autograd.Function):
    """The fallback's attached bridge: a custom Function's view of ``t``, as the native one is."""

    @staticmethod
    def forward(ctx: Any, t: Tensor, scale: float | Tensor | None) -> Tensor:
        save_scale(ctx, scale)
        ctx.other_inputs = 1
        return t.view_as(t)

    backward = staticmethod(_backward)


class StraightThrough(torch.autograd.Function):
    """The fallback's straight_through: a custom Function's view of ``q``, the gradient to ``x``."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, q: Tensor, scale: float | Tensor | None) -> Tensor:
        save_scale(ctx, scale, x)
        ctx.other_inputs = 2
        return q.view_as(q)

    backward = staticmethod(_backward)


class RotateTo(torch.autograd.Function):
    """The fallback's rotate_to: a custom Function's view of ``q``, the rotation trick's gradient to ``x``."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, q: Tensor) -> Tensor:
        ctx.save_for_backward(x, q)
        return q.view_as(q)

    backward = staticmethod(_rotated_backward)


class UnderTransforms:
    """The same Functions, in the form torch.func's transforms (grad, vmap, jacrev) take."""

    class Bridge(torch.autograd.Function):
        generate_vmap_rule = True

        @staticmethod
        def forward(t: Tensor, scale: float | Tensor | None) -> Tensor:
            return t.view_as(t)

        @staticmethod
        def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
            save_scale(ctx, inputs[1])
            ctx.other_inputs = 1

        backward = staticmethod(_backward)

    class StraightThrough(torch.autograd.Function):
        generate_vmap_rule = True

        @staticmethod
        def forward(x: Tensor, q: Tensor, scale: float | Tensor | None) -> Tensor:
            return q.view_as(q)

        @staticmethod
        def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
            save_scale(ctx, inputs[2], inputs[0])
            ctx.other_inputs = 2

        backward = staticmethod(_backward)

    class RotateTo(torch.autograd.Function):
        generate_vmap_rule = True

        @staticmethod
        def forward(x: Tensor, q: Tensor) -> Tensor:
            return q.view_as(q)

        @staticmethod
        def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
            ctx.save_for_backward(*inputs)

        backward = staticmethod(_rotated_backward)


def eager_functions() -> Any:
    """The fallback's Functions for this call: the transforms' form under torch.func, else the faster one."""
    return UnderTransforms if torch._C._are_functorch_transforms_active() else Eager


class Eager:
    Bridge = Bridge
    StraightThrough = StraightThrough
    RotateTo = RotateTo


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
class BridgeCopy(torch.autograd.Function):
    """bridge's attached settings in a compiled graph: a copy of ``t``, the scaled gradient (see the NOTE above)."""

    @staticmethod
    def forward(t: Tensor, scale: float | Tensor | None) -> Tensor:
        return t.clone()

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        save_scale(ctx, inputs[1])
        ctx.other_inputs = 1

    backward = staticmethod(_backward)


class StraightThroughCopy(torch.autograd.Function):
    """straight_through in a compiled graph: a copy of ``q``; the scaled gradient to ``x``, in ``x``'s dtype."""

    @staticmethod
    def forward(x: Tensor, q: Tensor, scale: float | Tensor | None) -> Tensor:
        return q.clone()

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        save_scale(ctx, inputs[2], inputs[0])
        ctx.other_inputs = 2

    backward = staticmethod(_backward)


class RotateToCopy(torch.autograd.Function):
    """rotate_to in a compiled graph: a copy of ``q``; the rotation trick's gradient to ``x``, in ``x``'s dtype."""

    @staticmethod
    def forward(x: Tensor, q: Tensor) -> Tensor:
        return q.clone()

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        ctx.save_for_backward(*inputs)

    backward = staticmethod(_rotated_backward)
