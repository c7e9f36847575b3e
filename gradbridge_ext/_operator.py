"""The native operator's rules for vmap and functionalization, registered with torch at import.

Each exists because torch's API asks for one where the operator is registered;
the fallback registers no operator, so this module is imported only with the native one.

- vmap has no rule for a custom operator, and its fallback refuses aliasing
  ops; bridge of a batch is the batch of bridges, so the rule bridges the
  batched tensor whole (straight_through's and rotate_to's, with the batch first). torch.func.grad needs nothing: the autograd kernel
  serves every level.
- torch.export keeps the operator in the graph it captures, so ``ep.module()``
  keeps its backward; functionalization (``run_decompositions``, ONNX) then needs
  a decomposition: ``aten.detach`` for a cut and ``aten.alias`` for the rest
  (``run_decompositions`` lowers both to ``aten.alias``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ._tracing import TRACERS_KEEP_THE_OPERATOR, functionalizing, python_dispatcher_traces

# NB: register_vmap is torch 2.5's. Without it vmap raises torch's own error for a custom operator.
_register_vmap = getattr(torch.library, "register_vmap", None) or (lambda name: lambda function: function)
_bridge, _straight_through = torch.ops.gradbridge.bridge, torch.ops.gradbridge.straight_through
_rotate_to = torch.ops.gradbridge.rotate_to


@_register_vmap("gradbridge::bridge")
def _bridge_vmap(
    info: Any, in_dims: tuple[int | None, ...], t: Tensor, grad_scale: float = 0.0, attach: bool | None = None
) -> tuple[Tensor, int | None]:
    return _bridge(t, grad_scale, attach), in_dims[0]


@_register_vmap("gradbridge::bridge.Tensor")
def _bridge_tensor_vmap(
    info: Any, in_dims: tuple[int | None, ...], t: Tensor, grad_scale: Tensor, attach: bool | None = None
) -> tuple[Tensor, int | None]:
    if t is None:  # torch.ops passes None on: the operator refuses it, as outside vmap
        return _bridge.Tensor(t, grad_scale, attach), None
    if in_dims[1] is not None:
        raise ValueError("bridge under vmap: a grad_scale tensor must be the same for the whole batch")
    # A mask broadcasts from the right, so the batch goes first, where it cannot meet the mask.
    return _bridge.Tensor(_batch_first(t, in_dims[0], info), grad_scale, attach), 0


def _batch_first(t: Tensor, in_dim: int | None, info: Any) -> Tensor:
    """``t`` with its batch dimension first: moved there, or ``t`` expanded to the batch (a view either way)."""
    if in_dim is None:
        return t.expand(info.batch_size, *t.shape)
    return t.movedim(in_dim, 0)


def _straight_through_vmap(
    info: Any, in_dims: tuple[int | None, ...], x: Tensor, q: Tensor, grad_scale: float | Tensor = 1.0
) -> tuple[Tensor, int | None]:
    overload = _straight_through.Tensor if isinstance(grad_scale, Tensor) else _straight_through.default
    if x is None or q is None:  # torch.ops passes None on: the operator refuses it, as outside vmap
        return overload(x, q, grad_scale), None
    if isinstance(grad_scale, Tensor) and in_dims[2] is not None:
        raise ValueError("straight_through under vmap: a grad_scale tensor must be the same for the whole batch")
    return overload(_batch_first(x, in_dims[0], info), _batch_first(q, in_dims[1], info), grad_scale), 0


for _overload in ("gradbridge::straight_through", "gradbridge::straight_through.Tensor"):
    _register_vmap(_overload)(_straight_through_vmap)


# rotate_to of a batch is the batch of rotate_tos: the rows are the last dimension,
# so the batch goes first, where it cannot meet them.
@_register_vmap("gradbridge::rotate_to")
def _rotate_to_vmap(info: Any, in_dims: tuple[int | None, ...], x: Tensor, q: Tensor) -> tuple[Tensor, int | None]:
    if x is None or q is None:  # torch.ops passes None on: the operator refuses it, as outside vmap
        return _rotate_to(x, q), None
    return _rotate_to(_batch_first(x, in_dims[0], info), _batch_first(q, in_dims[1], info)), 0


def _refuse_to_drop_the_backward(op: str, *tensors: Tensor) -> None:
    if not torch.is_grad_enabled() or not any(t.requires_grad for t in tensors):
        return
    raise RuntimeError(
        f"gradbridge::{op}: torch {torch.__version__} decomposes the operator when it traces under the Python "
        "dispatcher (torch.export, make_fx with symbolic or pre-dispatch tracing), which would drop its backward "
        "(the traced graph would train it as an identity). Trace under torch.no_grad() for inference, or use "
        "torch 2.6 or newer, which keeps the operator."
    )


def _decomposition(op: str, cut: bool, alias_of: Tensor, *tensors: Tensor) -> Tensor:
    """What the operator decomposes to, for the callers that must decompose it; NotImplemented for the others.

    A cut is ``t.detach()``, exactly; the other settings are an alias below autograd.
    torch < 2.6's export, and its make_fx where the Python dispatcher is on,
    capture the decomposition in place of the operator with autograd on:
    aten.alias's gradient would silently replace the operator's, so an attached
    setting is refused there and a cut is detach. Newer torch decomposes it only
    below autograd (run_decompositions, ONNX), where the alias is all there is.
    """
    if TRACERS_KEEP_THE_OPERATOR or not python_dispatcher_traces():
        if not functionalizing(*tensors):
            return NotImplemented
    elif not cut:
        _refuse_to_drop_the_backward(op, *tensors)
    return torch.ops.aten.detach.default(alias_of) if cut else torch.ops.aten.alias.default(alias_of)


def _alias(t: Tensor, grad_scale: float | Tensor = 0.0, attach: bool | None = None) -> Tensor:
    cut = not isinstance(grad_scale, Tensor) and grad_scale == 0 and attach is not True
    return _decomposition("bridge", cut, t, t)


def _alias_of_q(x: Tensor, q: Tensor, grad_scale: Any = 1.0) -> Tensor:
    return _decomposition("straight_through", False, q, x, q)


def _rotate_to_alias_of_q(x: Tensor, q: Tensor) -> Tensor:
    return _decomposition("rotate_to", False, q, x, q)


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
for _overload in (_bridge.default, _bridge.Tensor):
    _overload.py_impl(torch._C.DispatchKey.CompositeImplicitAutograd)(_alias)
for _overload in (_straight_through.default, _straight_through.Tensor):
    _overload.py_impl(torch._C.DispatchKey.CompositeImplicitAutograd)(_alias_of_q)
_rotate_to.default.py_impl(torch._C.DispatchKey.CompositeImplicitAutograd)(_rotate_to_alias_of_q)
