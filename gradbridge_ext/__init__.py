"""gradbridge_ext: cut gradient flow at a chosen point of a model, without a copy.

For a model A -> B -> C in which C must learn from B's output but C's loss must
not train B or A::

    c = C(gradbridge_ext.bridge(b))
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from . import _extension

__all__ = ["Bridge", "BridgeFunction", "bridge", "strict"]

# The torch releases CI tests (.ci/matrix, oldest and newest); the oldest is
# pyproject.toml's floor.
TESTED_TORCH = ("2.1", "2.15")


def _minor(version: str) -> tuple[int, ...]:
    """``(2, 5)`` for "2.5.1+cu124" or "2.5": what a release of torch is known by."""
    return tuple(int(part) for part in version.split(".")[:2])


def _warn_if_untested_torch() -> None:
    # A newer torch usually works: say it is untested rather than refuse it.
    if _minor(torch.__version__) > _minor(TESTED_TORCH[1]):
        warnings.warn(
            f"gradbridge_ext is tested with torch {TESTED_TORCH[0]} to {TESTED_TORCH[1]}; "
            f"torch {torch.__version__} is newer and untested",
            UserWarning,
            stacklevel=2,
        )


_warn_if_untested_torch()
_C = _extension.load()

_BRIDGE_DOC = r"""bridge(t, /, grad_scale=0.0, *, attach=None)
--

Return an alias of ``t`` whose backward is zero, or ``grad_scale`` times the gradient.

The forward is the same for every setting: the result shares ``t``'s storage (no
copy, no allocation, no kernel launch) and starts with its sizes, strides,
storage offset, dtype, device and conj/neg bits. It owns its metadata, so
``resize_``, ``set_``, ``as_strided_``, ``unsqueeze_`` ... change it and never
``t``. A cut also owns its version counter, so in-place ops on one do not bump
the other's ``_version`` (``t.detach()`` shares ``t``'s; see :func:`strict`); the
settings that keep the result in the graph share ``t``'s, as a gradient reversal
layer's view does, in every grad mode. It is never an autograd view of ``t``
(for a Tensor subclass, torch's default ``__torch_function__`` rewraps it with
``as_subclass``, a view of the plain alias, as it does ``detach()``'s result).
What differs is the backward:

==================  ===========  =====================  ==========================
call                in the graph  gradient to ``t``      use
==================  ===========  =====================  ==========================
``bridge(t)``       no (a leaf)   none                   independent layers, probes
``bridge(t, s)``    yes           ``s * grad``           ``s = -lambda``: gradient
                                                         reversal; ``0 < s < 1``:
                                                         damped auxiliary head
``bridge(t,         yes           none (``None``, not    hooks upstream still run,
attach=True)``                    zeros)                 e.g. DDP with
                                                         ``find_unused_parameters
                                                         =False``
==================  ===========  =====================  ==========================

``grad_scale`` must be a finite number (not a bool); ``attach=None`` means
"attached if ``grad_scale`` is not 0", and ``attach=False`` with a nonzero
``grad_scale`` is an error. An attached result keeps ``t``'s graph alive until
backward, like any op's output, and refuses forward-mode AD (its backward is
not a derivative of its forward); a cut drops the tangent, as ``detach()`` does.

Accepts dense strided tensors on CPU, CUDA and meta, of every dtype; raises
``TypeError`` for non-tensors and ``NotImplementedError`` for sparse, nested,
quantized and mkldnn tensors.

Examples::

    >>> import torch, gradbridge_ext
    >>> x = torch.ones(3, requires_grad=True)
    >>> b = x * 2                        # B's output
    >>> w = torch.ones(3, requires_grad=True)
    >>> (gradbridge_ext.bridge(b) * w).sum().backward()
    >>> w.grad                           # C learns from b ...
    tensor([2., 2., 2.])
    >>> print(x.grad)                    # ... and nothing reaches B or A
    None
    >>> gradbridge_ext.bridge(b, -0.5).sum().backward()   # gradient reversal
    >>> x.grad                           # -0.5 * 2 per element
    tensor([-1., -1., -1.])
    >>> r = gradbridge_ext.bridge(b, attach=True)
    >>> r.grad_fn.name(), r.requires_grad
    ('BridgeBackward', True)
