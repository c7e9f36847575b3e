"""bridge inside the PyTorch stack: torch.compile, torch.func, opcheck."""

from __future__ import annotations

import copy
import math
import subprocess
import sys

import pytest
import torch
import torch.func as tf
from torch import nn

import gradbridge_ext
from conftest import requires_torch, tiered, torch_at_least
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
@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
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
@pytest.mark.parametrize("args", [(-1.0, None), (0.0, True), (0.25, True)])
def test_opcheck_the_attached_forms(args: tuple[float, bool]) -> None:
    # torch.compile itself traces the stand-in in gradbridge_ext/_compile.py; aot_dispatch checks the
    # operator's decomposition, from torch 2.6 (2.5 traces it above autograd, which the operator refuses).
    t = torch.randn(3, requires_grad=True) * 1
    aot = ("test_aot_dispatch_dynamic",) if torch_at_least("2.6") else ()
    torch.library.opcheck(
        torch.ops.gradbridge.bridge.default, (t, *args),
        test_utils=("test_schema", "test_autograd_registration", "test_faketensor", *aot),
    )  # fmt: skip


# A lambda schedule as DANN ramps it: a new grad_scale every step.
SCHEDULE = [-(2 / (1 + math.exp(-10 * step / 100)) - 1) - 0.01 for step in range(100)]


