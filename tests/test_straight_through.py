"""straight_through(x, q): q's values, exactly, as an alias; x's gradient, as `x + (q - x).detach()` gives it."""

from __future__ import annotations

import contextlib
import inspect
import re
from pathlib import Path

import pytest
import torch
import torch.func as tf
from torch import Tensor, nn

import gradbridge_ext
from conftest import requires_torch, torch_at_least
from gradbridge_ext import Bridge, bridge, straight_through
from helpers import TernaryLinear, assert_alias, native, ternary, unsupported_kinds, unsupported_tensors

# Each test runs on the native operator and on the pure-Python fallback (conftest.implementation).
pytestmark = pytest.mark.usefixtures("implementation")

FLOATING = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


def trick(x: Tensor, q: Tensor, grad_scale: float = 1.0) -> Tensor:
    """What users write today (vector-quantize-pytorch's straight_through, F.gumbel_softmax(hard=True))."""
    return x * grad_scale + (q - x * grad_scale).detach()


# Every way to ask for the STE, with the gradient each sends to x per unit of incoming gradient.
SETTINGS = {
    "straight_through": (lambda x, q: straight_through(x, q), 1.0),  # looked up when called (helpers.SETTINGS)
    "torch.ops": (lambda x, q: torch.ops.gradbridge.straight_through(x, q), 1.0),
    "grad_scale": (lambda x, q: straight_through(x, q, -0.5), -0.5),
    "grad_scale keyword": (lambda x, q: straight_through(x, q, grad_scale=2.0), 2.0),
    "tensor grad_scale": (lambda x, q: straight_through(x, q, torch.tensor(0.25)), 0.25),
    "torch.ops tensor": (lambda x, q: torch.ops.gradbridge.straight_through.Tensor(x, q, torch.tensor(3.0)), 3.0),
}


@pytest.mark.parametrize("dtype", FLOATING)
@pytest.mark.parametrize("setting", SETTINGS)
def test_values_are_q_bitwise_and_the_gradient_is_the_tricks(setting: str, dtype: torch.dtype, device: str) -> None:
    entry, scale = SETTINGS[setting]
    torch.manual_seed(0)
    w = torch.randn(64, 32, device=device, dtype=dtype, requires_grad=True)
    q = ternary(w.detach())
    upstream = torch.randn(64, 32, device=device, dtype=dtype)
    result = entry(w, q)
    assert_alias(result, q)  # q itself: no copy, no allocation
    assert result.grad_fn.name() == "StraightThroughBackward"
    (result * upstream).sum().backward()
    assert torch.equal(w.grad, upstream * scale)
    reference = w.detach().clone().requires_grad_()
    (trick(reference, q, scale) * upstream).sum().backward()
    torch.testing.assert_close(w.grad, reference.grad)


@pytest.mark.parametrize("dtype", FLOATING)
def test_the_values_stay_on_the_grid_where_the_tricks_may_not(dtype: torch.dtype) -> None:
    # Why the operator exists: x + (q - x) rounds twice, so its values need not be q
    # (here in float16: 7 distinct values, 7% of the elements off the grid).
    torch.manual_seed(0)
    w = torch.randn(256, 256, dtype=dtype, requires_grad=True)
    q = ternary(w.detach())
    def distinct(t: Tensor) -> int:
        return len(set(t.flatten().tolist()))  # -0.0 == 0.0 (torch 2.1's unique() tells them apart)

    assert torch.equal(straight_through(w, q), q) and distinct(straight_through(w, q)) == 3
    if dtype == torch.float16:
        assert distinct(trick(w, q)) > 3


def test_q_gets_no_gradient_even_when_it_requires_one() -> None:
    x = torch.randn(5, requires_grad=True)
    codebook = torch.randn(3, requires_grad=True)
    q = codebook[torch.tensor([0, 2, 1, 1, 0])]  # a VQ lookup: q is in codebook's graph
    straight_through(x, q).sum().backward()
    assert codebook.grad is None and torch.equal(x.grad, torch.ones(5))


