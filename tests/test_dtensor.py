"""bridge of a DTensor (gradbridge_ext/_dtensor.py): two CPU processes over gloo on loopback.

One launch of two ranks runs every distributed check, each recorded by name; the
tests below read the records, one test per check. The process handling follows
tests/test_ddp.py.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import textwrap
import traceback
from collections.abc import Callable

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from conftest import WORLD, on_gloo_ranks
from helpers import TernaryLinear

import gradbridge_ext._dtensor as dtensor_rule
from gradbridge_ext import Bridge, BridgeFunction, bridge, straight_through

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")

STEPS = 3

SETTINGS: dict[str, dict] = {
    "cut": {},
    "reversal": {"grad_scale": -1.5},
    "attach": {"attach": True},
    "tensor scale": {"grad_scale": torch.tensor(-1.5)},  # the bridge.Tensor overload
}
HAS_TENSOR_OVERLOAD = "Tensor" in torch.ops.gradbridge.bridge.overloads()
SKIP = "skip: "

ENTRY_POINTS: dict[str, Callable[[torch.Tensor, dict], torch.Tensor]] = {
    "bridge": lambda t, kw: bridge(t, **kw),
    "Bridge": lambda t, kw: Bridge(**kw)(t),
    # Keywords, so that the cut passes t alone; a nonzero grad_scale implies attach.
    "torch.ops": lambda t, kw: torch.ops.gradbridge.bridge(t, **kw),
    "BridgeFunction": lambda t, kw: BridgeFunction.apply(t),  # the cut only
}

PLACEMENTS = ["Shard(0)", "Replicate()"]

CASES = [
    f"{entry}/{setting}/{placement}"
    for entry in ENTRY_POINTS
    for setting in SETTINGS
    if entry != "BridgeFunction" or setting == "cut"
    for placement in PLACEMENTS
]
OTHER_CHECKS = ["partial and 2-d mesh", "tensor parallel", "fully_shard", "straight_through", "mask", "fully_shard straight_through"]


# --- the ranks ---------------------------------------------------------------------------


def placements_of(name: str) -> list:
    from torch.distributed.tensor import Replicate, Shard

    return [{"Shard(0)": Shard(0), "Replicate()": Replicate()}[name]]


class Skip(Exception):
    """A check that does not apply to this build."""


def check_case(mesh, entry: str, setting: str, placement: str) -> None:
    """Forward: a DTensor on t's mesh with t's placements, over an alias of t's shard.
    Backward: the setting's gradient, as for a plain tensor."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if setting == "tensor scale" and not HAS_TENSOR_OVERLOAD:
        raise Skip("this build of gradbridge has no bridge.Tensor overload")
    kwargs = SETTINGS[setting]
    placements = placements_of(placement)
    x_full = torch.arange(24.0).reshape(6, 4) - 10
    w_full = torch.linspace(-1, 1, 24).reshape(6, 4)
    x = distribute_tensor(x_full, mesh, placements).requires_grad_()
    w = distribute_tensor(w_full, mesh, placements).requires_grad_()
    y = x * 2  # B's output: not a leaf

    r = ENTRY_POINTS[entry](y, kwargs)

    assert isinstance(r, DTensor), type(r)
    assert r.device_mesh == y.device_mesh, (r.device_mesh, y.device_mesh)
    assert r.placements == y.placements, (r.placements, y.placements)
    assert r.shape == y.shape and r.stride() == y.stride(), (r.shape, r.stride())
    local, y_local = r.to_local(), y.to_local()
    assert local.data_ptr() == y_local.data_ptr(), "the local result is not an alias of the input's shard"
    assert local.shape == y_local.shape and local.stride() == y_local.stride()
    assert torch.equal(local, y_local)
    attached = setting != "cut"
    assert r.requires_grad == attached, r.requires_grad
    if attached:
        assert r.grad_fn is not None and r.grad_fn.name() == "BridgeBackward", r.grad_fn
    else:
        assert r.grad_fn is None, r.grad_fn

    (r * w).sum().full_tensor().backward()

    torch.testing.assert_close(w.grad.full_tensor(), 2 * x_full)  # C learns from b ...
    scale = float(kwargs.get("grad_scale", 0.0))
    if scale == 0:  # ... and B gets nothing (autograd's zero, not zeros)
        assert x.grad is None, x.grad
    else:
        torch.testing.assert_close(x.grad.full_tensor(), scale * 2 * w_full)
    assert torch.equal(r.full_tensor(), 2 * x_full)


