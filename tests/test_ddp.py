"""bridge under DistributedDataParallel: two CPU processes, gloo."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from conftest import KEEP_UNTIL_EXIT, WORLD, on_gloo_ranks

from gradbridge_ext import Bridge

STEPS = 2  # DDP reports parameters that got no gradient hook at the next step


class ABC(nn.Module):
    def __init__(self, cut: nn.Module) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.A, self.B, self.C = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2)
        self.cut = cut

    def forward(self, x: torch.Tensor, mode: int) -> torch.Tensor:
        b = self.B(self.A(x))
        loss_b = b.pow(2).mean()
        loss_c = F.mse_loss(self.C(self.cut(b)), torch.ones(len(x), 2))
        return (loss_b, loss_c, loss_b + loss_c)[mode]


def batches() -> list[torch.Tensor]:
    torch.manual_seed(1)
    return [torch.randn(8, 4) for _ in range(STEPS)]


def last_grads(model: nn.Module) -> dict[str, torch.Tensor | None]:
    return {name: p.grad for name, p in model.named_parameters()}


def train(model: nn.Module, mode: int, shard: slice) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for x in batches():
        opt.zero_grad(set_to_none=True)
        model(x[shard], mode).backward()
        opt.step()


def ddp_rank(rank: int, mode: int, cut_kwargs: dict) -> dict:
    model = ABC(Bridge(**cut_kwargs))
    ddp = DistributedDataParallel(model, find_unused_parameters=False)
    KEEP_UNTIL_EXIT.append(ddp)  # freeing DDP can hang on torch 2.13 (conftest._rank_main)
    shard = slice(rank * 8 // WORLD, (rank + 1) * 8 // WORLD)
    try:
        train(_Forwarding(ddp), mode, shard)
        return {"grads": last_grads(model), "state": model.state_dict()}
    except RuntimeError as error:
        return {"error": str(error)}


class _Forwarding(nn.Module):
    """DDP's forward takes the mode through; train() sees one module either way."""

    def __init__(self, ddp: DistributedDataParallel) -> None:
        super().__init__()
        self.ddp = ddp

    def forward(self, x: torch.Tensor, mode: int) -> torch.Tensor:
        return self.ddp(x, mode)


def run_ddp(tmp_path: Path, mode: int, **cut_kwargs) -> list[dict]:
    return on_gloo_ranks(ddp_rank, mode, cut_kwargs, out=tmp_path)


def single_process(mode: int, **cut_kwargs) -> ABC:
    model = ABC(Bridge(**cut_kwargs))
    train(model, mode, slice(None))
    return model


@pytest.mark.parametrize("mode, cut_kwargs", [(2, {}), (2, {"grad_scale": -0.5}), (1, {"attach": True})])
def test_every_rank_matches_one_process(tmp_path: Path, mode: int, cut_kwargs: dict) -> None:
    ranks = run_ddp(tmp_path, mode, **cut_kwargs)
    reference = single_process(mode, **cut_kwargs)
    for result in ranks:
        assert "error" not in result, result.get("error")
        for name, expected in reference.state_dict().items():
            torch.testing.assert_close(result["state"][name], expected, msg=name)
        for name, expected in last_grads(reference).items():
            got = result["grads"][name]
            if expected is None:  # attached zero: DDP reduced no gradient to zeros
                assert got is None or not got.any(), name
            else:
                torch.testing.assert_close(got, expected, msg=name)


def test_a_cut_in_mode_1_needs_find_unused_parameters(tmp_path: Path) -> None:
    # The control for the attached zero: with a plain cut, A and B never see a
    # gradient hook, which DDP with find_unused_parameters=False reports.
    for result in run_ddp(tmp_path, 1):
        assert "find_unused_parameters" in result.get("error", ""), result