def test_a_zero_grad_scale_sends_autograd_zero() -> None:
    x = torch.randn(3, requires_grad=True)
    (grad,) = torch.autograd.grad(straight_through(x, x.detach().round(), 0.0).sum(), x, allow_unused=True)
    assert grad is None


def test_a_mask_scales_each_element(device: str) -> None:
    x = torch.randn(4, 3, device=device, requires_grad=True)
    mask = torch.tensor([True, False, True], device=device)
    straight_through(x, x.detach().round(), mask).sum().backward()
    assert torch.equal(x.grad, mask.expand(4, 3).float())


def test_dtypes_may_differ_the_result_is_qs_and_the_gradient_xs() -> None:
    x = torch.randn(8, requires_grad=True)
    q = x.detach().to(torch.bfloat16).round()
    result = straight_through(x, q)
    assert result.dtype == torch.bfloat16 and result.data_ptr() == q.data_ptr()
    result.float().sum().backward()
    assert x.grad.dtype == torch.float32 and torch.equal(x.grad, torch.ones(8))


@pytest.mark.parametrize("why", ["x needs no grad", "no_grad", "inference_mode"])
def test_unrecorded_results_are_plain_aliases_that_need_no_grad(why: str) -> None:
    x = torch.randn(4, requires_grad=why != "x needs no grad")
    q = x.detach().round()
    mode = {"no_grad": torch.no_grad(), "inference_mode": torch.inference_mode()}.get(why)
    if mode is None:
        result = straight_through(x, q)
    else:
        with mode:
            result = straight_through(x, q)
    assert_alias(result, q)
    assert not result.requires_grad and result.grad_fn is None and result._base is None


def test_the_result_shares_qs_version_counter() -> None:
    x = torch.randn(4, requires_grad=True)
    q = x.detach().round()
    result = straight_through(x, q)
    q.add_(1)
    assert result._version == q._version == 1
    with pytest.raises(RuntimeError, match="modified"):  # autograd sees q changed under the recorded result
        (result * result).sum().backward()


def test_in_place_on_a_recorded_result_is_refused_not_written_into_q() -> None:
    x = torch.randn(4, requires_grad=True)
    q = x.detach().round()
    before = q.clone()
    with pytest.raises(RuntimeError, match="is a view and is being modified inplace"):
        straight_through(x, q).mul_(2)
    assert torch.equal(q, before)


def test_meta_tensors_give_shapes(device: str) -> None:
    x = torch.empty(2, 3, device="meta", requires_grad=True)
    result = straight_through(x, torch.empty(2, 3, device="meta", dtype=torch.bfloat16))
    assert result.shape == (2, 3) and result.dtype == torch.bfloat16 and result.requires_grad


@pytest.mark.parametrize(
    "x, q, args, error, match",
    [
        (torch.ones(3), torch.ones(2), (), ValueError, r"same shape \(no broadcasting.*got \[3\] and \[2\]"),
        (torch.ones(3, 1), torch.ones(3), (), ValueError, r"same shape"),
        (torch.ones(3), torch.ones(3, device="meta"), (), ValueError, "same device, got cpu and meta"),
        (torch.ones(3), torch.ones(3, dtype=torch.long), (), TypeError, "both be floating.*got Float and Long"),
        (torch.ones(3, dtype=torch.int32), torch.ones(3), (), TypeError, "both be floating"),
        (torch.ones(3), torch.ones(3), (float("nan"),), ValueError, "finite number, got nan"),
        (torch.ones(3), torch.ones(3), (float("-inf"),), ValueError, "finite number, got -inf"),
        (torch.ones(3), torch.ones(3), (torch.ones(2),), ValueError, r"broadcast to the shape \[3\], got a \[2\]"),
        (torch.ones(3), torch.ones(3), (torch.tensor(1),), ValueError, "floating or bool"),
    ],
)
def test_bad_arguments_raise_by_name(x: Tensor, q: Tensor, args: tuple, error: type, match: str) -> None:
    # torch.ops's overload resolution takes a 0-dim tensor as a float, so the tensor form is named.
    overload = "Tensor" if args and isinstance(args[0], Tensor) else "default"
    for entry in (straight_through, *native(lambda *a: getattr(torch.ops.gradbridge.straight_through, overload)(*a))):
        with pytest.raises(error, match=match):
            entry(x.requires_grad_(x.is_floating_point()), q, *args)


