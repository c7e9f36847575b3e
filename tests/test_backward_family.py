"""One forward, a family of backwards: grad_scale, attach, the Bridge module and strict mode."""

from __future__ import annotations

import copy
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

import gradbridge_ext
from gradbridge_ext import Bridge, bridge

from conftest import requires_torch, torch_at_least
from helpers import assert_alias, native

# Each test runs on the native operator and on the pure-Python fallback (conftest.implementation).
pytestmark = pytest.mark.usefixtures("implementation")

SCALES = [-1.0, -0.25, 0.5, 1.0, 3]


def upstream(device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A leaf x and B's output b = x * 2 (a non-leaf that requires grad)."""
    x = torch.randn(5, device=device, requires_grad=True)
    return x, x * 2


def grad_of_x(r: torch.Tensor, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor | None:
    (r * weights).sum().backward()
    return x.grad


@pytest.mark.parametrize("grad_scale", SCALES)
def test_scaled_backward_is_grad_scale_times_the_gradient(grad_scale: float, device: str) -> None:
    weights = torch.randn(5, device=device)
    x, b = upstream(device)
    result = bridge(b, grad_scale)
    assert_alias(result, b)
    assert result.requires_grad and result.grad_fn.name() == "BridgeBackward"
    assert result._base is b and result._version == b._version  # a custom Function's view of b
    got = grad_of_x(result, x, weights)
    x_ref, b_ref = upstream(device)
    with torch.no_grad():
        x_ref.copy_(x)
    expected = grad_of_x(b_ref * 1, x_ref, weights) * grad_scale
    torch.testing.assert_close(got, expected)


# Each reference, its module and its layer; both multiply the gradient by -alpha.
REFERENCES = {
    "pytorch-revgrad": ("pytorch_revgrad", "RevGrad"),
    "torch-gradient-reversal": ("gradient_reversal", "GradientReversalLayer"),
}


@pytest.mark.parametrize(
    "reference",
    [
        "pytorch-revgrad",
        pytest.param(
            "torch-gradient-reversal",
            marks=requires_torch("2.7", "torch-gradient-reversal 1.0 requires it"),
        ),
    ],
)
@pytest.mark.parametrize("grad_scale", [-1.0, -0.3, 2.0])
def test_gradient_reversal_matches_the_pypi_references(grad_scale: float, reference: str) -> None:
    # `make test` installs both; a machine without one skips only its cases.
    module, name = REFERENCES[reference]
    Reference = getattr(pytest.importorskip(module), name)
    torch.manual_seed(0)
    trunk, head, x = nn.Linear(4, 4), nn.Linear(4, 3), torch.randn(6, 4)
    grads = []
    for layer in (Bridge(grad_scale=grad_scale), Reference(alpha=-grad_scale)):
        model = copy.deepcopy(nn.Sequential(trunk, layer, head))
        model(x).pow(2).sum().backward()
        grads.append([p.grad for p in model.parameters()])
    for got, expected in zip(*grads, strict=True):
        torch.testing.assert_close(got, expected)
    assert grads[0][0].abs().sum() > 0  # the trunk did receive a gradient


def test_attached_zero_sends_none_and_still_runs_upstream_hooks(device: str) -> None:
    fired = {}
    for attach in (False, True):
        x, b = upstream(device)
        seen = []
        b.grad_fn.register_prehook(lambda grads: seen.append(grads[0]))
        x.register_post_accumulate_grad_hook(lambda p: seen.append(p.grad))
        result = bridge(b, attach=attach)
        assert_alias(result, b)
        assert result.requires_grad is attach
        weights = torch.ones(5, device=device, requires_grad=True)  # C's parameter
        assert grad_of_x(result, x, weights) is None  # None, never zeros
        fired[attach] = seen
    # NB: before torch 2.8 autograd skips post-accumulate-grad hooks for a None
    # gradient, so only B's prehook sees it there: a difference in torch, not bridge.
    upstream_hooks = [None, None] if torch_at_least("2.8") else [None]
    assert fired == {False: [], True: upstream_hooks}


def test_results_of_inputs_that_need_no_grad_stay_out_of_the_graph() -> None:
    t = torch.ones(3)
    for kwargs in ({}, {"grad_scale": -1.0}, {"attach": True}):
        result = bridge(t, **kwargs)
        assert result.grad_fn is None and not result.requires_grad
    with torch.no_grad():
        assert bridge(upstream("cpu")[1], -1.0).grad_fn is None


class FloatFails:
    def __float__(self) -> float:
        raise LookupError("from __float__")


@pytest.mark.parametrize(
    "args, kwargs, error, match",
    [
        ((1.0,), {"attach": False}, ValueError, "attach=False cuts the graph"),
        ((float("nan"),), {}, ValueError, "grad_scale must be a finite number, got nan"),
        ((), {"grad_scale": float("-inf")}, ValueError, "finite number, got -inf"),
        (("1",), {}, TypeError, "'grad_scale' must be a number or a tensor, not str"),
        ((True,), {}, TypeError, r"must be a number or a tensor, not bool \(attach=True is a keyword argument\)"),
        ((10**400,), {}, ValueError, "finite number, got an int too large for a float"),
        ((FloatFails(),), {}, LookupError, "from __float__"),  # the object's own error, as float() lets it through
        ((), {"attach": 1}, TypeError, "'attach' must be a bool or None, not int"),
        ((), {"scale": 1.0}, TypeError, r"^bridge\(\) got an unexpected keyword argument 'scale'"),
        ((1.0,), {"grad_scale": 1.0}, TypeError, r"^bridge\(\) got multiple values for argument 'grad_scale'"),
        ((1.0, True), {}, TypeError, r"^bridge\(\) takes from 1 to 2 positional arguments but 3 were given"),
    ],
)
def test_bad_options_raise_naming_the_argument(args, kwargs, error, match: str) -> None:
    t = torch.ones(2, requires_grad=True)
    with pytest.raises(error, match=match):
        bridge(t, *args, **kwargs)


# The value rules live in the operator, so every entry point states them alike.
@pytest.mark.parametrize(
    "call",
    [
        lambda t: torch.ops.gradbridge.bridge(t, 1.0, False),
        lambda t: torch.ops.gradbridge.bridge(t, grad_scale=-0.5, attach=False),
        lambda t: torch.ops.gradbridge.bridge.Tensor(t, torch.tensor(1.0), False),
        lambda t: bridge(t, 1.0, attach=False),
        lambda t: bridge(t, torch.tensor(1.0), attach=False),
    ],
    ids=["torch.ops", "torch.ops keywords", "torch.ops .Tensor", "bridge", "bridge tensor"],
)
def test_attach_false_with_a_scale_is_refused_by_the_operator(call) -> None:
    with pytest.raises(ValueError, match="^gradbridge::bridge: attach=False cuts the graph, but .* needs it; leave attach out"):
        call(torch.ones(2, requires_grad=True))


@pytest.mark.native_only("the operator itself: the fallback registers none")
def test_the_private_hand_off_refuses_calls_bridge_would_not_make() -> None:
    hand_off = gradbridge_ext._C._bridge_parsed  # what the Python entry calls once it has parsed
    for args in [(1, 2.0, None), (torch.ones(1), "x", None), (torch.ones(1), 1, None), (torch.ones(1), 1.0, 1), (torch.ones(1),)]:
        with pytest.raises(TypeError, match=r"takes what bridge\(\) has parsed"):
            hand_off(*args)


# NB: on some toolchains extension code that streams a double into an iostream
# segfaults (GCC 13.3 with torch 2.11.0+cu130), so no message formats one. Each
# message that carries a number is pinned here whole, for every entry point and
# device: on such a machine, a regression crashes this test, not a user's run.
@pytest.mark.parametrize("scale, shown", [(float("nan"), "nan"), (float("inf"), "inf"), (float("-inf"), "-inf")])
@pytest.mark.parametrize("entry", ["bridge", "keyword", "torch.ops", "Bridge"])
@pytest.mark.parametrize("on", ["device", "meta"])
def test_non_finite_grad_scale_is_named_in_the_message(scale: float, shown: str, entry: str, on: str, device: str) -> None:
    t = torch.ones(2, requires_grad=True, device="meta" if on == "meta" else device)
    call = {
        "bridge": lambda: bridge(t, scale),
        "keyword": lambda: bridge(t, grad_scale=scale),
        "torch.ops": lambda: torch.ops.gradbridge.bridge(t, scale),
        "Bridge": lambda: Bridge(grad_scale=scale)(t),
    }[entry]
    with pytest.raises(ValueError) as error:
        call()
    assert str(error.value).startswith(f"gradbridge::bridge: grad_scale must be a finite number, got {shown}")


def test_messages_with_counts_and_values() -> None:
    t = torch.ones(2)
    with pytest.raises(ValueError) as error:
        bridge(t, 2.5, attach=False)
    assert str(error.value).startswith(
        "gradbridge::bridge: attach=False cuts the graph, but a nonzero grad_scale needs it; leave attach out"
    )
    with pytest.raises(ValueError) as error:
        bridge(t, 10**400)
    assert str(error.value).endswith("grad_scale must be a finite number, got an int too large for a float")


@pytest.mark.parametrize("kwargs", [{"grad_scale": 1.0, "attach": False}, {"grad_scale": float("nan")},
                                    {"grad_scale": "1"}, {"attach": 1}])  # fmt: skip
def test_the_module_checks_its_options_as_bridge_does(kwargs: dict) -> None:
    with pytest.raises((TypeError, ValueError)) as from_bridge:
        bridge(torch.ones(1), **kwargs)
    with pytest.raises(from_bridge.type) as from_module:
        Bridge(**kwargs)
    assert str(from_module.value) == str(from_bridge.value)


def test_numbers_that_are_not_floats_are_accepted_and_t_is_required() -> None:
    x = torch.ones(2, requires_grad=True)
    for scale in (-2, torch.tensor(-2.0), __import__("numpy").float32(-2.0)):
        x.grad = None
        bridge(x * 1, scale).sum().backward()
        assert x.grad.tolist() == [-2.0, -2.0]
    with pytest.raises(TypeError, match=r"^bridge\(\) missing 1 required positional argument: 't'"):
        bridge(grad_scale=1.0)


def test_attached_results_share_the_version_counter_so_inplace_changes_are_caught() -> None:
    x = torch.ones(3, requires_grad=True)
    b = x * 2
    saved = b * torch.ones(3, requires_grad=True)  # mul saves b
    with torch.no_grad():
        reversed_ = bridge(b, -1.0)
    reversed_.relu_()  # made outside the graph, so it may write b's storage
    assert b._version == reversed_._version == 1
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        saved.sum().backward()


@pytest.mark.parametrize("kwargs", [{"grad_scale": -1.0}, {"attach": True}, {"grad_scale": "tensor"}])
@pytest.mark.parametrize("entry", ["bridge", "torch.ops", "Bridge"])
def test_inplace_through_an_attached_result_raises_as_for_a_custom_function_view(entry: str, kwargs: dict) -> None:
    # An in-place op would silently write t and replace bridge's backward; every
    # gradient reversal layer on PyPI gets this same error from autograd.
    if kwargs.get("grad_scale") == "tensor":
        kwargs = {"grad_scale": torch.tensor(-1.0)}
    call = {
        "bridge": lambda t: bridge(t, **kwargs),
        "torch.ops": lambda t: torch.ops.gradbridge.bridge(t, kwargs.get("grad_scale", 0.0), attach=True),
        "Bridge": Bridge(**kwargs),
    }[entry]
    for t in (torch.ones(3, requires_grad=True) * 1, nn.Parameter(torch.ones(3))):
        result = call(t)
        with pytest.raises(RuntimeError, match="Output 0 of Bridge(Backward)? is a view and is being modified inplace"):
            result.relu_()
        assert t.tolist() == [1.0, 1.0, 1.0] and result._version == t._version == 0
    pypi = pytest.importorskip("pytorch_revgrad").RevGrad()(torch.ones(3, requires_grad=True) * 1)
    with pytest.raises(RuntimeError, match="is a view and is being modified inplace"):
        pypi.relu_()


def test_forward_ad_cut_drops_the_tangent_and_attached_forms_refuse() -> None:
    import torch.autograd.forward_ad as fwAD

    with fwAD.dual_level():
        dual = fwAD.make_dual(torch.ones(3), torch.full((3,), 2.0))
        assert fwAD.unpack_dual(bridge(dual)).tangent is None
        assert fwAD.unpack_dual(dual.detach()).tangent is None
        for kwargs in ({"grad_scale": -1.0}, {"attach": True}):
            with pytest.raises(NotImplementedError, match="forward-mode AD is not supported"):
                bridge(dual, **kwargs)


def test_double_backward_through_the_reversal() -> None:
    x = torch.tensor([1.0, 2.0], requires_grad=True)
    y = bridge(x.pow(3), -1.0).sum()
    (g,) = torch.autograd.grad(y, x, create_graph=True)  # -3 x^2
    assert g.tolist() == [-3.0, -12.0]
    (gg,) = torch.autograd.grad(g.sum(), x)  # -6 x
    assert gg.tolist() == [-6.0, -12.0]


@pytest.mark.native_only("the operator itself: the fallback registers none")
def test_every_entry_point_takes_the_options() -> None:
    x = torch.ones(2, requires_grad=True)
    for result in (
        torch.ops.gradbridge.bridge(x * 1, -2.0),
        torch.ops.gradbridge.bridge(x * 1, grad_scale=-2.0, attach=True),
        torch.jit.script(scripted_reversal)(x * 1),
    ):
        x.grad = None
        result.sum().backward()
        assert x.grad.tolist() == [-2.0, -2.0]
    with pytest.raises(ValueError, match="finite"):
        torch.ops.gradbridge.bridge(x, float("inf"))


def scripted_reversal(t: torch.Tensor) -> torch.Tensor:
    return torch.ops.gradbridge.bridge(t, -2.0)


def test_module_forward_repr_and_sequential() -> None:
    assert repr(Bridge()) == "Bridge(cut: no gradient to the input)"
    assert repr(Bridge(grad_scale=-1)) == (
        "Bridge(grad_scale=-1.0: gradient to the input times -1.0, reversed)"
    )
    assert repr(Bridge(attach=True)) == "Bridge(attach=True: in the graph, no gradient to the input)"
    x, b = upstream("cpu")
    model = nn.Sequential(Bridge(grad_scale=0.5), nn.Identity())
    out = model(b)
    assert_alias(out, b)
    out.sum().backward()
    assert x.grad.tolist() == [1.0] * 5  # 0.5 * d(2x)/dx
    assert not Bridge()(b).requires_grad


def saves_through_bridge_then_mutates_t() -> torch.Tensor:
    """C saves bridge(b) for its backward; b then changes in place before backward."""
    b = torch.ones(3, requires_grad=True) * 1
    w = torch.ones(3, requires_grad=True)
    c = bridge(b) * w
    with torch.no_grad():
        b.add_(1)
    c.sum().backward()
    return w.grad


@pytest.mark.native_only("every cut already shares t's version counter, as under strict()")
def test_strict_mode_makes_autograd_catch_the_stale_save() -> None:
    # Outside strict mode the new values are used silently (w.grad = b + 1) ...
    assert saves_through_bridge_then_mutates_t().tolist() == [2.0] * 3
    # ... in strict mode autograd raises, as it does with detach().
    with gradbridge_ext.strict(), pytest.raises(RuntimeError, match="modified by an inplace operation"):
        saves_through_bridge_then_mutates_t()
    b = torch.ones(2, requires_grad=True) * 1
    with gradbridge_ext.strict():
        shared = bridge(b)
        with gradbridge_ext.strict(False):
            own = bridge(b)
    b.data.add_(1)  # .data bumps neither counter; add_ on b does
    with torch.no_grad():
        b.add_(1)
    assert shared._version == b._version == 1 and own._version == 0
    assert_alias(shared, b)
    assert not gradbridge_ext._C._is_strict()


@pytest.mark.parametrize("value, strict", [("1", True), ("0", False), ("", False), ("yes", True)])
@pytest.mark.native_only("reads the native strict flag in a process of its own")
def test_strict_mode_from_the_environment(value: str, strict: bool) -> None:
    env = dict(os.environ, GRADBRIDGE_STRICT=value)
    probe = "import gradbridge_ext; print(gradbridge_ext._C._is_strict())"
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(strict)


def test_strict_mode_refuses_a_value_it_does_not_know() -> None:
    env = dict(os.environ, GRADBRIDGE_STRICT="sometimes")
    out = subprocess.run([sys.executable, "-c", "import gradbridge_ext"], env=env,
                         capture_output=True, text=True)  # fmt: skip
    assert out.returncode != 0 and "GRADBRIDGE_STRICT='sometimes': expected 1 or 0" in out.stderr


def test_a_grad_scale_tensor_scales_by_its_value_at_the_forward(device: str) -> None:
    scale = torch.tensor(-0.5, device=device)
    x = torch.ones(3, device=device, requires_grad=True)
    # torch.ops's overload resolution takes a 0-dim tensor as a float, so the tensor form is named.
    for entry in (lambda t: bridge(t, scale), *native(lambda t: torch.ops.gradbridge.bridge.Tensor(t, scale)), Bridge(grad_scale=scale)):
        x.grad = None
        result = entry(x * 2)
        assert result.grad_fn.name() == "BridgeBackward"
        result.sum().backward()
        assert x.grad.tolist() == [-1.0, -1.0, -1.0]
    with torch.no_grad():
        scale.fill_(3.0)  # a schedule's step between iterations
    x.grad = None
    bridge(x * 2, scale).sum().backward()
    assert x.grad.tolist() == [6.0, 6.0, 6.0]


def test_a_grad_scale_tensor_changed_before_the_backward_raises() -> None:
    scale, x = torch.tensor(-1.0), torch.ones(3, requires_grad=True)
    result = bridge(x * 2, scale)
    scale.fill_(2.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        result.sum().backward()


def test_a_grad_scale_tensor_gets_no_gradient_and_a_zero_one_gives_zeros() -> None:
    scale, x = torch.tensor(0.0, requires_grad=True), torch.ones(3, requires_grad=True)
    bridge(x * 2, scale).sum().backward()
    assert x.grad.tolist() == [0.0, 0.0, 0.0]  # zeros, not None: knowing it is 0 would need a host sync
    assert scale.grad is None  # the forward does not depend on it


def test_a_cpu_grad_scale_tensor_scales_a_gradient_on_any_device(device: str) -> None:
    x = torch.ones(3, device=device, requires_grad=True)
    bridge(x * 1, torch.tensor(-2.0)).sum().backward()
    assert x.grad.tolist() == [-2.0, -2.0, -2.0]


@pytest.mark.parametrize(
    "scale, kwargs, error, match",
    [
        (torch.ones(3), {}, ValueError, r"broadcast to the shape \[2\], got a \[3\] Float tensor"),
        (torch.ones(2, 1), {}, ValueError, r"broadcast to the shape \[2\], got a \[2, 1\] Float tensor"),
        (torch.tensor(1), {}, ValueError, r"must be floating or bool and broadcast to the shape \[2?\], got a \[\] Long tensor"),
        (torch.tensor(1.0), {"attach": False}, ValueError, "attach=False cuts the graph"),
    ],
)
def test_bad_grad_scale_tensors_raise(scale: torch.Tensor, kwargs: dict, error: type, match: str) -> None:
    for call in (lambda: bridge(torch.ones(2), scale, **kwargs), lambda: Bridge(grad_scale=scale, **kwargs)(torch.ones(2))):
        with pytest.raises(error, match=match):
            call()
    if not kwargs:
        for call in native(lambda: torch.ops.gradbridge.bridge.Tensor(torch.ones(2), scale)):
            with pytest.raises(error, match=match):
                call()


@pytest.mark.parametrize(
    "mask",
    [
        torch.tensor([1.0, 0.0, -2.0, 0.5])[:, None],  # per row: an embedding's new rows, say
        torch.tensor([0.0, 1.0, 3.0]),  # per column
        torch.tensor([[True, False, True]]),  # a bool mask: 1 where True
        torch.rand(4, 3),  # every element
    ],
    ids=["rows", "columns", "bool", "full"],
)
def test_a_grad_scale_mask_scales_each_element_and_the_forward_stays_an_alias(mask: torch.Tensor, device: str) -> None:
    mask = mask.to(device)
    t = torch.randn(4, 3, device=device, requires_grad=True)
    upstream = torch.randn(4, 3, device=device)
    for entry in (lambda b: bridge(b, mask), *native(lambda b: torch.ops.gradbridge.bridge.Tensor(b, mask)), Bridge(grad_scale=mask)):
        t.grad = None
        b = t * 1
        result = entry(b)
        assert_alias(result, b)
        (result * upstream).sum().backward()
        assert torch.equal(t.grad, upstream * mask)


def test_a_grad_scale_mask_trains_only_the_rows_it_selects() -> None:
    embedding = torch.nn.Embedding(5, 2)
    new_rows = torch.tensor([False, False, False, True, True])
    ids = torch.tensor([0, 1, 3, 4, 4])
    torch.nn.functional.embedding(ids, bridge(embedding.weight, new_rows[:, None])).sum().backward()
    assert embedding.weight.grad[:3].eq(0).all() and embedding.weight.grad[3:].ne(0).all()


def test_bridge_keeps_a_grad_scale_tensor_as_a_buffer() -> None:
    scale = torch.tensor(-1.0)
    module = Bridge(grad_scale=scale)
    assert module.grad_scale is scale and "grad_scale" in dict(module.named_buffers())
    assert module.to(torch.float64).grad_scale.dtype == torch.float64  # moves with the module


def test_a_row_mask_is_told_to_add_trailing_ones() -> None:
    weight = torch.ones(4, 3, requires_grad=True)
    with pytest.raises(ValueError, match=r"got a \[4\] Float tensor; for a mask of its leading dimensions, add trailing ones: grad_scale\[:, None\]"):
        bridge(weight, torch.ones(4))
    with pytest.raises(ValueError, match=r"got a \[3, 1\] Float tensor$"):  # not t's leading sizes: no hint
        bridge(weight, torch.ones(3, 1))
