"""The operator's argument rules and their messages, as csrc/rules.cpp states them: the one Python statement.

The pure-Python fallback checks its arguments with these, and so do the compile
stand-ins (dynamo cannot call into C++ while it traces) and ``Bridge``'s
constructor. tests/test_rules.py triggers every named error in both
implementations and compares the messages, so the two statements cannot drift.
Imports only torch.
"""

from __future__ import annotations

import numbers
from typing import Any

import torch
from torch import Tensor

# --- types, as the Python entry points state them (torch.ops's parser raises RuntimeError for these)


def type_name(value: Any) -> str:
    cls = type(value)
    return cls.__name__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"


def check_tensor(function: str, name: str, value: Any) -> None:
    if not isinstance(value, Tensor):
        raise TypeError(f"{function}(): argument '{name}' must be a torch.Tensor, not {type_name(value)}")


def check_attach_type(attach: Any) -> None:
    if attach is not None and attach is not True and attach is not False:
        raise TypeError(f"bridge(): argument 'attach' must be a bool or None, not {type_name(attach)}")


def _grad_scale_type_error(grad_scale: Any, function: str) -> TypeError:
    hint = " (attach=True is a keyword argument)" if isinstance(grad_scale, bool) and function == "bridge" else ""
    return TypeError(f"{function}(): argument 'grad_scale' must be a number or a tensor, not {type_name(grad_scale)}{hint}")


def as_float(grad_scale: Any, function: str) -> float:
    """A number as C reads a double (``__float__`` or ``__index__``); not a bool or a string."""
    if isinstance(grad_scale, (bool, str, bytes, bytearray)):
        raise _grad_scale_type_error(grad_scale, function)
    try:
        return float(grad_scale)
    except TypeError:
        raise _grad_scale_type_error(grad_scale, function) from None
    except OverflowError:
        raise ValueError(f"gradbridge::{function}: grad_scale must be a finite number, got an int too large for a float") from None


def check_grad_scale_type(grad_scale: Any, function: str) -> None:
    """A tensor or a real number, checked without asking a traced number's value."""
    if not isinstance(grad_scale, Tensor) and (isinstance(grad_scale, bool) or not isinstance(grad_scale, numbers.Real)):
        raise _grad_scale_type_error(grad_scale, function)


# --- values, as the operator states them (csrc/rules.cpp)


def scalar_type_name(dtype: torch.dtype) -> str:
    """How C++ names a dtype in the operator's messages: Float, Long, BFloat16."""
    try:
        return torch.empty(0, dtype=dtype).type().removeprefix("torch.").removesuffix("Tensor")
    except (TypeError, RuntimeError):  # a dtype with no legacy tensor type
        return str(dtype)


def is_dense(t: Tensor) -> bool:
    """One strided storage, a plain shape."""
    return t.layout == torch.strided and not t.is_nested and not t.is_quantized


def _layout_description(t: Tensor) -> str:
    if t.is_nested:
        return "a nested tensor"
    return "a quantized tensor" if t.is_quantized else f"a tensor with layout {t.layout}"


def check_strided(call: str, name: str, t: Tensor, instead: str) -> None:
    if not is_dense(t):
        raise NotImplementedError(
            f"{call}: {name} must be a dense strided tensor, so that there is one storage to alias; "
            f"got {_layout_description(t)}. {instead}"
        )


def _leading_mask_hint(mask: torch.Size, shape: torch.Size) -> str:
    """A (V,) row mask for a (V, D) weight needs trailing ones."""
    if not 0 < len(mask) < len(shape) or tuple(mask) != tuple(shape[: len(mask)]):
        return ""
    index = ", ".join([":"] * len(mask) + ["None"] * (len(shape) - len(mask)))
    return f"; for a mask of its leading dimensions, add trailing ones: grad_scale[{index}]"


def check_scale_tensor(op: str, grad_scale: Tensor, t: Tensor, name: str) -> None:
    """A floating (or bool) tensor that broadcasts to ``t``'s shape, on its device or 0-dim on the CPU."""
    if not is_dense(grad_scale):
        raise ValueError(f"{op}: a grad_scale tensor must be a dense strided tensor, got {_layout_description(grad_scale)}")
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


def bridge_attaches(grad_scale: float | Tensor, attach: bool | None) -> Any:
    """bridge's rules that need no ``t`` (``Bridge`` checks them at construction); whether the result stays in the graph."""
    if isinstance(grad_scale, Tensor):
        # Without a t, a mask is checked against its own shape and device: it is dense, floating or bool.
        check_scale_tensor("gradbridge::bridge", grad_scale, grad_scale, "t")
        if attach is False:
            raise ValueError("gradbridge::bridge: attach=False cuts the graph, but a grad_scale tensor needs it; leave attach out")
        return True
    check_finite("gradbridge::bridge", grad_scale)
    nonzero = grad_scale != 0
    if attach is False and nonzero:
        raise ValueError("gradbridge::bridge: attach=False cuts the graph, but a nonzero grad_scale needs it; leave attach out")
    return nonzero if attach is None else attach