@pytest.mark.parametrize(
    "args, match",
    [
        ((1.0, torch.ones(2)), "argument 'x' must be a torch.Tensor, not float"),
        ((torch.ones(2), None), "argument 'q' must be a torch.Tensor, not NoneType"),
        ((torch.ones(2), torch.ones(2), "1"), "argument 'grad_scale' must be a number or a tensor, not str"),
        ((torch.ones(2), torch.ones(2), True), "argument 'grad_scale' must be a number or a tensor, not bool"),
        ((torch.ones(2),), "missing 1 required positional argument: 'q'"),
    ],
)
def test_bad_types_raise_type_error(args: tuple, match: str) -> None:
    with pytest.raises(TypeError, match=match):
        straight_through(*args)


def test_forward_mode_ad_is_refused() -> None:
    import torch.autograd.forward_ad as fwad

    with fwad.dual_level():
        x = fwad.make_dual(torch.randn(3), torch.ones(3))
        with pytest.raises(NotImplementedError, match="forward-mode AD is not supported"):
            straight_through(x, torch.zeros(3))


def test_a_torch_function_subclass_sees_the_call() -> None:
    seen = []

    class Logged(Tensor):
        @classmethod
        def __torch_function__(cls, func, types, args=(), kwargs=None):
            seen.append(func)
            return super().__torch_function__(func, types, args, kwargs or {})

    x = torch.randn(3, requires_grad=True).as_subclass(Logged)
    result = straight_through(x, torch.zeros(3), 0.5)
    assert seen[0] is straight_through and isinstance(result, Logged)


# --- the stack


def train(model: nn.Module, forward, steps: int = 4) -> list[Tensor]:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    torch.manual_seed(1)
    for _ in range(steps):
        optimizer.zero_grad()
        forward(torch.randn(8, 6)).pow(2).mean().backward()
        optimizer.step()
    return [p.detach().clone() for p in model.parameters()]


@requires_torch("2.5", "torch.compiler.substitute_in_graph, without which straight_through breaks the graph")
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compile_fullgraph_matches_eager_and_follows_a_grad_scale_schedule(backend: str) -> None:
    def forward(x: Tensor, w: Tensor, scale: float) -> Tensor:
        return straight_through(w, ternary(w.detach()), scale) @ x

    compiled = torch.compile(forward, fullgraph=True, backend=backend)  # a graph break would raise
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    torch.manual_seed(0)
    w, x = torch.randn(4, 6, requires_grad=True), torch.randn(6, 3)
    for scale in (1.0, 0.5, -0.25, 2.0):
        grads = []
        for f in (forward, compiled):
            w.grad = None
            out = f(x, w, scale)
            out.pow(2).sum().backward()
            grads.append((out.detach(), w.grad))
        torch.testing.assert_close(grads[1], grads[0])
    # One graph, and one more at most: automatic dynamic recompiles once when the float first changes
    # (a torch that specializes floats, 2.5 and older, compiles one per value).
    if not getattr(torch._dynamo.config, "specialize_float", True):
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] <= 2


