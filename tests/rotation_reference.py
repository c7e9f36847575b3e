"""Plain-PyTorch reference for the rotation trick (issue 31), for tests and the client benchmark.

The rotation trick (Fifty et al., arXiv 2410.06424) passes the codebook vector ``q`` forward
and sends the encoder output ``e`` the incoming gradient ``g`` carried back through the map
``lam * R`` that takes ``e`` to ``q``, with ``lam`` and ``R`` held constant. Per row (the last
dimension), with the clamps of vector-quantize-pytorch's ``rotate_to`` (``eps = 1e-6``)::

    u   = e / max(|e|, eps)            w = q / max(|q|, eps)
    r   = (u + w) / max(|u + w|, eps)  lam = |q| / max(|e|, eps)
    R   = I - 2 r r^T + 2 w u^T        (= (I - 2 r r^T)(I - 2 u u^T): two reflections)
    grad_e = lam * R^T g = lam * (g - 2 r (r . g) + 2 u (w . g));  q gets none.

Away from the clamps (|e|, |q|, |u + w| all >= eps) this is the paper's formula, scale free.
At the degenerate rows the clamps decide, and this module reproduces the library there:

- ``e == 0`` (and ``q != 0``): u = 0, r = w, lam = |q| / eps, so
  grad_e = (|q| / eps) * (g - 2 w (w . g)): a reflection of g, scaled by 1e6 |q|.
  (The library's forward value on such a row is 0, not q.)
- ``q == 0``: lam = 0, grad_e = 0 (both zero: also 0).
- ``u + w == 0`` (q a negative multiple of e): r = 0, so R = I - 2 u u^T, a single
  reflection that still maps u to w; grad_e = lam * (g - 2 u (u . g)).
- ``0 < |e| < eps``, ``0 < |q| < eps``, ``0 < |u + w| < eps``: u, w or r are not unit
  vectors and the result is no longer the rotation trick's; it is the library's.

``library_rotate_to`` calls the library's own function (imported, not copied) where
vector-quantize-pytorch is installed; ``RotateToReference`` / ``rotate_to_reference`` stand in
for ``gradbridge_ext.rotate_to`` until the C++ operator exists.
"""

from __future__ import annotations

import torch
from torch import Tensor

LIBRARY_EPS = 1e-6  # vector_quantize_pytorch's safe_div and l2norm default, both as a clamp


def _accumulation_dtype(*dtypes: torch.dtype) -> torch.dtype:
    # NB: float64 stays float64; float32, float16 and bfloat16 accumulate in float32.
    acc = torch.float32
    for dtype in dtypes:
        acc = torch.promote_types(acc, dtype)
    return acc


def rotated_gradient(e: Tensor, q: Tensor, g: Tensor, eps: float = LIBRARY_EPS) -> Tensor:
    """The gradient the rotation trick sends to ``e``, row by row over the last dimension.

    ``e``, ``q`` and ``g`` have one shape (any leading dimensions). The result has ``e``'s
    dtype; the work is in the widest of the three and float32 (half types accumulate in
    float32, float64 stays float64). ``eps`` is the library's clamp; ``eps=0`` gives the
    unclamped formula (NaN at the degenerate rows).
    """
    if not (e.shape == q.shape == g.shape):
        raise ValueError(f"rotated_gradient: e, q and g must have one shape; got {tuple(e.shape)}, {tuple(q.shape)}, {tuple(g.shape)}")
    out_dtype = e.dtype
    acc = _accumulation_dtype(e.dtype, q.dtype, g.dtype)
    e, q, g = e.to(acc), q.to(acc), g.to(acc)

    def norm(t: Tensor) -> Tensor:
        return torch.linalg.vector_norm(t, dim=-1, keepdim=True)

    norm_e, norm_q = norm(e), norm(q)
    u = e / norm_e.clamp(min=eps)
    w = q / norm_q.clamp(min=eps)
    s = u + w
    r = s / norm(s).clamp(min=eps)
    lam = norm_q / norm_e.clamp(min=eps)
    r_dot_g = (r * g).sum(dim=-1, keepdim=True)
    w_dot_g = (w * g).sum(dim=-1, keepdim=True)
    return (lam * (g - 2 * r * r_dot_g + 2 * u * w_dot_g)).to(out_dtype)


def library_available() -> bool:
    """Whether vector-quantize-pytorch can be imported here."""
    try:
        import vector_quantize_pytorch.vector_quantize_pytorch  # noqa: F401
    except ImportError:
        return False
    return True


def library_rotate_to(src: Tensor, tgt: Tensor) -> Tensor:
    """vector-quantize-pytorch's own ``rotate_to(src, tgt)``, called where it is installed.

    Its forward computes ``lam * R @ src``, which equals ``tgt`` only up to rounding (and is
    0 where ``src`` is 0); its gradient is ``rotated_gradient(src, tgt, g)``.
    Raises ModuleNotFoundError, naming the package, where it is not installed.
    """
    try:
        from vector_quantize_pytorch.vector_quantize_pytorch import rotate_to
    except ImportError as error:
        raise ModuleNotFoundError(
            "library_rotate_to needs vector-quantize-pytorch (pip install vector-quantize-pytorch)"
        ) from error
    return rotate_to(src, tgt)


class RotateToReference(torch.autograd.Function):
    """``q``'s values (a view of ``q``: no copy, no kernel) with the rotation trick's gradient to ``x``.

    The forward only aliases; the rotation is computed in the backward alone, from the saved
    ``x`` and ``q``. ``q`` gets no gradient. The gradient has ``x``'s dtype.
    """

    @staticmethod
    def forward(ctx, x: Tensor, q: Tensor) -> Tensor:  # type: ignore[override]
        if x.shape != q.shape:
            raise ValueError(f"rotate_to: x and q must have one shape; got x {tuple(x.shape)} and q {tuple(q.shape)}")
        if not (x.is_floating_point() and q.is_floating_point()):
            raise TypeError(f"rotate_to: x and q must be floating point; got x {x.dtype} and q {q.dtype}")
        ctx.save_for_backward(x, q)
        # NB: returning a view of an input marks the output as created in a custom Function,
        # so autograd refuses in-place writes to it instead of dropping this backward.
        return q.view_as(q)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        x, q = ctx.saved_tensors
        grad_x = None
        if ctx.needs_input_grad[0]:
            # NB: lam, R held constant, as in the library: under create_graph the result is
            # differentiable in grad (a linear map) and in nothing else.
            grad_x = rotated_gradient(x.detach(), q.detach(), grad)
        return grad_x, None


def rotate_to_reference(x: Tensor, q: Tensor) -> Tensor:
    """Stand-in for ``gradbridge_ext.rotate_to(x, q)``: the library's argument order (src, tgt)."""
    return RotateToReference.apply(x, q)
