"""What bridge(t) shares with t, what it owns, and what autograd sees: by observable behaviour."""

from __future__ import annotations

import doctest

import pytest
import torch
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.overrides import TorchFunctionMode
from torch.profiler import ProfilerActivity, profile

import gradbridge_ext
from conftest import requires_torch, torch_at_least
from helpers import DTYPES, assert_alias, assert_cut, layouts, metadata, random_values, raw_bytes
from independent_layers import ABC
from gradbridge_ext import BridgeFunction, bridge

# Each test runs on the native operator and on the pure-Python fallback (conftest.implementation).
pytestmark = pytest.mark.usefixtures("implementation")

# Ways to call the operator; all must give the same alias. Looked up when called (see helpers.SETTINGS).
ENTRY_POINTS = {
    "bridge": lambda t: bridge(t),
    "BridgeFunction": lambda t: BridgeFunction.apply(t),
    "torch.ops": lambda t: torch.ops.gradbridge.bridge(t),
}


def inputs(kind: str, device: str) -> torch.Tensor:
    """A float tensor in each autograd role bridge accepts."""
    if kind == "leaf":
        return torch.randn(3, 4, device=device, requires_grad=True)
    if kind == "parameter":
        return nn.Parameter(torch.randn(3, 4, device=device))
    if kind == "inference tensor":
        with torch.inference_mode():
            return torch.randn(3, 4, device=device)
    return torch.randn(3, 4, device=device, requires_grad=True) * 2  # non-leaf


@pytest.mark.parametrize("entry", ENTRY_POINTS)
@pytest.mark.parametrize("kind", ["leaf", "non-leaf", "parameter", "inference tensor"])
@pytest.mark.parametrize("mode", ["grad", "no_grad", "inference_mode"])
def test_alias_of_every_autograd_role(entry: str, kind: str, mode: str, device: str) -> None:
    t = inputs(kind, device)
    context = {"grad": torch.enable_grad, "no_grad": torch.no_grad, "inference_mode": torch.inference_mode}[mode]
    with context():
        result = ENTRY_POINTS[entry](t)
    assert_alias(result, t)
    assert_cut(result)
    assert type(result) is torch.Tensor  # as t.detach() gives for a Parameter
    assert result.is_inference() == t.is_inference()


@pytest.mark.parametrize("layout", list(layouts("cpu")))
def test_writes_are_shared_both_ways(layout: str, device: str) -> None:
    t = layouts(device)[layout]
    if layout == "expanded":
        t = t.contiguous()  # an in-place write to stride-0 memory is ambiguous
    result = bridge(t)
    result.copy_(torch.randn(t.shape, device=device))
    assert torch.equal(t, result)
    t.copy_(torch.randn(t.shape, device=device))
    assert torch.equal(t, result)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_every_dtype(dtype: torch.dtype, device: str, implementation: str) -> None:
    t = random_values((6, 4), dtype, device)[1:, ::2]  # non-contiguous, with an offset
    result = bridge(t)
    assert_alias(result, t)
    assert_cut(result)
    result.copy_(random_values(result.shape, dtype, device))
    assert torch.equal(raw_bytes(t), raw_bytes(result))
    assert result._version == 1 and t._version == (0 if implementation == "native" else 1)  # the fallback's cut is detach()


@pytest.mark.native_only("a cut is t.detach(), which shares t's version counter")
def test_version_counters_are_independent(device: str) -> None:
    t = torch.zeros(4, device=device)
    result = bridge(t)
    result.add_(1)
    result.mul_(2)
    assert (result._version, t._version) == (2, 0)
    t.sub_(1)
    assert (result._version, t._version) == (2, 1)
    assert torch.equal(t, torch.ones(4, device=device))
    # detach() is the contrast: it shares t's counter.
    detached = t.detach()
    detached.add_(1)
    assert t._version == 2


def strided_source(device: str) -> torch.Tensor:
    """A (3, 1, 4) tensor at offset 4 of a 40-element storage."""
    return torch.arange(40.0, device=device)[4:16].view(3, 1, 4)