def check_partial_and_2d_mesh(mesh) -> None:
    """Placements the rule passes through as detach's does: Partial, and one per dimension of a 2-d mesh."""
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, init_device_mesh

    rank = dist.get_rank()
    partial = DTensor.from_local(torch.full((2, 3), float(rank + 1)), mesh, [Partial()])
    mesh_2d = init_device_mesh("cpu", (1, WORLD), mesh_dim_names=("dp", "tp"))
    for t in (partial, DTensor.from_local(torch.randn(2, 3), mesh_2d, [Replicate(), Shard(1)])):
        for kwargs in SETTINGS.values():
            r = bridge(t, **kwargs)
            assert r.device_mesh == t.device_mesh and r.placements == t.placements, (r.placements, t.placements)
            assert r.to_local().data_ptr() == t.to_local().data_ptr()
    torch.testing.assert_close(bridge(partial).full_tensor(), torch.full((2, 3), 3.0))


class Reversal(torch.autograd.Function):
    """The plain Python gradient reversal layer: grad_scale=-1."""

    @staticmethod
    def forward(ctx, t: torch.Tensor) -> torch.Tensor:
        return t.view_as(t)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return -grad


class Detach(nn.Module):
    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return t.detach()


class PythonReversal(nn.Module):
    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return Reversal.apply(t)


class Block(nn.Module):
    """A -> cut -> C, with a loss on A's output and one on C's, so both settings matter to A."""

    def __init__(self, cut: nn.Module) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.A, self.C = nn.Linear(4, 8), nn.Linear(8, 4)
        self.cut = cut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.A(x)
        loss_a = a.pow(2).mean()
        if hasattr(loss_a, "full_tensor"):
            loss_a = loss_a.full_tensor()
        c = self.C(self.cut(a))
        if hasattr(c, "full_tensor"):
            c = c.full_tensor()
        return loss_a + F.mse_loss(c, torch.ones(len(x), 4))


def train(model: nn.Module) -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(STEPS):
        opt.zero_grad(set_to_none=True)
        model(torch.randn(8, 4)).backward()
        opt.step()
    return {name: getattr(p, "full_tensor", lambda p=p: p)().detach().clone() for name, p in model.named_parameters()}


def assert_same(got: dict, expected: dict, label: str) -> None:
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, rtol=0, atol=0, msg=lambda m, n=name: f"{label}, {n}: {m}")


def check_tensor_parallel(mesh) -> None:
    """ColwiseParallel (DTensor output) -> bridge -> RowwiseParallel, against detach and a Python reversal."""
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    seen: list[type] = []

    def parallel(cut: nn.Module) -> nn.Module:
        cut.register_forward_pre_hook(lambda module, args: seen.append(type(args[0])))
        return parallelize_module(
            Block(cut), mesh, {"A": ColwiseParallel(use_local_output=False), "C": RowwiseParallel()}
        )

    reference = {"cut": train(parallel(Detach())), "reversal": train(parallel(PythonReversal()))}
    assert seen and all(kind is DTensor for kind in seen), seen
    assert not all(torch.equal(reference["cut"][n], reference["reversal"][n]) for n in ("A.weight", "A.bias")), (
        "the reversal does not change A: the check would not see a wrong gradient"
    )
    assert_same(train(parallel(Bridge())), reference["cut"], "Bridge()")
    assert_same(train(parallel(Bridge(attach=True))), reference["cut"], "Bridge(attach=True)")
    assert_same(train(parallel(Bridge(grad_scale=-1.0))), reference["reversal"], "Bridge(grad_scale=-1.0)")


def check_fully_shard(mesh) -> None:
    """Regression: FSDP2 with a Bridge inside trains as with detach()."""
    from torch.distributed.fsdp import fully_shard

    def sharded(cut: nn.Module) -> nn.Module:
        model = Block(cut)
        fully_shard(model.A, mesh=mesh)
        fully_shard(model.C, mesh=mesh)
        return fully_shard(model, mesh=mesh)

    assert_same(train(sharded(Bridge())), train(sharded(Detach())), "fully_shard, Bridge()")


def check_straight_through(mesh) -> None:
    """q's placements and local alias, x's gradient, for each placement and grad_scale."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    x_full = torch.linspace(-2, 2, 24).reshape(6, 4)
    for name in PLACEMENTS:
        for scale in (1.0, -0.5, torch.tensor(2.0)):
            x = distribute_tensor(x_full, mesh, placements_of(name)).requires_grad_()
            q = x.detach().round()
            r = straight_through(x, q, scale)
            assert isinstance(r, DTensor) and r.placements == q.placements, r
            assert r.to_local().data_ptr() == q.to_local().data_ptr(), "the local result is not an alias of q's shard"
            assert r.grad_fn.name() == "StraightThroughBackward", r.grad_fn
            (r * 3).sum().full_tensor().backward()
            assert torch.equal(r.full_tensor(), x_full.round())
            torch.testing.assert_close(x.grad.full_tensor(), torch.full((6, 4), 3.0 * float(scale)))


def check_mask(mesh) -> None:
    """A grad_scale mask on a sharded t: sharded with t where it spans t's dimension, replicated where it broadcasts."""
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    t_full = torch.randn(6, 4)
    for name in PLACEMENTS + ["Shard(1)"]:
        placements = [Shard(1)] if name == "Shard(1)" else placements_of(name)
        for mask in (torch.arange(6.0)[:, None], torch.tensor([1.0, 0.0, 2.0, 0.0]), torch.rand(6, 4)):
            t = distribute_tensor(t_full, mesh, placements).requires_grad_()
            # DTensor takes a plain tensor only 0-dim; the rule shards the replicated mask with t where it must.
            r = bridge(t * 1, distribute_tensor(mask, mesh, [Replicate()]))
            assert r.placements == t.placements, (r.placements, t.placements)
            r.sum().full_tensor().backward()
            torch.testing.assert_close(t.grad.full_tensor(), mask.expand(6, 4))


def check_fully_shard_straight_through(mesh) -> None:
    """FSDP2 with the STE on a parameter (BitLinear's ternary weights) trains as one process does."""
    from torch.distributed.fsdp import fully_shard

    def train(model: nn.Module) -> list[torch.Tensor]:
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        for step in range(STEPS):
            torch.manual_seed(step)
            optimizer.zero_grad()
            model(torch.randn(4, 8)).pow(2).sum().backward()
            optimizer.step()
        return [p.full_tensor() if hasattr(p, "full_tensor") else p.detach() for p in model.parameters()]

    def model() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(TernaryLinear(8, 8), nn.ReLU(), TernaryLinear(8, 2))

    sharded = model()
    for layer in sharded:
        if isinstance(layer, TernaryLinear):
            fully_shard(layer, mesh=mesh)
    got, expected = train(fully_shard(sharded, mesh=mesh)), train(model())
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e)


def run_checks(rank: int) -> dict[str, str | None]:
    from torch.distributed.tensor import init_device_mesh

    mesh = init_device_mesh("cpu", (WORLD,))
    checks: dict[str, Callable[[], None]] = {
        name: (lambda name=name: check_case(mesh, *name.split("/"))) for name in CASES
    }
    checks["partial and 2-d mesh"] = lambda: check_partial_and_2d_mesh(mesh)
    checks["tensor parallel"] = lambda: check_tensor_parallel(mesh)
    checks["fully_shard"] = lambda: check_fully_shard(mesh)
    checks["straight_through"] = lambda: check_straight_through(mesh)
    checks["mask"] = lambda: check_mask(mesh)
    checks["fully_shard straight_through"] = lambda: check_fully_shard_straight_through(mesh)
    results: dict[str, str | None] = {}
    for name, check in checks.items():
        try:
            check()
            results[name] = None
        except Skip as reason:
            results[name] = SKIP + str(reason)
        except Exception:  # noqa: BLE001 (recorded for the test of that name)
            results[name] = f"rank {rank}: {traceback.format_exc()}"
        dist.barrier()  # a rank that failed early must not leave the other in a collective
    return results


