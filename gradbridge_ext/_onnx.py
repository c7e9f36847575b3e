"""bridge and straight_through in the TorchScript-based ONNX exporter, ``torch.onnx.export(..., dynamo=False)``.

That exporter (torch's default before 2.9) translates each node of a traced graph
with a "symbolic" function registered under the op's name, and fails on a custom
op without one ("unrecognized namespace gradbridge::bridge"). The dynamo exporter
needs nothing from here: it decomposes bridge to an alias, which vanishes.
"""

from __future__ import annotations

import torch

from ._import_hooks import when_imported

# Each op whose value is one of its inputs, and which input (its position in the
# schema). In a traced graph all overloads of an op share one name, so they share
# the entry. Another such op is one more line.
IDENTITY_OF_INPUT = {
    "gradbridge::bridge": 0,
    "gradbridge::straight_through": 1,  # q
}
# The lookup finds a symbolic registered at opset 9 from every opset the exporter
# writes (7 and up).
_OPSET = 9


def _identity_of(index: int):
    def symbolic(g, *inputs):
        return g.op("Identity", inputs[index])

    return symbolic


def _register() -> None:
    # The TorchScript-based exporter is deprecated (no longer the default since
    # torch 2.9): a torch without it must still import torch.onnx, which runs this.
    register = getattr(torch.onnx, "register_custom_op_symbolic", None)
    if register is None:
        return
    for name, index in IDENTITY_OF_INPUT.items():
        register(name, _identity_of(index), _OPSET)


# torch.onnx is slow to import; register once someone imports it.
when_imported("torch.onnx", _register)