@pytest.mark.parametrize(
    "change",
    [
        pytest.param(lambda r: r.resize_(3), id="resize_ shrink"),
        pytest.param(lambda r: r.resize_(2, 3, 4), id="resize_ grow within storage"),
        pytest.param(lambda r: r.set_(torch.ones(7, device=r.device)), id="set_"),
        pytest.param(lambda r: r.set_(r.untyped_storage(), 2, (2, 2), (1, 2)), id="set_ same storage"),
        pytest.param(lambda r: r.unsqueeze_(0), id="unsqueeze_"),
        pytest.param(lambda r: r.squeeze_(1), id="squeeze_"),
        pytest.param(lambda r: r.squeeze_(1).t_(), id="t_"),
        pytest.param(lambda r: r.transpose_(0, 2), id="transpose_"),
        pytest.param(lambda r: r.as_strided_((2, 2), (1, 3), 1), id="as_strided_"),
    ],
)
def test_metadata_changes_stay_on_the_result(change, device: str, implementation: str) -> None:
    t = strided_source(device)
    before, values, data_ptr = metadata(t), t.clone(), t.data_ptr()
    result = bridge(t)
    change(result)
    assert metadata(result) != before
    assert metadata(t) == before
    assert t.data_ptr() == data_ptr
    assert torch.equal(t, values)
    assert t._version == (0 if implementation == "native" else result._version)  # the fallback's cut shares it


def test_resize_past_the_storage_reallocates_the_shared_storage(device: str) -> None:
    # Both tensors point to one StorageImpl, so growing it moves both to the new
    # buffer (as with detach() or the set_ trick); t keeps its metadata and values.
    t = strided_source(device)
    before, values = metadata(t), t.clone()
    result = bridge(t).resize_(100)
    assert result.shape == (100,)
    assert metadata(t) == before
    assert torch.equal(t, values)
    assert result.untyped_storage().data_ptr() == t.untyped_storage().data_ptr()
    result[0] = -1.0  # the result keeps t's storage offset
    assert t[0, 0, 0] == -1.0


def test_cat_out_writes_through_and_resizes_only_the_result(device: str, implementation: str) -> None:
    t = strided_source(device)
    before = metadata(t)
    result = bridge(t)
    parts = [torch.full((2, 1, 4), 7.0, device=device), torch.full((1, 1, 4), 8.0, device=device)]
    torch.cat(parts, out=result)  # same shape: a write, seen by t
    assert torch.equal(t, torch.cat(parts))
    assert (result._version, t._version) == (1, 0 if implementation == "native" else 1)
    torch.cat([result.new_zeros(1, 3), result.new_ones(1, 3)], out=result.resize_(0))
    assert result.shape == (2, 3)
    assert metadata(t) == before


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_record_stream_on_the_result() -> None:
    t = torch.randn(1024, device="cuda")
    result = bridge(t)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        doubled = result * 2
    result.record_stream(stream)
    stream.synchronize()
    assert torch.equal(doubled, t * 2)


# NB: before torch 2.4 a profiler event calls its device memory cuda_memory_usage.
DEVICE_MEMORY = "device_memory_usage" if torch_at_least("2.4") else "cuda_memory_usage"


def test_no_allocation_and_no_kernel(device: str) -> None:
    t = torch.randn(1 << 20, device=device, requires_grad=True) * 1
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities, profile_memory=True) as prof:
        result = bridge(t)
    events = prof.events()
    assert [e.name for e in events if e.cpu_memory_usage or getattr(e, DEVICE_MEMORY)] == []
    assert [e.name for e in events if e.device_type == torch.autograd.DeviceType.CUDA] == []
    # The control: the set_ trick allocates a full copy, and the profiler sees it.
    with profile(activities=activities, profile_memory=True) as prof:
        with torch.no_grad():
            torch.zeros_like(t).set_(t)
    assert sum(max(e.cpu_memory_usage, getattr(e, DEVICE_MEMORY)) for e in prof.events()) >= t.nbytes
    assert_alias(result, t)


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_no_gradient_reaches_t_or_upstream(entry: str, device: str) -> None:
    torch.manual_seed(0)
    model = ABC(ENTRY_POINTS[entry], width=4).to(device)
    reference = ABC(torch.Tensor.detach, width=4).to(device)
    reference.load_state_dict(model.state_dict())
    x = torch.randn(8, 4, device=device)
    for m in (model, reference):
        b, c = m(x)
        c.pow(2).sum().backward()
    for name, p in model.named_parameters():
        if name.startswith("C."):
            assert torch.equal(p.grad, reference.get_parameter(name).grad), name
        else:
            assert p.grad is None, name