@pytest.fixture(scope="module")
def records(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, str | None]]:
    return on_gloo_ranks(run_checks, out=tmp_path_factory.mktemp("dtensor"))


@pytest.mark.parametrize("case", CASES)
def test_entry_point_setting_placement(records: list[dict], case: str) -> None:
    for record in records:
        if record[case] and record[case].startswith(SKIP):
            pytest.skip(record[case][len(SKIP) :])
        assert record[case] is None, record[case]


@pytest.mark.parametrize("check", OTHER_CHECKS)
def test_distributed(records: list[dict], check: str) -> None:
    for record in records:
        assert record[check] is None, record[check]


# --- one process: registration -----------------------------------------------------------


def test_rule_is_registered_with_the_public_api() -> None:
    # Pins what the rule needs from torch: the public register_sharding. A torch
    # that moves or drops it turns this red (and warns at DTensor import).
    import torch.distributed.tensor  # noqa: F401
    from torch.distributed.tensor.experimental import register_sharding  # noqa: F401

    assert dtensor_rule.skipped is None, dtensor_rule.skipped
    assert dtensor_rule.registered


def fresh_copy(name: str):
    """Run _dtensor.py again as a new module, so its registration runs again."""
    spec = importlib.util.spec_from_file_location(f"gradbridge_ext.{name}", dtensor_rule.__file__)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_torch_without_register_sharding_warns_and_imports(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch.distributed.tensor  # noqa: F401 (so that the copy registers at once)

    monkeypatch.setitem(sys.modules, "torch.distributed.tensor.experimental", None)  # import fails
    with pytest.warns(RuntimeWarning, match="bridge, straight_through and rotate_to of a DTensor will fail.*register_sharding"):
        copy = fresh_copy("gradbridge_ext_dtensor_copy")
    assert not copy.registered
    assert "torch >= 2.5" in copy.skipped, copy.skipped


def test_registers_when_torch_distributed_tensor_is_imported_later() -> None:
    # gradbridge_ext does not import torch.distributed.tensor (nor torch._dynamo,
    # which would), so the rule must be registered when something else does.
    script = textwrap.dedent(
        """
        import sys, warnings
        warnings.simplefilter("error")
        import torch, gradbridge_ext
        from gradbridge_ext import _dtensor as rule, _import_hooks as hooks
        assert "torch.distributed.tensor" not in sys.modules and "torch._dynamo" not in sys.modules
        assert not rule.registered and hooks.is_watching("torch.distributed.tensor")
        sys.modules["torch.distributed.tensor._ops"] = None  # the first import fails at its first line ...
        try:
            import torch.distributed.tensor
        except ImportError:
            pass
        else:
            raise AssertionError("the import did not fail")
        del sys.modules["torch.distributed.tensor._ops"]
        assert not rule.registered and rule.skipped is None and hooks.is_watching("torch.distributed.tensor")
        from torch.distributed.tensor.parallel import ColwiseParallel  # ... the next registers
        assert rule.registered and rule.skipped is None and not hooks.is_watching("torch.distributed.tensor")
        module = sys.modules["torch.distributed.tensor"]
        assert module.__loader__ is module.__spec__.loader and type(module.__loader__).__name__ != "_RunAfterLoading"

        import torch.distributed as dist
        from torch.distributed.tensor import DTensor, Shard, init_device_mesh
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        d = DTensor.from_local(torch.ones(2, 2), init_device_mesh("cpu", (1,)), [Shard(0)])
        assert torch.ops.gradbridge.bridge(d, -1.0).placements == (Shard(0),)
        print("ok")
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr
