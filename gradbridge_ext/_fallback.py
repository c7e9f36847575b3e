"""bridge and straight_through in pure Python: the operator's rules, and kernels that need no compiler.

Where no native operator can be had (``gradbridge_ext.NATIVE`` is False), the two
kernels below serve every call. They give the native operator's values,
aliases, gradients and errors wherever Python can; docs/semantics.md ("The
pure-Python fallback") lists where it cannot: a cut is ``t.detach()``, so it
shares ``t``'s version counter (:func:`gradbridge_ext.strict` is always on);
each call runs Python; ``torch.ops.gradbridge`` holds no operator, so what
needs one (TorchScript, an export that keeps a backward) says so.

The rules (``check_*``) restate csrc/bridge.cpp's checks with its messages; the
compile stand-ins in ops.py check their arguments with them too.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from torch import Tensor

# --- the operator's rules (csrc/bridge.cpp), with its messages


def scalar_type_name(dtype: torch.dtype) -> str:
    """How C++ names a dtype in the operator's messages: Float, Long, BFloat16."""
    try:
        return torch.empty(0, dtype=dtype).type().removeprefix("torch.").removesuffix("Tensor")
    except (TypeError, RuntimeError):  # a dtype with no legacy tensor type
        return str(dtype)


def is_dense(t: Tensor) -> bool:
    """One strided storage, a plain shape."""
    return t.layout == torch.strided and not t.is_nested and not t.is_quantized


def layout_description(t: Tensor) -> str:
    if t.is_nested:
        return "a nested tensor"
    return "a quantized tensor" if t.is_quantized else f"a tensor with layout {t.layout}"


def check_strided(call: str, name: str, t: Tensor, instead: str) -> None:
    if not is_dense(t):
        raise NotImplementedError(
            f"{call}: {name} must be a dense strided tensor, so that there is one storage to alias; "
            f"got {layout_description(t)}. {instead}"
        )


def _leading_mask_hint(mask: torch.Size, shape: torch.Size) -> str:
    """csrc/bridge.cpp's leading_mask_hint: a (V,) row mask for a (V, D) weight needs trailing ones."""
    if not 0 < len(mask) < len(shape) or tuple(mask) != tuple(shape[: len(mask)]):
        return ""
    index = ", ".join([":"] * len(mask) + ["None"] * (len(shape) - len(mask)))
    return f"; for a mask of its leading dimensions, add trailing ones: grad_scale[{index}]"


def check_scale_tensor(op: str, grad_scale: Tensor, t: Tensor, name: str) -> None:
    """A floating (or bool) tensor that broadcasts to ``t``'s shape, on its device or 0-dim on the CPU."""
    if not is_dense(grad_scale):
        raise ValueError(f"{op}: a grad_scale tensor must be a dense strided tensor, got {layout_description(grad_scale)}")
    shape = t.shape
    broadcasts = grad_scale.dim() <= len(shape) and all(
        size == 1 or size == shape[i - grad_scale.dim()] for i, size in enumerate(grad_scale.shape)
    )
    if not broadcasts or not (grad_scale.is_floating_point() or grad_scale.dtype == torch.bool):
        raise ValueError(
            f"{op}: a grad_scale tensor must be floating or bool and broadcast to the shape {list(shape)}, "
            f"got a {list(grad_scale.shape)} {scalar_type_name(grad_scale.dtype)} tensor{_leading_mask_hint(grad_scale.shape, shape)}"
        )
    if grad_scale.device != t.device and not (grad_scale.dim() == 0 and grad_scale.device.type == "cpu"):
        raise ValueError(
            f"{op}: a grad_scale tensor must be on {name}'s device, {t.device}, or be a 0-dim CPU tensor; "
            f"got a {list(grad_scale.shape)} tensor on {grad_scale.device}"
        )


def check_finite(op: str, grad_scale: float) -> None:
    # NB: math.isfinite cannot take a symbol (a float torch.compile traces as
    # one), whose finiteness cannot be decided while tracing; x - x is nonzero
    # only for a constant nan or inf.
    if grad_scale - grad_scale != 0:
        raise ValueError(f"{op}: grad_scale must be a finite number, got {grad_scale}")


def check_bridge(t: Tensor, grad_scale: float | Tensor, attach: bool | None) -> Any:
    """bridge's rules; whether the result stays in the graph."""
    check_strided("gradbridge::bridge(t)", "t", t, "Use t.detach() for it.")
    if isinstance(grad_scale, Tensor):
        check_scale_tensor("gradbridge::bridge", grad_scale, t, "t")
        if attach is False:
            raise ValueError("gradbridge::bridge: attach=False cuts the graph, but a grad_scale tensor needs it; leave attach out")
        return True
    check_finite("gradbridge::bridge", grad_scale)
    nonzero = grad_scale != 0
    if attach is False and nonzero:
        raise ValueError("gradbridge::bridge: attach=False cuts the graph, but a nonzero grad_scale needs it; leave attach out")
    return nonzero if attach is None else attach