@requires_torch("2.5", "torch.compiler.substitute_in_graph, without which straight_through breaks the graph")
def test_compile_trains_a_bit_linear_as_eager_does() -> None:
    torch.manual_seed(0)
    eager = nn.Sequential(TernaryLinear(6, 8), nn.ReLU(), TernaryLinear(8, 2))
    compiled = type(eager)(*[type(m)(m.in_features, m.out_features) if hasattr(m, "in_features") else m for m in eager])
    compiled.load_state_dict(eager.state_dict())
    torch._dynamo.reset()
    got = train(compiled, torch.compile(compiled, fullgraph=True, backend="aot_eager"))
    for g, e in zip(got, train(eager, eager)):
        torch.testing.assert_close(g, e)


@requires_torch("2.5", "torch.library.register_vmap, straight_through's rule for vmap")
def test_vmap_and_func_grad() -> None:
    x = torch.randn(4, 3)
    q = x.round()
    assert torch.equal(tf.vmap(straight_through)(x, q), q)
    assert torch.equal(tf.vmap(straight_through, in_dims=(1, 1), out_dims=1)(x, q), q)
    assert torch.equal(tf.vmap(straight_through, in_dims=(0, None))(x, q[0]), q[0].expand(4, 3))
    per_sample = tf.vmap(tf.grad(lambda xi, qi: (straight_through(xi, qi, -2.0) * qi).sum()))(x, q)
    assert torch.equal(per_sample, -2.0 * q)


# NB: torch 2.5.1's export decomposes the operator while it traces (seen in CI's matrix).
@requires_torch("2.6", "torch.export that keeps a custom operator in the graph it captures")
@pytest.mark.native_only("torch.export keeps a backward only through the operator; the fallback refuses (test_fallback.py)")
def test_export_keeps_the_operator_and_decomposes_it_to_q(tmp_path: Path) -> None:
    model = nn.Sequential(TernaryLinear(6, 4))
    x = torch.randn(3, 6)
    program = torch.export.export(model, (x,))
    assert "gradbridge.straight_through" in str(program.graph)
    decomposed = program.run_decompositions()
    assert "gradbridge" not in str(decomposed.graph)
    torch.testing.assert_close(decomposed.module()(x), model(x))
    torch.export.save(program, tmp_path / "model.pt2")
    torch.testing.assert_close(torch.export.load(tmp_path / "model.pt2").module()(x), model(x))