def check_bridge(t: Tensor, grad_scale: float | Tensor, attach: bool | None) -> Any:
    """bridge's rules; whether the result stays in the graph."""
    check_strided("gradbridge::bridge(t)", "t", t, "Use t.detach() for it.")
    if isinstance(grad_scale, Tensor):
        check_scale_tensor("gradbridge::bridge", grad_scale, t, "t")
    return bridge_attaches(grad_scale, attach)


def _check_same_elements(call: str, x: Tensor, q: Tensor, instead: str) -> None:
    """What an alias of q with x's gradient needs: dense tensors describing the same elements (shape, device)."""
    for name, t in (("x", x), ("q", q)):
        check_strided(call, name, t, instead)
    if x.shape != q.shape:
        raise ValueError(
            f"{call}: x and q must have the same shape (no broadcasting: the result is an alias of q), "
            f"got {list(x.shape)} and {list(q.shape)}"
        )
    if x.device != q.device:
        raise ValueError(f"{call}: x and q must be on the same device, got {x.device} and {q.device}")


def check_straight_through(x: Tensor, q: Tensor, grad_scale: float | Tensor) -> None:
    """straight_through's rules (csrc/rules.cpp, NOTE [straight_through's rules])."""
    _check_same_elements("gradbridge::straight_through(x, q)", x, q, "Use x + (q - x).detach() for it.")
    if not (x.is_floating_point() and q.is_floating_point() or x.is_complex() and q.is_complex()):
        raise TypeError(
            "gradbridge::straight_through(x, q): x and q must both be floating (or both complex), got "
            f"{scalar_type_name(x.dtype)} and {scalar_type_name(q.dtype)}"
        )
    if isinstance(grad_scale, Tensor):
        check_scale_tensor("gradbridge::straight_through", grad_scale, x, "x")
    else:
        check_finite("gradbridge::straight_through", grad_scale)


def check_rotate_to(x: Tensor, q: Tensor) -> None:
    """rotate_to's rules (csrc/rules.cpp, NOTE [rotate_to's rules])."""
    _check_same_elements("gradbridge::rotate_to(x, q)", x, q, "Pass dense tensors.")
    if not (x.is_floating_point() and q.is_floating_point()):
        raise TypeError(
            "gradbridge::rotate_to(x, q): x and q must both be real floating (a rotation of complex rows is not "
            f"supported), got {scalar_type_name(x.dtype)} and {scalar_type_name(q.dtype)}"
        )
    if x.dim() == 0:
        raise ValueError(
            "gradbridge::rotate_to(x, q): x and q must have at least one dimension (each row of the last is a "
            "vector), got 0-dim tensors"
        )


def recorded(t: Tensor) -> bool:
    """Whether the operator records a node whose gradient goes to ``t``: else its result is a plain alias."""
    return torch.is_grad_enabled() and t.requires_grad


def check_forward_ad(op: str, attached: bool) -> None:
    """Raised where an input has a tangent: only a cut, which drops it as detach() does, takes one."""
    if op == "bridge":
        if attached:
            raise NotImplementedError(
                "gradbridge::bridge: forward-mode AD is not supported with grad_scale or attach; the cut, bridge(t), "
                "drops the tangent as detach() does."
            )
    else:
        raise NotImplementedError(f"gradbridge::{op}: forward-mode AD is not supported")


def check_q_not_inference(q: Tensor, op: str = "straight_through") -> None:
    if q.is_inference():
        raise RuntimeError(
            f"gradbridge::{op}(x, q): q is an inference tensor (made under torch.inference_mode()) and x "
            "requires grad, but autograd records nothing on an inference tensor's alias, so x would get no gradient; "
            "make q outside inference mode, or pass q.clone()"
        )


def check_exportable(op: str, recorded: bool) -> None:
    """What torch.export captures without the operator: the plain alias where no gradient is at stake, else this error."""
    if recorded:
        raise RuntimeError(
            f"gradbridge::{op}: torch.export (or make_fx) keeps this call's backward only through the native "
            "operator, and this process runs gradbridge_ext's pure-Python fallback (gradbridge_ext.NATIVE is False; "
            "the import warned why). Trace under torch.no_grad() for inference, or install the native operator."
        )