class ScheduledHeads(nn.Module):
    """Every way to feed a schedule: a float argument, a module attribute, a tensor buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.B = nn.Linear(4, 4)
        self.heads = nn.ModuleList(nn.Linear(4, 2) for _ in range(5))
        self.by_attribute = Bridge(grad_scale=-1.0)
        self.by_tensor = Bridge(grad_scale=torch.tensor(-1.0))
        self.cut, self.attached = Bridge(), Bridge(attach=True)

    def forward(self, x: torch.Tensor, grad_scale: float) -> torch.Tensor:
        b = self.B(x)
        cuts = (lambda b: bridge(b, grad_scale), self.by_attribute, self.by_tensor, self.cut, self.attached)
        # tanh keeps the reversed heads, which push B to grow their losses, bounded over 100 steps.
        return sum(head(cut(b)).tanh().sum() for head, cut in zip(self.heads, cuts)) + b.tanh().sum()


def train_on_schedule(model: ScheduledHeads, forward, device: str) -> list[torch.Tensor]:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    torch.manual_seed(1)
    for grad_scale in SCHEDULE:
        model.by_attribute.grad_scale = grad_scale
        model.by_tensor.grad_scale.fill_(grad_scale)
        optimizer.zero_grad()
        forward(torch.randn(8, 4, device=device), grad_scale).backward()
        optimizer.step()
    return [p.detach() for p in model.parameters()]


@requires_torch("2.5", "torch.compiler.substitute_in_graph, without which bridge breaks the graph")
@tiered("backend, dynamic", [(b, d) for b in ["aot_eager", "inductor"] for d in [None, True]], lambda b, d: (b, d) == ("aot_eager", None))
def test_compile_follows_a_schedule_with_at_most_one_recompile(backend: str, dynamic: bool | None, device: str) -> None:
    torch.manual_seed(0)
    eager = ScheduledHeads().to(device)
    compiled_model = copy.deepcopy(eager)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = torch.compile(compiled_model, fullgraph=True, backend=backend, dynamic=dynamic)  # breaks would raise
    expected = train_on_schedule(eager, eager, device)
    got = train_on_schedule(compiled_model, compiled, device)
    # One graph, and one more at most: automatic dynamic recompiles once when the float first changes.
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] <= 2
    assert all(e.isfinite().all() for e in expected)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e)


@requires_torch("2.5", "torch.compiler.substitute_in_graph, without which bridge breaks the graph")
def test_compile_static_specializes_floats_so_a_tensor_schedule_is_the_one_for_it() -> None:
    # dynamic=False makes dynamo guard on every Python float's value: a float
    # schedule recompiles each step (documented), a tensor grad_scale never does.
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    scale = torch.tensor(-1.0)
    model = nn.Sequential(nn.Linear(4, 4), Bridge(grad_scale=scale), nn.Linear(4, 2))
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager", dynamic=False)
    for value in SCHEDULE[:20]:
        scale.fill_(value)
        compiled(torch.randn(3, 4)).sum().backward()
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1


@requires_torch("2.5", "torch.compiler.substitute_in_graph, without which bridge breaks the graph")
def test_compile_refuses_a_constant_non_finite_grad_scale() -> None:
    compiled = torch.compile(lambda t, s: bridge(t * 2, s), backend="aot_eager")  # a break runs it eagerly
    for bad in (float("nan"), float("inf")):
        torch._dynamo.reset()
        with pytest.raises(ValueError, match="grad_scale must be a finite number"):
            compiled(torch.ones(2, requires_grad=True), bad)


@requires_torch("2.5", "torch.compiler.substitute_in_graph, without which bridge breaks the graph")
def test_the_cut_compiles_to_detach() -> None:
    graphs: list[torch.fx.GraphModule] = []

    def record(gm: torch.fx.GraphModule, example_inputs: list) -> torch.fx.GraphModule:
        graphs.append(gm)
        return gm

    torch._dynamo.reset()
    torch.compile(lambda t: bridge(t), backend=record, fullgraph=True)(torch.ones(2))
    targets = [node.target for node in graphs[0].graph.nodes if node.op in ("call_function", "call_method")]
    assert targets == ["detach"]  # no copy, no kernel: a view op


@requires_torch("2.5", "torch.library.register_vmap, bridge's rule for vmap")
@pytest.mark.parametrize("options", [{}, {"grad_scale": -1.0}, {"attach": True}, {"grad_scale": "mask"}], ids=str)
def test_a_bridge_module_is_built_inside_compiled_code(options: dict) -> None:
    # Its constructor checks the options with the rules, not by calling the operator on a
    # tensor that requires grad, which dynamo refuses to create under fullgraph (a graph
    # break without it, whose warning named gradbridge "a third-party C/C++ Python extension").
    if options.get("grad_scale") == "mask":
        options = {"grad_scale": torch.tensor([1.0, 0.0, -1.0])}

    def f(x: torch.Tensor) -> torch.Tensor:
        return (Bridge(**options)(x * 2) * torch.arange(3.0)).sum() + x.sum()  # + x: a loss in every setting

    x = torch.ones(3, requires_grad=True)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")  # a graph break raises
    assert torch.equal(torch.autograd.grad(compiled(x), x)[0], torch.autograd.grad(f(x), x)[0])


def test_vmap_with_a_grad_scale_tensor() -> None:
    x, scale = torch.randn(4, 3), torch.tensor(-2.0)
    assert torch.equal(tf.vmap(lambda t: bridge(t, scale))(x), x)
    per_sample = tf.vmap(tf.grad(lambda xi: bridge(xi, scale).sum()))(x)
    assert torch.equal(per_sample, torch.full_like(x, -2.0))
    with pytest.raises(ValueError, match="must be the same for the whole batch"):
        tf.vmap(lambda t, s: bridge(t, s))(x, torch.ones(4))


@requires_torch("2.5", "torch.library.register_vmap, bridge's rule for vmap")
@pytest.mark.parametrize("in_dim", [0, 1, 2])
def test_vmap_with_a_grad_scale_mask_on_any_batch_dimension(in_dim: int) -> None:
    x, mask = torch.randn(2, 3, 4), torch.tensor([1.0, 0.0, -2.0, 0.5])  # per column of each sample
    batched = x.movedim(0, in_dim)
    assert torch.equal(tf.vmap(lambda t: bridge(t, mask), in_dims=in_dim)(batched), x)
    per_sample = tf.vmap(tf.grad(lambda xi: bridge(xi, mask).sum()), in_dims=in_dim)(batched)
    assert torch.equal(per_sample, mask.expand(2, 3, 4))


@requires_torch("2.5", "torch.compiler.substitute_in_graph, without which bridge breaks the graph")
def test_compile_with_a_grad_scale_mask_matches_eager() -> None:
    mask = torch.tensor([True, False, True])[:, None]
    x = torch.randn(3, 4, requires_grad=True)
    f = lambda t: bridge(t * 2, mask).pow(2).sum()  # noqa: E731
    torch._dynamo.reset()
    grads = [torch.autograd.grad(g(x), x)[0] for g in (f, torch.compile(f, fullgraph=True, backend="aot_eager"))]
    torch.testing.assert_close(grads[1], grads[0])
    assert grads[0][1].eq(0).all() and grads[0][0].ne(0).all()
    with pytest.raises(ValueError, match="broadcast to the shape"):
        torch.compile(lambda t: bridge(t, torch.ones(2, 1)), backend="aot_eager")(x)  # a break runs it eagerly


@requires_torch("2.5", "torch.compiler.substitute_in_graph, without which bridge breaks the graph")
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_a_tensor_schedule_runs_under_cuda_graphs() -> None:
    # mode="reduce-overhead" replays CUDA graphs: the schedule must live on the
    # device and change in place, with no host sync and no recompile.
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    scale = torch.tensor(-1.0, device="cuda")
    torch.manual_seed(0)
    eager = nn.Sequential(nn.Linear(4, 4), Bridge(grad_scale=scale), nn.Linear(4, 2)).cuda()
    graphed_model = copy.deepcopy(eager)
    graphed_model[1].grad_scale = scale  # both follow the one schedule tensor
    compiled = torch.compile(graphed_model, mode="reduce-overhead", fullgraph=True)
    x = torch.randn(8, 4, device="cuda")
    for value in SCHEDULE[:10]:
        scale.fill_(value)
        for model, forward in ((eager, eager), (graphed_model, compiled)):
            model.zero_grad()
            forward(x).pow(2).sum().backward()
        for got, expected in zip(graphed_model.parameters(), eager.parameters()):
            torch.testing.assert_close(got.grad, expected.grad)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1


@pytest.mark.slow  # a fresh interpreter imports dynamo
@requires_torch("2.5", "torch.compiler.substitute_in_graph, without which bridge breaks the graph")
def test_import_defers_the_compile_rule_until_dynamo_is_imported() -> None:
    # torch._dynamo costs about a second to import; a program that never compiles
    # should not pay it, and one that does must still get the rule.
    script = (
        "import sys, torch, gradbridge_ext\n"
        "assert 'torch._dynamo' not in sys.modules, 'gradbridge_ext imported torch._dynamo'\n"
        "f = torch.compile(lambda t: gradbridge_ext.bridge(t, -1.0), fullgraph=True, backend='aot_eager')\n"
        "x = torch.ones(2, requires_grad=True)\n"
        "f(x * 1).sum().backward()\n"
        "assert x.grad.tolist() == [-1.0, -1.0], x.grad\n"
        "print('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr
