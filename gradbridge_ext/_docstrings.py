"""The docstrings of the C entry points, which cannot carry their own (ops.py attaches them).

The first two lines of each are CPython's signature convention for a C function
(``help()`` reads the signature from them); a Python entry point drops them.
"""

BRIDGE = r"""bridge(t, /, grad_scale=0.0, *, attach=None)
--

Return an alias of ``t`` with no backward (a cut), ``grad_scale`` times the gradient, or none in the graph (``attach=True``).

The forward is the same for every setting: the result shares ``t``'s storage (no
copy, no allocation, no kernel launch) and starts with its sizes, strides,
storage offset, dtype, device and conj/neg bits. It owns its metadata, so
``resize_``, ``set_``, ``as_strided_``, ``unsqueeze_`` ... change it and never
``t``. A cut also owns its version counter, so in-place ops on one do not bump
the other's ``_version`` (``t.detach()`` shares ``t``'s; see :func:`strict`); the
settings that keep the result in the graph share ``t``'s, as a gradient reversal
layer's view does, in every grad mode. A result recorded in the graph (``t``
requires grad, grad mode on) is what an autograd.Function returns for a view:
``_base`` is ``t`` and an in-place op on it raises autograd's "is a view and is
being modified inplace"; any other result is no autograd view of ``t`` (for a
Tensor subclass, torch's default ``__torch_function__`` rewraps it with
``as_subclass``, as it does ``detach()``'s result). What differs is the backward:

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

``grad_scale`` may also be a floating (or bool) tensor on ``t``'s device: 0-dim
(or 0-dim on the CPU), or a mask of any shape that broadcasts to ``t``'s
(``bridge(emb.weight, new_rows[:, None])`` trains only the new rows of an embedding). It is saved for
the backward like any input (change it in place between steps, not between
forward and backward), always multiplies, and gets no gradient itself.
A number ``grad_scale`` must be finite (not a bool); ``attach=None`` means
"attached if ``grad_scale`` is not 0", and ``attach=False`` with a nonzero
``grad_scale`` is an error. An attached result keeps ``t``'s graph alive until
backward, like any op's output, and refuses forward-mode AD (its backward is
not a derivative of its forward); a cut drops the tangent, as ``detach()`` does.

Accepts dense strided tensors of every dtype on every device (one
device-generic kernel: CPU, CUDA, meta and out-of-tree backends alike); raises
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

STRAIGHT_THROUGH = r"""straight_through(x, q, /, grad_scale=1.0)
--

Return ``q``, exactly, with ``x``'s gradient: the straight-through estimator.

What ``x + (q - x).detach()`` means, without its two kernels, its two temporaries
and its rounding: the result is an alias of ``q`` (same storage, no copy, no
allocation, no kernel; bitwise ``q``), and its backward sends ``grad_scale *
grad`` to ``x`` (no kernel at 1.0) and nothing to ``q``. The argument order is
vector-quantize-pytorch's ``straight_through(src, tgt)``: ``x`` is the source of
the gradient, ``q`` (its quantized, rounded or one-hot form) gives the values.

``x`` and ``q`` must have the same shape (no broadcasting: the result is ``q``)
and device, and both be floating (or both complex); their dtypes may differ: the
result has ``q``'s, and the gradient reaches ``x`` in ``x``'s. ``grad_scale`` is a
finite number, or a floating (or bool) tensor on ``x``'s device (or 0-dim on the
CPU) that broadcasts to ``x``'s shape, saved for the backward. The result is recorded in the graph when ``x`` requires
grad (grad mode on): then it is a custom Function's view of ``q``, so an in-place
op on it raises autograd's "is a view and is being modified inplace" instead of
silently writing ``q``. It always shares ``q``'s version counter. Otherwise (``x``
needs no grad, ``no_grad``, inference mode) it is a plain alias of ``q`` that does
not require grad, as the trick's result would not. Forward-mode AD is refused.

Examples::

    >>> import torch, gradbridge_ext
    >>> w = torch.tensor([0.4, -1.3, 0.1], requires_grad=True)
    >>> q = w.detach().round().clamp(-1, 1)        # ternary weights
    >>> y = gradbridge_ext.straight_through(w, q)
    >>> y                                          # q's values, exactly
    tensor([ 0., -1.,  0.], grad_fn=<StraightThroughBackward>)
    >>> y.data_ptr() == q.data_ptr()               # q itself, no copy
    True
    >>> (y * torch.tensor([1.0, 2.0, 3.0])).sum().backward()
    >>> w.grad                                     # the gradient goes straight through to w
    tensor([1., 2., 3.])
"""

ROTATE_TO = r"""rotate_to(x, q, /)
--

Return ``q``, exactly, with the rotation trick's gradient to ``x``.

The rotation trick (Fifty et al., "Restructuring Vector Quantization with the
Rotation Trick", arXiv 2410.06424), as vector-quantize-pytorch's ``rotate_to(src,
tgt)`` names it, with its argument order: ``x`` is the encoder output, ``q`` its
codebook vector. The forward is ``straight_through``'s: an alias of ``q`` (same
storage, no copy, no allocation, no kernel; bitwise ``q``, where the library's
``lam R x`` is ``q`` only up to rounding, and 0 where ``x`` is 0). The backward
treats each row of the last dimension (any leading shape) as one vector ``e`` and
sends ``e`` the gradient ``g`` carried back through the rotation and rescaling that
take ``e`` to ``q``, held constant, and nothing to ``q``::

    u = e / |e|,  w = q / |q|,  r = (u + w) / |u + w|,  lam = |q| / |e|
    grad_e = lam * R^T g = lam * (g - 2 r (r . g) + 2 u (w . g)),  R = I - 2 r r^T + 2 w u^T

with the library's clamps (each norm above is ``max(norm, 1e-6)``), so that it is
the library's gradient at every row, the degenerate ones included: a zero ``e``
gets ``(|q| / 1e-6) (g - 2 w (w . g))``, a zero ``q`` gets 0, an exact antipode
(``q = -c e``) gets ``lam (g - 2 u (u . g))``, and rows with a norm below 1e-6
get the clamped value. It computes in float32 for float16 and bfloat16 (in the
wider of the dtypes and float32) and returns the gradient in ``x``'s dtype.

``x`` and ``q`` must have the same shape, with at least one dimension, and
device, and both be real floating; their dtypes may differ (the result has
``q``'s). The result is recorded in the graph when ``x`` requires grad (grad mode
on): then it is a custom Function's view of ``q`` that refuses in-place ops, and
the backward saves ``x`` and ``q`` (an in-place change of either before it raises).
It always shares ``q``'s version counter. Otherwise it is a plain alias of ``q``
that does not require grad. Forward-mode AD is refused.

Example::

    >>> import torch, gradbridge_ext
    >>> x = torch.tensor([[3.0, 4.0]], requires_grad=True)   # an encoder output, |x| = 5
    >>> q = torch.tensor([[0.0, 10.0]])                      # its codebook vector, |q| = 10
    >>> y = gradbridge_ext.rotate_to(x, q)
    >>> y                                                    # q's values, exactly
    tensor([[ 0., 10.]], grad_fn=<RotateToBackward>)
    >>> y.data_ptr() == q.data_ptr()                         # q itself, no copy
    True
    >>> y.backward(torch.tensor([[0.0, 1.0]]))               # g along q ...
    >>> x.grad                                               # ... reaches x along x, times |q| / |x|
    tensor([[1.2000, 1.6000]])
"""

STRICT = """While active, ``bridge``'s results share ``t``'s version counter, as ``detach()``'s do.

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
