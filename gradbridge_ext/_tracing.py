"""What, if anything, is tracing this call: dynamo, export, make_fx, functionalization.

The kernels and the compile rules each behave differently under each tracer;
they ask here, and torch's version is asked once, for all of them.
"""

from __future__ import annotations

import sys

import torch

from ._extension import torch_at_least

# torch 2.6 keeps the operator in what export and make_fx trace under the
# Python dispatcher, and says it is compiling where non-strict export runs eager
# code. Before it, export (and make_fx with symbolic or pre-dispatch tracing)
# captures the operator's decomposition, or inlines a Function into its forward:
# either way the backward would be dropped.
TRACERS_KEEP_THE_OPERATOR = torch_at_least("2.6")


def compiling() -> bool:
    """Whether dynamo traces this call: it then needs the compile stand-ins (_compile.py)."""
    is_compiling = getattr(torch.compiler, "is_compiling", None)  # torch 2.3
    if is_compiling is not None:
        return is_compiling()
    dynamo = sys.modules.get("torch._dynamo")  # not imported: nothing compiles
    return dynamo is not None and dynamo.is_compiling()


def python_dispatcher_traces() -> bool:
    """Whether a trace runs this call under the Python dispatcher (export; symbolic and pre-dispatch make_fx)."""
    return torch._C._dispatch_tls_local_include_set().has(torch._C.DispatchKey.PythonDispatcher)


def old_export_traces() -> bool:
    """Whether torch < 2.6's export traces this eager call without saying it compiles."""
    return not TRACERS_KEEP_THE_OPERATOR and python_dispatcher_traces()


def make_fx_traces() -> bool:
    """Whether make_fx records this call: of a Python Function it records only the forward, not the backward."""
    proxy_tensor = sys.modules.get("torch.fx.experimental.proxy_tensor")  # not imported: nothing traces
    get_proxy_mode = getattr(proxy_tensor, "get_proxy_mode", None)
    return get_proxy_mode is not None and get_proxy_mode() is not None


def functionalizing(*tensors: torch.Tensor) -> bool:
    """Whether functionalization asks for the operator's decomposition, by its mode or its tensors."""
    mode_key = getattr(torch._C, "_TorchDispatchModeKey", None)
    if mode_key is not None and torch._C._get_dispatch_mode(mode_key.FUNCTIONAL) is not None:
        return True
    functional = sys.modules.get("torch._subclasses.functional_tensor")  # none exists before it is imported
    return any(torch._is_functional_tensor(t) or (functional and isinstance(t, functional.FunctionalTensor)) for t in tensors)


def dynamo_is_exporting() -> bool:
    """Whether dynamo traces for torch.export, where torch has no torch.compiler.is_exporting (2.5): its tracer says.

    Called only while dynamo traces, so its modules are loaded.
    """
    translator = sys.modules["torch._dynamo.symbolic_convert"].InstructionTranslator
    # No dynamo frame (none yet: an AttributeError; none since the last: None) while
    # compiling is the fallback under torch 2.5's non-strict export.
    try:
        tx = translator.current_tx()
    except AttributeError:
        tx = None
    return tx is None or bool(getattr(tx, "export", False))
