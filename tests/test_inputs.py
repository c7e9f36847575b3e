"""Every setting of bridge, fed every kind of input: full alias semantics, or a clear error.

A dense strided tensor on CPU, CUDA or meta, in any autograd role, gets the
alias; anything else gets an exception that names what was given. The matrix
below is the contract; test_bridge.py covers each semantic in depth for the cut.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable

import numpy as np
import pytest
import torch
from conftest import requires_torch, torch_at_least
from torch import Tensor, nn
from helpers import (
    GRAD_SCALE, SETTINGS, SHARES_VERSION, assert_alias, assert_view_only_if_recorded, layouts, raw_bytes, unsupported_kinds,
    unsupported_tensors,
)  # fmt: skip



PYTHON_ENTRY = [name for name in SETTINGS if not name.startswith("torch.ops")]


def dense_inputs(device: str) -> dict[str, Callable[[], Tensor]]:
    """Builders of every dense input kind bridge must alias (called fresh per test)."""
    z = torch.randn(5, dtype=torch.complex64, device=device)

    def inference_output() -> Tensor:
        with torch.inference_mode():
            return torch.randn(3, 4, device=device) * 2

    def with_hooks() -> Tensor:
        t = torch.randn(3, 4, device=device, requires_grad=True) * 1
        t.register_hook(lambda grad: grad)
        t.retain_grad()
        return t

    built: dict[str, Callable[[], Tensor]] = {
        name: (lambda name=name: layouts(device)[name]) for name in layouts(device)
    }
    built |= {
        "conj view": lambda: z.conj(),
        "neg view": lambda: z.conj().imag,
        "leaf requiring grad": lambda: torch.randn(3, 4, device=device, requires_grad=True),
        "non-leaf": lambda: torch.randn(3, 4, device=device, requires_grad=True) * 2,
        "parameter": lambda: nn.Parameter(torch.randn(3, 4, device=device)),
        "with hooks": with_hooks,
        "inference_mode output": inference_output,
        "meta": lambda: torch.empty(3, 5, device="meta", requires_grad=True).t(),  # the same for either device
        "integer": lambda: torch.arange(12, device=device).view(3, 4)[:, 1:],
    }
    return built


def assert_graph_role(setting: str, result: Tensor, t: Tensor) -> None:
    """Called where the result was made: grad mode decides whether it is attached."""
    attached = setting in GRAD_SCALE and t.requires_grad and torch.is_grad_enabled()
    assert_view_only_if_recorded(result, t)
    assert result.requires_grad == attached
    assert (result.grad_fn.name() if attached else result.grad_fn) == ("BridgeBackward" if attached else None)
    assert result.is_inference() == t.is_inference()


def assert_gradient(setting: str, result: Tensor, t: Tensor) -> Tensor | None:
    if not result.requires_grad:
        return None
    (grad,) = torch.autograd.grad(result.sum(), t, allow_unused=True, materialize_grads=False)
    if GRAD_SCALE[setting] == 0:
        assert grad is None  # not zeros
    elif t.is_meta:
        assert grad.is_meta and grad.shape == t.shape
    else:
        assert torch.equal(grad, torch.full_like(t, GRAD_SCALE[setting]))
    return grad


def assert_versions_and_writes(setting: str, result: Tensor, t: Tensor) -> None:
    if t.is_inference() or torch._debug_has_internal_overlap(t) != 0:
        return  # no version counter; one element at several indices makes writes ambiguous
    versions = t._version, result._version
    fresh = torch.ones_like(t) if t.dtype == torch.bool else torch.full_like(t, 3)
    with torch.no_grad():
        result.copy_(fresh)
    shared = setting in SHARES_VERSION
    assert (t._version, result._version) == (versions[0] + shared, versions[1] + 1)
    if not t.is_meta:
        assert torch.equal(raw_bytes(t), raw_bytes(fresh))
        with torch.no_grad():
            t.copy_(fresh.logical_not() if t.dtype == torch.bool else fresh * 2)
        assert torch.equal(raw_bytes(result.detach()), raw_bytes(t))  # a recorded view may not be read after t changed


GRAD_MODES = {"grad": torch.enable_grad, "no_grad": torch.no_grad, "inference_mode": torch.inference_mode}


@pytest.mark.parametrize("mode", GRAD_MODES)
@pytest.mark.parametrize("kind", list(dense_inputs("cpu")))
@pytest.mark.parametrize("setting", SETTINGS)
def test_every_dense_input_gets_the_alias(setting: str, kind: str, mode: str, device: str) -> None:
    t = dense_inputs(device)[kind]()
    seen_by_hook: list[Tensor | None] = []
    if t.requires_grad:
        t.register_hook(seen_by_hook.append)
    with GRAD_MODES[mode]():
        result = SETTINGS[setting](t)
        assert_alias(result, t)
        assert_graph_role(setting, result, t)
    grad = assert_gradient(setting, result, t)
    # A tensor hook on t sees exactly what autograd delivers to t, None included.
    assert len(seen_by_hook) == result.requires_grad
    if seen_by_hook:
        assert seen_by_hook[0] is grad or torch.equal(seen_by_hook[0], grad)
    assert_versions_and_writes(setting, result, t)


@pytest.mark.parametrize(
    "answered_by",
    [pytest.param("TwoTensor", marks=requires_torch("2.2", "torch.testing._internal.two_tensor")), "FakeTensorMode"],
)
@pytest.mark.parametrize("setting", sorted(SHARES_VERSION))
def test_version_sharing_holds_when_python_answers_the_op(setting: str, answered_by: str) -> None:
    # A wrapper subclass or a mode builds the result itself, below autograd;
    # the settings that share t's version counter must share it all the same.
    if answered_by == "TwoTensor":
        from torch.testing._internal.two_tensor import TwoTensor

        t, context = TwoTensor(torch.zeros(3), torch.zeros(3)), contextlib.nullcontext()
    else:
        from torch._subclasses.fake_tensor import FakeTensorMode

        context = FakeTensorMode()
        with context:
            t = torch.zeros(3)
    with context:
        result = SETTINGS[setting](t)
        with torch.no_grad():
            result.add_(1)
    assert t._version == result._version == 1


@pytest.mark.parametrize("setting", SETTINGS)
def test_more_than_2_to_the_31_elements(setting: str, device: str) -> None:
    # Never written but for one element: on CPU the pages stay untouched.
    t = torch.empty(2**31 + 3, dtype=torch.uint8, device=device)
    result = SETTINGS[setting](t)
    assert_alias(result, t)
    assert result.numel() == t.numel()
    result[-1] = 7
    assert t[-1].item() == 7


class Opaque:
    """An object with no tensor about it."""


NON_TENSORS = {
    "NoneType": None, "int": 3, "float": 3.0, "bool": True, "str": "t", "bytes": b"t",
    "list": [1.0, 2.0], "tuple": (1.0,), "dict": {"t": 1.0}, "numpy.ndarray": np.zeros(3),
    "numpy.float32": np.float32(1.0), "torch.Size": torch.Size([2]), "torch.dtype": torch.float32,
    "torch.device": torch.device("cpu"), "torch.storage.UntypedStorage": torch.ones(2).untyped_storage(),
    "test_inputs.Opaque": Opaque(), "type": Opaque,
    "torch._C._TensorMeta": torch.Tensor,  # the class, which carries __torch_function__
}  # fmt: skip


@pytest.mark.parametrize("name", NON_TENSORS)
@pytest.mark.parametrize("setting", SETTINGS)
def test_non_tensors_raise_naming_the_type(setting: str, name: str) -> None:
    given = NON_TENSORS[name]
    if setting in PYTHON_ENTRY:
        with pytest.raises(TypeError, match=rf"argument 't' must be a torch.Tensor, not {re.escape(name)}$"):
            SETTINGS[setting](given)
        return
    # torch.ops parses arguments itself, as for any operator; bridge must fail
    # as detach does there, and say what it was given.
    with pytest.raises(Exception) as expected:
        torch.ops.aten.detach(given)
    with pytest.raises(type(expected.value)) as error:
        SETTINGS[setting](given)
    named = "None" if given is None else f"found type '{re.escape(type(given).__name__)}'"
    if given is None and not torch_at_least("2.5"):
        # NB: once FakeTensorMode has run the operator, the dispatcher of torch
        # before 2.5 refuses an undefined tensor itself, before any kernel, in its own words.
        named = "None|tensor does not have a device"
    assert re.search(named, str(error.value)), error.value


@pytest.mark.filterwarnings("ignore::UserWarning")  # quantized and nested tensors warn on creation
@pytest.mark.parametrize("inference_mode", [False, True], ids=["", "in inference_mode"])
@pytest.mark.parametrize("kind", unsupported_kinds())
@pytest.mark.parametrize("setting", SETTINGS)
def test_unsupported_layouts_raise_naming_the_layout(setting: str, kind: str, inference_mode: bool) -> None:
    t = unsupported_tensors()[kind]
    message = "got .*" + re.escape(kind.split()[0])
    if kind == "nested jagged" and setting.startswith("torch.ops"):
        message = re.escape("gradbridge.bridge")  # a Python tensor subclass answers ops it does not know
    with torch.inference_mode(inference_mode), pytest.raises(NotImplementedError, match=message):
        SETTINGS[setting](t)
