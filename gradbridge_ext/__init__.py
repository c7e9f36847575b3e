"""gradbridge_ext: cut gradient flow at a chosen point of a model, without a copy.

For a model A -> B -> C in which C must learn from B's output but C's loss must
not train B or A::

    c = C(gradbridge_ext.bridge(b))
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from . import _extension

__all__ = ["BridgeFunction", "bridge"]

_C = _extension.load()

_BRIDGE_DOC = r"""bridge(t, /)
--

Return an alias of ``t`` through which no gradient flows back to ``t``.

The result shares ``t``'s storage (no copy, no allocation, no kernel launch) and
starts with its sizes, strides, storage offset, dtype, device and conj/neg bits.
It owns its metadata, so ``resize_``, ``set_``, ``as_strided_``, ``unsqueeze_``
... change it and never ``t``; and its own version counter, so
in-place ops on one do not bump the other's ``_version`` (``t.detach()`` shares
``t``'s). It is a leaf that does not require grad, not an autograd view: its
backward is zero, so nothing computed from it sends gradient to ``t`` or to
anything upstream of ``t``.

Accepts dense strided tensors on CPU, CUDA and meta, of every dtype; raises
``TypeError`` for non-tensors and ``NotImplementedError`` for sparse, nested,
quantized and mkldnn tensors.

Example::

    >>> import torch, gradbridge_ext
    >>> x = torch.ones(3, requires_grad=True)
    >>> b = x * 2                        # B's output
    >>> w = torch.ones(3, requires_grad=True)
    >>> (gradbridge_ext.bridge(b) * w).sum().backward()
    >>> w.grad                           # C learns from b ...
    tensor([2., 2., 2.])
    >>> print(x.grad)                    # ... and nothing reaches B or A
    None
"""

if TYPE_CHECKING:

    def bridge(t: Tensor, /) -> Tensor: ...

else:
    # NB: the default path calls the compiled op directly, not BridgeFunction:
    # Function.apply alone costs several microseconds against detach()'s one,
    # and a cut edge records nothing for it to keep. The public name is the C
    # entry point itself, since even a Python wrapper costs more than the alias.
    bridge = _C.bridge
    if bridge.__doc__ is None:
        torch._C._add_docstr(bridge, _BRIDGE_DOC)


class BridgeFunction(torch.autograd.Function):
    """``bridge`` as a ``torch.autograd.Function``: the compiled alias forward, a zero backward.

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
        output = _C.bridge(t)
        ctx.mark_non_differentiable(output)
        return output

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> None:
        return None
