"""bridge and straight_through on a device torch does not ship: the test device (tests/testdev).

It plugs in as PrivateUse1, as Ascend's, Intel's HPU and other out-of-tree backends
do, so what passes here passes by the mechanism any such device uses: one
device-generic forward (CompositeExplicitAutograd, as aten::alias and aten::detach
are registered) and an autograd kernel that builds its node for any device.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor

import gradbridge_ext
from gradbridge_ext import Bridge, bridge, straight_through
from helpers import GRAD_SCALE, SETTINGS, SHARES_VERSION, assert_alias, assert_cut, assert_view_only_if_recorded
from independent_layers import ABC, loss  # examples/ is on sys.path (conftest)

pytestmark = pytest.mark.slow  # the test device is compiled first: the full tier


def made_on(device: str, requires_grad: bool = True) -> Tensor:
    """A (2, 3) non-leaf on ``device`` with distinct values, of a leaf that requires grad."""
    leaf = torch.arange(6.0).view(2, 3).to(device).requires_grad_(requires_grad)
    return leaf * 1


@pytest.mark.parametrize("setting", SETTINGS)
def test_every_setting_aliases_and_sends_its_gradient(setting: str, test_device: str) -> None:
    leaf = torch.arange(6.0).view(2, 3).to(test_device).requires_grad_()
    t = leaf * 1
    result = SETTINGS[setting](t)
    assert result.device == t.device
    assert_alias(result, t)
    assert_view_only_if_recorded(result, t)
    if setting in GRAD_SCALE:
        result.sum().backward()
        expected = None if GRAD_SCALE[setting] == 0 else torch.full((2, 3), GRAD_SCALE[setting])
        assert (leaf.grad is None) == (expected is None)
        assert expected is None or (leaf.grad.device == leaf.device and torch.equal(leaf.grad.cpu(), expected))
    else:
        assert_cut(result)


@pytest.mark.parametrize("scale", [torch.tensor(-0.5), torch.tensor([1.0, 0.0, 2.0]), torch.tensor([True, False, True])],
                         ids=["0-dim", "float mask", "bool mask"])  # fmt: skip
@pytest.mark.parametrize("op", ["bridge", "straight_through", "Bridge"])
def test_tensor_scales_on_the_device(op: str, scale: Tensor, test_device: str) -> None:
    x = torch.ones(2, 3, device=test_device, requires_grad=True)
    q = torch.full((2, 3), 4.0, device=test_device)
    s = scale.to(test_device)
    result = {"bridge": lambda: bridge(x, s), "straight_through": lambda: straight_through(x, q, s),
              "Bridge": lambda: Bridge(grad_scale=s)(x)}[op]()  # fmt: skip
    assert_alias(result, q if op == "straight_through" else x)
    result.sum().backward()
    assert torch.equal(x.grad.cpu(), scale.float().expand(2, 3))


def test_a_cpu_scale_of_0_dims_is_read_on_the_host(test_device: str) -> None:
    x = torch.ones(3, device=test_device, requires_grad=True)
    bridge(x * 1, torch.tensor(-2.0)).sum().backward()
    assert x.grad.cpu().tolist() == [-2.0, -2.0, -2.0]


def test_straight_through_gives_q_and_x_the_gradient(test_device: str) -> None:
    w = torch.tensor([0.4, -1.3, 0.1], device=test_device, requires_grad=True)
    q = w.detach().round().clamp(-1, 1)
    y = straight_through(w, q)
    assert_alias(y, q)
    assert y.grad_fn.name() == "StraightThroughBackward"
    (y * torch.tensor([1.0, 2.0, 3.0], device=test_device)).sum().backward()
    assert w.grad.cpu().tolist() == [1.0, 2.0, 3.0]
    assert not straight_through(w.detach(), q).requires_grad  # x needs no grad: a plain alias


@pytest.mark.parametrize("setting", SETTINGS)
def test_version_counters(setting: str, test_device: str) -> None:
    t = made_on(test_device)
    result = SETTINGS[setting](t)
    with torch.no_grad():
        t.add_(1)
    assert (result._version == t._version) == (setting in SHARES_VERSION)


def test_in_place_through_a_reversal_is_refused(test_device: str) -> None:
    reversed_ = bridge(made_on(test_device), -1.0)
    with pytest.raises(RuntimeError, match="is a view and is being modified inplace"):
        reversed_.mul_(2)


def test_named_errors(test_device: str) -> None:
    t = made_on(test_device)
    with pytest.raises(ValueError, match=r"a grad_scale tensor must be on t's device, testdev:0, or be a 0-dim CPU tensor; "
                                         r"got a \[3\] tensor on cpu"):  # fmt: skip
        bridge(t, torch.ones(3))
    with pytest.raises(ValueError, match="grad_scale must be a finite number, got nan"):
        bridge(t, float("nan"))
    with pytest.raises(ValueError, match=r"x and q must be on the same device, got testdev:0 and cpu"):
        straight_through(t, torch.ones(2, 3))
    with pytest.raises(ValueError, match=r"same shape .* got \[2, 3\] and \[3\]"):
        straight_through(t, torch.ones(3, device=test_device))


@pytest.mark.parametrize("mode", [0, 1, 2])
def test_the_readmes_experiment_b_is_bitwise_unchanged_by_cs_loss(mode: int, test_device: str) -> None:
    # examples/independent_layers.py's A -> B -> C with bridge, one SGD step, on the test device
    # against the same step with detach() on the CPU: A and B get no gradient from C's loss.
    torch.manual_seed(0)
    reference = ABC(lambda b: b.detach())
    initial = copy.deepcopy(reference)
    model = copy.deepcopy(reference).to(test_device)
    model.cut = bridge
    x, targets = torch.randn(2), (torch.zeros(2), torch.ones(2))
    for m, device in ((reference, "cpu"), (model, test_device)):
        optimizer = torch.optim.SGD(m.parameters(), lr=1e-2, momentum=0.9)
        b, c = m(x.to(device))
        loss(b, c, tuple(t.to(device) for t in targets), mode).backward()
        optimizer.step()
    for (name, got), expected in zip(model.named_parameters(), reference.parameters(), strict=True):
        assert got.device.type == test_device
        assert torch.equal(got.detach().cpu(), expected.detach()), name
    if mode == 1:  # C's loss only: A and B are bitwise their initial values
        for (name, got), initial in zip(model.named_parameters(), initial.parameters(), strict=True):
            assert torch.equal(got.detach().cpu(), initial.detach()) == (not name.startswith("C")), name


def test_the_cut_costs_no_more_than_detach_on_the_device(test_device: str) -> None:
    # Not a timing: the generic path does what detach() does, one dispatch to one alias kernel.
    t = made_on(test_device)
    with torch.profiler.profile() as prof:
        bridge(t)
    assert [e.name for e in prof.events() if e.name.startswith(("gradbridge", "aten"))] == ["gradbridge::bridge"]
    assert gradbridge_ext.bridge is gradbridge_ext._C.bridge
