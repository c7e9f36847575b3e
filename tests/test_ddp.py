"""bridge under DistributedDataParallel: two CPU processes, gloo."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from conftest import KEEP_UNTIL_EXIT, WORLD, on_gloo_ranks
from independent_layers import ABC, loss

from gradbridge_ext import Bridge
from helpers import TernaryLinear

pytestmark = pytest.mark.slow  # processes of their own, a DDP model each: the full tier

STEPS = 2  # DDP reports parameters that got no gradient hook at the next step


def batches() -> list[torch.Tensor]:
    torch.manual_seed(1)
    return [torch.randn(8, 4) for _ in range(STEPS)]


def last_grads(model: nn.Module) -> dict[str, torch.Tensor | None]:
    return {name: p.grad for name, p in model.named_parameters()}


def model_with(cut_kwargs: dict) -> ABC:
    torch.manual_seed(0)
    return ABC(Bridge(**cut_kwargs), width=4)


def train(model: nn.Module, mode: int, shard: slice) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for x in batches():
        opt.zero_grad(set_to_none=True)
        b, c = model(x[shard])
        loss(b, c, (torch.zeros_like(b), torch.ones_like(c)), mode).backward()
        opt.step()


def ddp_rank(rank: int, mode: int, cut_kwargs: dict) -> dict:
    model = model_with(cut_kwargs)
    ddp = DistributedDataParallel(model, find_unused_parameters=False)
    KEEP_UNTIL_EXIT.append(ddp)  # freeing DDP can hang on torch 2.13 (conftest._rank_main)
    shard = slice(rank * 8 // WORLD, (rank + 1) * 8 // WORLD)
    try:
        train(ddp, mode, shard)
        return {"grads": last_grads(model), "state": model.state_dict()}
    except RuntimeError as error:
        return {"error": str(error)}


def run_ddp(tmp_path: Path, mode: int, **cut_kwargs) -> list[dict]:
    return on_gloo_ranks(ddp_rank, mode, cut_kwargs, out=tmp_path)


def single_process(mode: int, **cut_kwargs) -> ABC:
    model = model_with(cut_kwargs)
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
            if expected is None:  # attach=True sends None, which DDP's reduction may make zeros
                assert got is None or not got.any(), name
            else:
                torch.testing.assert_close(got, expected, msg=name)


def test_a_cut_in_mode_1_needs_find_unused_parameters(tmp_path: Path) -> None:
    # The control for attach=True (which sends None): with a plain cut, A and B never see a
    # gradient hook, which DDP with find_unused_parameters=False reports.
    for result in run_ddp(tmp_path, 1):
        assert "find_unused_parameters" in result.get("error", ""), result


def ternary_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(TernaryLinear(4, 8), nn.ReLU(), TernaryLinear(8, 2))


def train_ternary(model: nn.Module, shard: slice) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for x in batches():
        opt.zero_grad(set_to_none=True)
        model(x[shard]).pow(2).mean().backward()
        opt.step()


def ddp_ternary_rank(rank: int) -> dict:
    model = ternary_model()
    ddp = DistributedDataParallel(model, find_unused_parameters=False)
    KEEP_UNTIL_EXIT.append(ddp)
    train_ternary(ddp, slice(rank * 8 // WORLD, (rank + 1) * 8 // WORLD))
    return {"state": model.state_dict()}


def test_the_straight_through_estimator_on_a_parameter_trains_as_one_process(tmp_path: Path) -> None:
    # BitLinear's use: the STE's gradient reaches the parameter, so DDP's hooks fire and average it.
    reference = ternary_model()
    train_ternary(reference, slice(None))
    for result in on_gloo_ranks(ddp_ternary_rank, out=tmp_path):
        for name, expected in reference.state_dict().items():
            torch.testing.assert_close(result["state"][name], expected, msg=name)