def test_gradient_to_t_is_none_not_zeros(device: str) -> None:
    t = torch.randn(5, device=device, requires_grad=True)
    b = t * 3
    w = torch.randn(5, device=device, requires_grad=True)
    (grad_b, grad_w) = torch.autograd.grad((bridge(b) * w).sum(), (b, w), allow_unused=True)
    assert grad_b is None
    assert torch.equal(grad_w, b.detach())
    with pytest.raises(RuntimeError, match="does not require grad"):
        bridge(b).sum().backward()  # exactly as with b.detach()


def test_backward_of_the_function_is_autograds_zero() -> None:
    assert BridgeFunction.backward(None, torch.ones(3)) is None


def test_storage_lives_until_both_are_gone(device: str) -> None:
    t = torch.randn(1000, device=device)
    storage = StorageWeakRef(t.untyped_storage())
    result = bridge(t)
    del t
    assert not storage.expired()
    assert result.sum().isfinite()
    del result
    assert storage.expired()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_memory_returns_to_baseline() -> None:
    torch.cuda.synchronize()
    baseline = torch.cuda.memory_allocated()
    t = torch.empty(1 << 24, device="cuda")
    result = bridge(t)
    assert torch.cuda.memory_allocated() == baseline + t.nbytes
    del t
    assert torch.cuda.memory_allocated() == baseline + result.nbytes
    del result
    assert torch.cuda.memory_allocated() == baseline


def test_meta_and_fake_tensors_trace_shapes() -> None:
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    t = torch.empty(3, 5, device="meta").t()
    result = bridge(t)
    assert result.is_meta and metadata(result) == metadata(t)
    with FakeTensorMode():
        fake = torch.empty(4, 6)[:, 1:]
        result = bridge(fake)
    assert isinstance(result, FakeTensor)
    assert metadata(result) == metadata(fake)


@requires_torch("2.4", "torch.library.opcheck")
@pytest.mark.native_only("the operator itself: the fallback registers none")
def test_opcheck_schema_autograd_and_fake_kernel() -> None:
    # torch 2.5 traces the operator's decomposition above autograd (see test_straight_through.py's test_opcheck).
    t = torch.randn(3, 4, requires_grad=True) * 2
    aot = ("test_aot_dispatch_dynamic",) if torch_at_least("2.6") else ()
    utils = ("test_schema", "test_autograd_registration", "test_faketensor", *aot)
    assert torch.library.opcheck(torch.ops.gradbridge.bridge.default, (t,), test_utils=utils) == dict.fromkeys(
        utils, "SUCCESS"
    )


@pytest.mark.native_only("the operator itself: the fallback registers none")
def test_torchscript_calls_the_operator() -> None:
    @torch.jit.script
    def scripted(t: torch.Tensor) -> torch.Tensor:
        return torch.ops.gradbridge.bridge(t)

    t = torch.randn(3, requires_grad=True) * 2
    result = scripted(t)
    assert_alias(result, t)
    assert_cut(result)


class Tagged(torch.Tensor):
    """A Tensor subclass with torch's default __torch_function__."""


ATTACHED_FORMS = {
    "grad_scale": lambda t: bridge(t, -1.0),
    "attach": lambda t: bridge(t, attach=True),
    "torch.ops grad_scale": lambda t: torch.ops.gradbridge.bridge(t, -1.0),
}


