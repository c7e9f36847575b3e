"""gradbridge_ext: choose the gradient at a point of a model, on a zero-copy alias.

``bridge(b)`` cuts (for a model A -> B -> C in which C must learn from B's output
but C's loss must not train B or A: ``c = C(gradbridge_ext.bridge(b))``);
``bridge(b, s)`` scales or reverses the gradient, ``bridge(b, mask)`` does it per
element, ``bridge(b, attach=True)`` keeps the result in the graph with none;
``straight_through(x, q)`` is ``q`` with ``x``'s gradient, the exact
straight-through estimator; ``rotate_to(x, q)`` is ``q`` with the rotation
trick's gradient to ``x``. ``NATIVE`` says whether the compiled operator or the
pure-Python fallback serves the calls.

The public face is ``gradbridge_ext.ops``; docs/design.md maps the modules.
"""

__version__ = "0.1.0"  # the one place it is written: pyproject.toml reads it

from ._extension import _C, NATIVE, TESTED_TORCH  # noqa: F401  (_C: gradbridge_ext._C, whichever way it was built; None without one)
from .ops import Bridge, BridgeFunction, bridge, rotate_to, straight_through, strict
from . import _dtensor, _onnx  # noqa: F401, E402  (rules registered when torch.distributed.tensor, torch.onnx are imported)

__all__ = ["__version__", "NATIVE", "Bridge", "BridgeFunction", "TESTED_TORCH", "bridge", "rotate_to", "straight_through", "strict"]
