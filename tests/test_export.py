"""bridge in torch.export (and ONNX through it), in the TorchScript-based ONNX exporter, and in TorchScript modules."""

from __future__ import annotations

import copy
import inspect
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import requires_torch
from gradbridge_ext import Bridge

# One module per setting; a fresh grad_scale tensor each time, since a module keeps it as a buffer.
SETTINGS = {
    "cut": lambda: Bridge(),
    "reversal": lambda: Bridge(grad_scale=-1.0),
    "damped": lambda: Bridge(grad_scale=0.25),
    "attach": lambda: Bridge(attach=True),
    "tensor": lambda: Bridge(grad_scale=torch.tensor(-0.5)),
}


def model_with(setting: str) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 4), SETTINGS[setting](), nn.Linear(4, 2))


def gradients(model: nn.Module, forward, x: torch.Tensor) -> list[torch.Tensor | None]:
    model.zero_grad(set_to_none=True)
    forward(x).pow(2).sum().backward()
    return [p.grad for p in model.parameters()]


def assert_same_gradients(got: list, expected: list) -> None:
    for g, e in zip(got, expected, strict=True):
        assert (g is None) == (e is None)
        if e is not None:
            torch.testing.assert_close(g, e)


@requires_torch("2.6", "an export that keeps the operator (torch 2.5 refuses: test_compiled_gradients.py)")
@pytest.mark.parametrize("strict", [False, True], ids=["non-strict", "strict"])
@pytest.mark.parametrize("setting", SETTINGS)
def test_export_decompose_save_and_load(setting: str, strict: bool, tmp_path: Path) -> None:
    model, x = model_with(setting), torch.randn(3, 4)
    program = torch.export.export(model, (x,), strict=strict)
    assert "gradbridge.bridge" in str(program.graph)  # the operator itself is captured
    # ep.module() runs the operator, so it keeps bridge's gradients.
    exported = program.module()
    assert_same_gradients(gradients(exported, exported, x), gradients(model, model, x))
    decomposed = program.run_decompositions()
    assert "gradbridge" not in str(decomposed.graph)  # an alias: below autograd every setting is one
    torch.testing.assert_close(decomposed.module()(x), model(x))
    torch.export.save(program, tmp_path / "model.pt2")
    loaded = torch.export.load(tmp_path / "model.pt2").module()
    torch.testing.assert_close(loaded(x), model(x))


@pytest.mark.parametrize("setting", SETTINGS)
def test_onnx_export_is_an_identity_and_onnxruntime_matches_eager(setting: str, tmp_path: Path) -> None:
    pytest.importorskip("onnxscript", reason="ONNX export needs onnx and onnxscript (pip install .[test])")
    onnxruntime = pytest.importorskip("onnxruntime", reason="needs onnxruntime (pip install .[test])")
    model, x = model_with(setting).eval(), torch.randn(3, 4)
    program = torch.onnx.export(model, (x,), dynamo=True, verbose=False)
    program.save(tmp_path / "model.onnx")
    assert [node.op_type for node in program.model_proto.graph.node] == ["Gemm", "Gemm"]  # the bridge vanished
    session = onnxruntime.InferenceSession(tmp_path / "model.onnx")
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    torch.testing.assert_close(torch.from_numpy(got), model(x).detach())


@pytest.mark.parametrize("setting", SETTINGS)
def test_torchscript_onnx_exporter_writes_an_identity_and_onnxruntime_matches_eager(setting: str, tmp_path: Path) -> None:
    onnx = pytest.importorskip("onnx", reason="needs onnx (pip install .[test])")
    onnxruntime = pytest.importorskip("onnxruntime", reason="needs onnxruntime (pip install .[test])")
    model, x = model_with(setting).eval(), torch.randn(3, 4)
    # dynamo=False picks the TorchScript-based exporter, the only one before torch 2.5 (which has no such argument).
    legacy = {"dynamo": False} if "dynamo" in inspect.signature(torch.onnx.export).parameters else {}
    torch.onnx.export(model, (x,), str(tmp_path / "model.onnx"), **legacy)
    assert [node.op_type for node in onnx.load(str(tmp_path / "model.onnx")).graph.node] == ["Gemm", "Identity", "Gemm"]
    session = onnxruntime.InferenceSession(str(tmp_path / "model.onnx"))
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    torch.testing.assert_close(torch.from_numpy(got), model(x).detach())


@pytest.mark.parametrize("setting", SETTINGS)
def test_torchscript_module_matches_eager(setting: str) -> None:
    model, x = model_with(setting), torch.randn(3, 4)
    scripted = torch.jit.script(copy.deepcopy(model))
    torch.testing.assert_close(scripted(x), model(x))
    assert_same_gradients(gradients(scripted, scripted, x), gradients(model, model, x))
