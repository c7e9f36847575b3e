"""bridge inside the PyTorch stack: torch.compile, torch.func, opcheck."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.func as tf
from torch import nn

import gradbridge_ext
from conftest import requires_torch
from gradbridge_ext import Bridge, bridge

# Every setting, as a function and as a module.
SETTINGS = [
    lambda b: bridge(b),
    lambda b: bridge(b, -1.0),
    lambda b: bridge(b, 0.5),
    lambda b: bridge(b, attach=True),
    Bridge(),
    Bridge(grad_scale=-2.0),
]


class EverySetting(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.B, self.heads = nn.Linear(4, 4), nn.ModuleList(nn.Linear(4, 2) for _ in SETTINGS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self.B(x)
        return sum(head(cut(b)).pow(2).sum() for head, cut in zip(self.heads, SETTINGS)) + b.sum()


@requires_torch("2.5", "torch.compiler.substitute_in_graph, without which bridge breaks the graph")
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compile_fullgraph_matches_eager(backend: str, device: str) -> None:
    torch.manual_seed(0)
    eager = EverySetting().to(device)
    compiled_model = copy.deepcopy(eager)
    x = torch.randn(8, 4, device=device)
    torch._dynamo.reset()
    compiled = torch.compile(compiled_model, fullgraph=True, backend=backend)  # breaks would raise
    for model, forward in ((eager, eager), (compiled_model, compiled)):
        loss = forward(x)
        loss.backward()
        model.loss = loss.detach()
    torch.testing.assert_close(compiled_model.loss, eager.loss)
    for (name, got), expected in zip(compiled_model.named_parameters(), eager.parameters()):
        torch.testing.assert_close(got.grad, expected.grad, msg=name)


def test_compile_leaves_the_eager_call_alone() -> None:
    assert gradbridge_ext.bridge is gradbridge_ext._C.bridge  # no Python wrapper was added


def test_func_grad_through_every_setting() -> None:
    x = torch.randn(3)
    # d/dx sum(bridge(x) * x) = bridge(x) when cut or attached with zero.
    for kwargs in ({}, {"attach": True}):
        torch.testing.assert_close(tf.grad(lambda x: (bridge(x, **kwargs) * x).sum())(x), x)
    torch.testing.assert_close(tf.grad(lambda x: bridge(x, -3.0).sum())(x), torch.full((3,), -3.0))


@requires_torch("2.5", "torch.library.register_vmap, bridge's rule for vmap")
def test_vmap_and_per_sample_gradients() -> None:
    x, w = torch.randn(4, 3), torch.randn(3)
    assert torch.equal(tf.vmap(bridge)(x), x)
    assert torch.equal(tf.vmap(lambda t: bridge(t, -1.0) * 2)(x), x * 2)

    def loss(w: torch.Tensor, xi: torch.Tensor) -> torch.Tensor:
        return bridge(w * xi, -1.0).sum() + (bridge(w * xi) * w).sum()

    per_sample = tf.vmap(tf.grad(loss), in_dims=(None, 0))(w, x)
    torch.testing.assert_close(per_sample, torch.stack([tf.grad(loss)(w, xi) for xi in x]))
    torch.testing.assert_close(per_sample, -x + w * x)


@requires_torch("2.4", "torch.library.opcheck")
@pytest.mark.parametrize("args", [(-1.0, False), (0.0, True), (0.25, True)])
def test_opcheck_the_attached_forms(args: tuple[float, bool]) -> None:
    # aot_dispatch does not apply: functionalization refuses custom ops whose
    # output aliases an input; torch.compile uses the stand-in in _transforms.
    t = torch.randn(3, requires_grad=True) * 1
    torch.library.opcheck(
        torch.ops.gradbridge.bridge.default, (t, *args),
        test_utils=("test_schema", "test_autograd_registration", "test_faketensor"),
    )  # fmt: skip