class Rounded(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return straight_through(x, x.round()) * 2


@requires_torch("2.5", "torch.onnx.export(dynamo=True)")
def test_onnx_export_gives_q_and_onnxruntime_matches_eager(tmp_path: Path) -> None:
    pytest.importorskip("onnxscript", reason="ONNX export needs onnx and onnxscript (pip install .[test])")
    onnxruntime = pytest.importorskip("onnxruntime", reason="needs onnxruntime (pip install .[test])")
    x = torch.randn(3, 4) * 3
    program = torch.onnx.export(Rounded(), (x,), dynamo=True, verbose=False)
    program.save(tmp_path / "model.onnx")
    session = onnxruntime.InferenceSession(tmp_path / "model.onnx")
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    assert torch.equal(torch.from_numpy(got), x.round() * 2)


@pytest.mark.native_only("the TorchScript-based ONNX exporter traces the fallback's alias as nothing: q itself")
def test_torchscript_onnx_exporter_writes_an_identity_of_q(tmp_path: Path) -> None:
    onnx = pytest.importorskip("onnx", reason="needs onnx (pip install .[test])")
    onnxruntime = pytest.importorskip("onnxruntime", reason="needs onnxruntime (pip install .[test])")
    x = torch.randn(3, 4) * 3
    # dynamo=False picks the TorchScript-based exporter, the only one before torch 2.5 (which has no such argument).
    legacy = {"dynamo": False} if "dynamo" in inspect.signature(torch.onnx.export).parameters else {}
    torch.onnx.export(Rounded(), (x,), str(tmp_path / "model.onnx"), **legacy)
    assert "Identity" in [node.op_type for node in onnx.load(str(tmp_path / "model.onnx")).graph.node]
    session = onnxruntime.InferenceSession(str(tmp_path / "model.onnx"))
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    assert torch.equal(torch.from_numpy(got), x.round() * 2)


@pytest.mark.native_only("the operator itself: the fallback registers none")
def test_torchscript_calls_the_operator() -> None:
    @torch.jit.script
    def scripted(x: Tensor, q: Tensor, scale: float) -> Tensor:
        return torch.ops.gradbridge.straight_through(x, q, scale)

    x = torch.randn(3, requires_grad=True)
    q = x.detach().round()
    result = scripted(x, q, -1.0)
    assert torch.equal(result, q)
    result.sum().backward()
    assert torch.equal(x.grad, -torch.ones(3))


@requires_torch("2.4", "torch.library.opcheck")
@pytest.mark.parametrize("scale", [1.0, -0.5, "tensor"])
@pytest.mark.native_only("the operator itself: the fallback registers none")
def test_opcheck(scale: float | str) -> None:
    x = torch.randn(3, 4, requires_grad=True)
    args = (x, x.detach().round(), torch.tensor(0.5) if scale == "tensor" else scale)
    op = torch.ops.gradbridge.straight_through.Tensor if scale == "tensor" else torch.ops.gradbridge.straight_through.default
    # torch 2.5 traces the operator's decomposition (an alias) above autograd, whose gradient is not the
    # operator's, so gradbridge refuses that trace (_operator.py, _refuse_to_drop_the_backward). The
    # autograd-registration check passes with q needing a gradient too (q gets none, as the schema allows).
    newer = ("test_autograd_registration", "test_aot_dispatch_dynamic") if torch_at_least("2.6") else ()
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor", *newer))


@pytest.mark.native_only("the fallback's public names are Python functions")
def test_the_public_name_is_the_compiled_entry() -> None:
    assert gradbridge_ext.straight_through is gradbridge_ext._C.straight_through
    assert straight_through.__text_signature__ == "(x, q, /, grad_scale=1.0)"


@pytest.mark.native_only("the operator itself: the fallback registers none")
def test_the_private_hand_off_refuses_calls_straight_through_would_not_make() -> None:
    hand_off = gradbridge_ext._C._straight_through_parsed  # what the Python entry calls once it has parsed
    x = torch.ones(1)
    for args in [(1, x, 1.0), (x, None, 1.0), (x, x, "1"), (x, x, 1), (x, x)]:
        with pytest.raises(TypeError, match=r"takes what straight_through\(\) has parsed"):
            hand_off(*args)


# NB: no message may stream a number (NOTE [No message streams a number], csrc/rules.cpp): each that
# carries one is pinned whole, on CPU and CUDA, so that such a regression crashes here.
def test_messages_with_shapes_and_devices_are_whole(device: str) -> None:
    x = torch.ones(2, 3, device=device)
    with pytest.raises(ValueError, match=r"^gradbridge::straight_through\(x, q\): x and q must have the same shape .* got \[2, 3\] and \[3\]$"):
        straight_through(x, torch.ones(3, device=device))
    with pytest.raises(ValueError, match=rf"^gradbridge::straight_through\(x, q\): x and q must be on the same device, got {x.device} and meta$"):
        straight_through(x, torch.ones(2, 3, device="meta"))
    with pytest.raises(ValueError, match=r"broadcast to the shape \[2, 3\], got a \[4, 1\] Float tensor$"):
        straight_through(x, x, torch.ones(4, 1, device=device))


# --- what the call refuses at once, naming straight_through


@pytest.mark.filterwarnings("ignore::UserWarning")  # quantized and nested tensors warn on creation
@pytest.mark.parametrize("which", ["x", "q"])
@pytest.mark.parametrize("kind", unsupported_kinds())
def test_layouts_without_one_storage_are_refused_by_name(kind: str, which: str) -> None:
    odd = unsupported_tensors()[kind]
    dense = torch.zeros(4, 4)
    x, q = (odd, dense) if which == "x" else (dense, odd)
    given = "a nested tensor" if kind.startswith("nested") else "a quantized tensor" if kind == "quantized" else f"a tensor with layout {kind.split()[0]}"
    message = (rf"^gradbridge::straight_through\(x, q\): {which} must be a dense strided tensor, so that there is one "
               rf"storage to alias; got {re.escape(given)}\. Use x \+ \(q - x\)\.detach\(\) for it\.")  # fmt: skip
    for call in (straight_through, *native(lambda *a: torch.ops.gradbridge.straight_through(*a))):
        with pytest.raises(NotImplementedError, match=message):
            call(x, q)
        with pytest.raises(NotImplementedError, match=message):
            call(x, q, torch.tensor(0.5))


def other_devices() -> list:
    """(the tensor's device, a mask's other device): meta everywhere, CPU and CUDA where torch sees a GPU."""
    cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
    return [("meta", "cpu"), pytest.param("cuda", "cpu", marks=cuda), pytest.param("cpu", "cuda", marks=cuda)]


@pytest.mark.parametrize(("device", "mask_device"), other_devices())
def test_a_mask_on_another_device_is_refused_at_the_call(device: str, mask_device: str) -> None:
    x = torch.ones(2, 3, device=device, requires_grad=True)
    q = torch.zeros(2, 3, device=device)
    mask = torch.tensor([1.0, 0.0, 2.0], device=mask_device)
    expected = rf"{{}}: a grad_scale tensor must be on {{}}'s device, {x.device}, or be a 0-dim CPU tensor; got a \[3\] tensor on {mask.device}$"
    calls = {
        ("bridge", "t"): [lambda: bridge(x, mask), *native(lambda: torch.ops.gradbridge.bridge(x, mask)), lambda: Bridge(grad_scale=mask)(x)],
        ("straight_through", "x"): [lambda: straight_through(x, q, mask), *native(lambda: torch.ops.gradbridge.straight_through(x, q, mask))],
    }
    for (op, name), entries in calls.items():
        for call in entries:
            with pytest.raises(ValueError, match=expected.format(f"^gradbridge::{op}", name)):
                call()
    # A 0-dim CPU scale is read on the host by any device's multiply: still accepted.
    scale = torch.tensor(-2.0)
    assert bridge(x, scale).requires_grad and straight_through(x, q, scale).requires_grad


@pytest.mark.parametrize("mask", [torch.tensor([1.0, 0.0, 2.0]), torch.tensor([True, False, True])], ids=["float", "bool"])
def test_a_mask_passes_through_torch_function_modes_and_subclasses(mask: Tensor) -> None:
    class Tagged(Tensor):
        pass

    expected = [mask.float().tolist()] * 2
    for enter, wrap in ((lambda: torch.device("cpu"), lambda t: t), (contextlib.nullcontext, lambda t: t.as_subclass(Tagged))):
        x = torch.ones(2, 3, requires_grad=True)
        with enter():
            result = straight_through(wrap(x), torch.zeros(2, 3), mask)
        result.sum().backward()
        assert x.grad.tolist() == expected


@pytest.mark.filterwarnings("ignore::UserWarning")  # quantized and nested tensors warn on creation
@pytest.mark.parametrize("kind", unsupported_kinds())
def test_a_grad_scale_with_no_plain_shape_or_storage_is_refused_by_name(kind: str) -> None:
    scale = unsupported_tensors()[kind]
    t = torch.ones(4, 4, requires_grad=True)
    calls = {"bridge": [lambda: bridge(t, scale), lambda: Bridge(grad_scale=scale)],
             "straight_through": [lambda: straight_through(t, t.detach(), scale)]}  # fmt: skip
    for op, entries in calls.items():
        for call in entries:
            with pytest.raises(ValueError, match=rf"^gradbridge::{op}: a grad_scale tensor must be a dense strided tensor, got a "):
                call()