def check_straight_through(x: Tensor, q: Tensor, grad_scale: float | Tensor) -> None:
    """straight_through's rules (csrc/bridge.cpp, NOTE [straight_through's rules])."""
    for name, t in (("x", x), ("q", q)):
        check_strided("gradbridge::straight_through(x, q)", name, t, "Use x + (q - x).detach() for it.")
    if x.shape != q.shape:
        raise ValueError(
            "gradbridge::straight_through(x, q): x and q must have the same shape (no broadcasting: the "
            f"result is an alias of q), got {list(x.shape)} and {list(q.shape)}"
        )
    if x.device != q.device:
        raise ValueError(f"gradbridge::straight_through(x, q): x and q must be on the same device, got {x.device} and {q.device}")
    if not (x.is_floating_point() and q.is_floating_point() or x.is_complex() and q.is_complex()):
        raise TypeError(
            "gradbridge::straight_through(x, q): x and q must both be floating (or both complex), got "
            f"{scalar_type_name(x.dtype)} and {scalar_type_name(q.dtype)}"
        )
    if isinstance(grad_scale, Tensor):
        check_scale_tensor("gradbridge::straight_through", grad_scale, x, "x")
    else:
        check_finite("gradbridge::straight_through", grad_scale)


def recorded(t: Tensor) -> bool:
    """Whether the operator records a node whose gradient goes to ``t``: else its result is a plain alias."""
    return torch.is_grad_enabled() and t.requires_grad


# --- the kernels


# torch 2.5's non-strict export traces eager code under the Python dispatcher and
# does not say it is compiling; it would inline the Functions below into their
# forwards, dropping the backward. Newer torch says so (_compiling).
_EXPORT_SAYS_IT_COMPILES = tuple(int(part) for part in torch.__version__.split(".")[:2]) >= (2, 6)


def python_dispatcher_traces() -> bool:
    """Whether a trace runs this call under the Python dispatcher (export; symbolic and pre-dispatch make_fx)."""
    return torch._C._dispatch_tls_local_include_set().has(torch._C.DispatchKey.PythonDispatcher)


def _old_export_traces() -> bool:
    return not _EXPORT_SAYS_IT_COMPILES and python_dispatcher_traces()


def _traced_below_autograd() -> bool:
    """Whether make_fx records this call: of the Functions below it records only their forwards, not their backwards."""
    proxy_tensor = sys.modules.get("torch.fx.experimental.proxy_tensor")  # not imported: nothing traces
    get_proxy_mode = getattr(proxy_tensor, "get_proxy_mode", None)
    return get_proxy_mode is not None and get_proxy_mode() is not None


def _compiling() -> bool:
    """Whether dynamo traces this call: it then needs the compile stand-ins (ops.py)."""
    is_compiling = getattr(torch.compiler, "is_compiling", None)  # torch 2.3
    if is_compiling is not None:
        return is_compiling()
    dynamo = sys.modules.get("torch._dynamo")  # not imported: nothing compiles
    return dynamo is not None and dynamo.is_compiling()


def save_scale(ctx: Any, scale: float | Tensor | None) -> None:
    """What every backward here and in ops.py's compile stand-ins reads: the scale, or None."""
    ctx.scale_is_tensor = isinstance(scale, Tensor)
    if ctx.scale_is_tensor:
        ctx.save_for_backward(scale)  # its value at the forward, as the native kernel saves it
    else:
        ctx.scale = scale


def _scaled(ctx: Any, grad: Tensor) -> Tensor | None:
    scale = ctx.saved_tensors[0] if ctx.scale_is_tensor else ctx.scale
    if scale is None or isinstance(scale, Tensor):
        return None if scale is None else grad * scale
    return grad if scale == 1.0 else grad * scale  # the native backward runs no kernel at 1.0


def _bridge_backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, None]:
    return _scaled(ctx, grad), None


def _straight_through_backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, None, None]:
    return _scaled(ctx, grad), None, None  # autograd's engine casts it to x's dtype


# NB: named as the native backward nodes are (grad_fn.name() is "BridgeBackward").
# Each result is a custom Function's view of t (of q), as the native one is.
# forward takes ctx, with no setup_context: Function.apply then skips binding
# its arguments through inspect.signature, a third of its cost (about 10 us
# against 30 here). torch.func's transforms need setup_context: _UnderTransforms.
class Bridge(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, t: Tensor, scale: float | Tensor | None) -> Tensor:
        save_scale(ctx, scale)
        return t.view_as(t)

    backward = staticmethod(_bridge_backward)


class StraightThrough(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, q: Tensor, scale: float | Tensor | None) -> Tensor:
        save_scale(ctx, scale)
        return q.view_as(q)

    backward = staticmethod(_straight_through_backward)


class _UnderTransforms:
    """The same Functions, in the form torch.func's transforms (grad, vmap, jacrev) take."""

    class Bridge(torch.autograd.Function):
        generate_vmap_rule = True

        @staticmethod
        def forward(t: Tensor, scale: float | Tensor | None) -> Tensor:
            return t.view_as(t)

        @staticmethod
        def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
            save_scale(ctx, inputs[1])

        backward = staticmethod(_bridge_backward)

    class StraightThrough(torch.autograd.Function):
        generate_vmap_rule = True

        @staticmethod
        def forward(x: Tensor, q: Tensor, scale: float | Tensor | None) -> Tensor:
            return q.view_as(q)

        @staticmethod
        def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
            save_scale(ctx, inputs[2])

        backward = staticmethod(_straight_through_backward)


def _functions() -> Any:
    return _UnderTransforms if torch._C._are_functorch_transforms_active() else sys.modules[__name__]


def _has_tangent(t: Tensor) -> bool:
    from torch.autograd import forward_ad  # no dual level, no tangent: the common case costs one lookup

    return getattr(forward_ad, "_current_level", 0) >= 0 and forward_ad.unpack_dual(t).tangent is not None


def bridge(t: Tensor, grad_scale: float | Tensor, attach: bool | None) -> Tensor:
    """bridge's kernel, its arguments parsed by ops.py: a cut is ``t.detach()``."""
    if _compiling():
        from .ops import _bridge_for_dynamo

        return _bridge_for_dynamo(t, grad_scale, attach=attach)
    attached = check_bridge(t, grad_scale, attach)
    if attached and _has_tangent(t):  # csrc/bridge.cpp, check_attached_forward_ad
        raise NotImplementedError(
            "gradbridge::bridge: forward-mode AD is not supported with grad_scale or attach; the cut, bridge(t), "
            "drops the tangent as detach() does."
        )
    if not attached or not recorded(t):
        return t.detach()
    if _old_export_traces() or _traced_below_autograd():
        return unexportable("bridge", True, t)
    scale = grad_scale if isinstance(grad_scale, Tensor) or grad_scale != 0 else None
    return _functions().Bridge.apply(t, scale)


def straight_through(x: Tensor, q: Tensor, grad_scale: float | Tensor) -> Tensor:
    """straight_through's kernel, its arguments parsed by ops.py."""
    if _compiling():
        from .ops import _straight_through_for_dynamo

        return _straight_through_for_dynamo(x, q, grad_scale)
    check_straight_through(x, q, grad_scale)
    if _has_tangent(x) or _has_tangent(q):
        raise NotImplementedError("gradbridge::straight_through: forward-mode AD is not supported")
    if not recorded(x):
        return q.detach()
    if q.is_inference():
        raise RuntimeError(
            "gradbridge::straight_through(x, q): q is an inference tensor (made under torch.inference_mode()) and x "
            "requires grad, but autograd records nothing on an inference tensor's alias, so x would get no gradient; "
            "make q outside inference mode, or pass q.clone()"
        )
    if _old_export_traces() or _traced_below_autograd():
        return unexportable("straight_through", True, q)
    scale = grad_scale if isinstance(grad_scale, Tensor) or grad_scale != 0 else None
    return _functions().StraightThrough.apply(x, q, scale)


_strict = False


def set_strict(enabled: bool) -> bool:
    """What strict() sets; a no-op here, where every cut already shares its input's version counter."""
    global _strict
    previous, _strict = _strict, bool(enabled)
    return previous


def unexportable(op: str, recorded: bool, alias: Tensor) -> Tensor:
    """What torch.export captures without the operator: the plain alias where no gradient is at stake, else an error."""
    if recorded:
        raise RuntimeError(
            f"gradbridge::{op}: torch.export (or make_fx) keeps this call's backward only through the native "
            "operator, and this process runs gradbridge_ext's pure-Python fallback (gradbridge_ext.NATIVE is False; "
            "the import warned why). Trace under torch.no_grad() for inference, or install the native operator."
        )
    return alias.detach()