"""

if TYPE_CHECKING:

    def bridge(t: Tensor, /, grad_scale: float = 0.0, *, attach: bool | None = None) -> Tensor: ...

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


STRICT_ENV = "GRADBRIDGE_STRICT"


@contextlib.contextmanager
def strict(enabled: bool = True) -> Iterator[None]:
    """While active, ``bridge``'s results share ``t``'s version counter, as ``detach()``'s do.

    The one thing ``bridge`` gives up for its speed: the result keeps its own
    version counter, so if C saved the result for its backward (a ``Linear``
    does) and ``t`` is then changed in place, C's gradient silently uses the new
    values. Under ``strict()`` autograd raises "modified by an inplace
    operation" instead, exactly as with ``detach()``. It is the first thing to
    try when results look wrong. Setting the environment variable
    ``GRADBRIDGE_STRICT=1`` turns it on for the whole process at import.

    The setting is process-wide (like ``torch.autograd.set_detect_anomaly``)
    and applies to results made while it is on. Entering and leaving it from
    several threads at once is not supported: each exit restores the setting
    its own entry saw.

    Example::

        >>> import torch, gradbridge_ext
        >>> b = torch.ones(2, requires_grad=True) * 1
        >>> w = torch.ones(2, requires_grad=True)
        >>> with gradbridge_ext.strict():
        ...     c = gradbridge_ext.bridge(b) * w   # mul saves the bridged b for w's grad
        >>> with torch.no_grad():
        ...     _ = b.add_(1)                      # ... which this in-place change stales
        >>> c.sum().backward()
        Traceback (most recent call last):
        ...
        RuntimeError: one of the variables needed for gradient computation has been modified by an inplace operation...
    """
    previous = _C._set_strict(enabled)
    try:
        yield
    finally:
        _C._set_strict(previous)


def _strict_from_environment() -> None:
    value = os.environ.get(STRICT_ENV, "").strip().lower()
    if value in ("1", "true", "yes", "on"):
        _C._set_strict(True)
    elif value not in ("", "0", "false", "no", "off"):
        raise ValueError(f"{STRICT_ENV}={os.environ[STRICT_ENV]!r}: expected 1 or 0")


_strict_from_environment()


class Bridge(nn.Module):
    """:func:`bridge` as a module, for ``nn.Sequential`` and module hooks.

    ``Bridge()`` cuts, ``Bridge(grad_scale=-1.0)`` reverses the gradient (a
    gradient reversal layer), ``Bridge(attach=True)`` keeps its output in the
    graph with a zero gradient. The arguments are checked as :func:`bridge`
    checks them.

    Example::

        >>> import torch, gradbridge_ext
        >>> head = torch.nn.Sequential(gradbridge_ext.Bridge(grad_scale=-1.0), torch.nn.Linear(4, 2))
        >>> head[0]
        Bridge(grad_scale=-1.0: gradient to the input times -1.0, reversed)
    """

    def __init__(self, grad_scale: float | Tensor = 0.0, *, attach: bool | None = None) -> None:
        super().__init__()
        bridge(torch.empty(0, device="meta"), grad_scale, attach=attach)  # the same checks
        if isinstance(grad_scale, Tensor):
            # A buffer, so it moves with the module; update it in place for a schedule.
            self.register_buffer("grad_scale", grad_scale)
            self.attach = True
        else:
            self.grad_scale = float(grad_scale)
            self.attach = grad_scale != 0 if attach is None else attach

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


from . import _transforms  # noqa: E402  (bridge's rules for torch.compile and vmap)
from . import _dtensor  # noqa: E402,F401  (bridge's DTensor sharding rule, registered when torch.distributed.tensor is imported)