@pytest.mark.parametrize("entry", [*ENTRY_POINTS, *ATTACHED_FORMS])
@pytest.mark.parametrize("kind", ["subclass", "parameter"])
def test_result_type_follows_detach(entry: str, kind: str) -> None:
    t = torch.ones(2).as_subclass(Tagged) if kind == "subclass" else nn.Parameter(torch.ones(2))
    result = {**ENTRY_POINTS, **ATTACHED_FORMS}[entry](t)
    assert type(result) is type(t.detach())
    assert_alias(result, t)
    if entry in ATTACHED_FORMS and kind == "parameter":
        result.sum().backward()
        assert t.grad is None if entry == "attach" else t.grad.tolist() == [-1.0, -1.0]


def test_torch_function_modes_and_fx_see_bridge() -> None:
    seen = []

    class Spy(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            seen.append(func)
            return func(*args, **(kwargs or {}))

    t = torch.ones(3)
    with Spy():
        result = bridge(t)
    assert seen == [bridge]
    assert_alias(result, t)

    def model(x: torch.Tensor) -> torch.Tensor:
        return bridge(x) * 2

    traced = torch.fx.symbolic_trace(model)
    assert [n.target for n in traced.graph.nodes if n.op == "call_function"][0] is bridge
    x = torch.ones(3, requires_grad=True)
    assert not traced(x).requires_grad


@pytest.mark.skipif(
    not hasattr(torch.overrides, "redispatch_function"),
    reason="torch.overrides.redispatch_function is not in this torch",
)
def test_redispatch_and_not_implemented_behave_as_for_torch_functions() -> None:
    class Redispatch(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func is bridge:
                return torch.overrides.redispatch_function(func, types, args, kwargs)
            return func(*args, **(kwargs or {}))

    class LoggingTensor(torch.Tensor):
        @classmethod
        def __torch_function__(cls, func, types, args=(), kwargs=None):
            return torch.overrides.redispatch_function(func, types, args, kwargs)

    t = torch.ones(3)
    with Redispatch():
        assert_alias(bridge(t), t)
    logged = t.as_subclass(LoggingTensor)
    assert_alias(bridge(logged), logged)

    class Refuses(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            return NotImplemented

    with Refuses(), pytest.raises(TypeError, match="no implementation found for .*bridge"):
        bridge(3)


@pytest.mark.native_only("the fast path is the C entry point's")
def test_plain_calls_skip_the_dispatcher_only_when_nothing_would_see_it(device: str) -> None:
    # A Python kernel registered over ours is called only if bridge dispatches.
    # Plain calls skip the dispatcher (it would only reach the same kernel);
    # anything that watches or reroutes dispatch must still see the operator.
    calls: list[str] = []
    lib = torch.library.Library("gradbridge", "IMPL")  # warns that it overrides ours
    try:
        lib.impl("bridge", lambda t: calls.append("dispatched") or t.detach(), device.upper())
        t = torch.ones(3, device=device, requires_grad=True) * 2
        assert_alias(bridge(t), t)
        with torch.inference_mode():
            bridge(t)
        with torch.no_grad():
            bridge(t)
        assert calls == []
        torch.ops.gradbridge.bridge(t)
        assert calls == ["dispatched"]
        with profile(activities=[ProfilerActivity.CPU]):
            bridge(t)
        with torch.autocast(device):
            bridge(t)
        bridge(torch.ones(2, dtype=torch.complex64, device=device).conj())
        assert len(calls) == 4
    finally:
        del lib  # unregisters the Python kernel (torch 2.1 has no Library._destroy)
    calls.clear()
    torch.ops.gradbridge.bridge(t)
    assert calls == []  # our kernel is back


DOCUMENTED = [gradbridge_ext.bridge, gradbridge_ext.BridgeFunction, gradbridge_ext.Bridge, gradbridge_ext.strict]


@pytest.mark.parametrize("documented", DOCUMENTED, ids=lambda f: f.__name__)
def test_docstring_examples_run(documented) -> None:
    flags = doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS
    parser, runner = doctest.DocTestParser(), doctest.DocTestRunner(optionflags=flags)
    test = parser.get_doctest(documented.__doc__, {}, documented.__name__, None, 0)
    assert test.examples
    runner.run(test)
    assert runner.summarize(verbose=False).failed == 0
