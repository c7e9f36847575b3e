"""rotate_to(x, q): q's values, exactly, as an alias; the rotation trick's gradient to x, as the library's.

The oracle is tests/rotation_reference.rotated_gradient (float64, the library's clamps), and,
where vector-quantize-pytorch is importable, the library's own rotate_to.
"""

from __future__ import annotations

import copy
import doctest
import itertools

import pytest
import torch
import torch.func as tf
from conftest import requires_torch, tiered, torch_at_least
from helpers import assert_alias, raw_bytes
from rotation_reference import library_available, library_rotate_to, rotated_gradient
from test_compiled_gradients import compiled_backward
from torch import Tensor, nn

import gradbridge_ext
from gradbridge_ext import rotate_to

# Each test runs on the native operator and on the pure-Python fallback (conftest.implementation).
pytestmark = pytest.mark.usefixtures("implementation")

FLOATING = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
# Row-relative error of the gradient against the float64 reference (on the same rounded inputs), per dtype:
# float64 is the reference's own arithmetic; the half types compute in float32 and round the result once.
ROW_TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-6, torch.bfloat16: 8e-3, torch.float16: 1e-3}
SCALES = [1e-8, 1e-7, 1e-6, 1e-5, 1e-3, 1.0, 1e3, 1e6]  # |e| and |q|: across the clamp and far from it


def row_error(got: Tensor, expected: Tensor) -> float:
    """The largest |got - expected| / |expected| over the rows (a zero row compares absolutely)."""
    got, expected = got.double(), expected.double()
    return ((got - expected).norm(dim=-1) / expected.norm(dim=-1).clamp_min(1e-300)).max().item()


def gradient(x: Tensor, q: Tensor, g: Tensor) -> Tensor:
    """What rotate_to sends to x for the incoming gradient g."""
    leaf = x.detach().clone().requires_grad_()
    result = rotate_to(leaf, q)
    result.backward(g)
    return leaf.grad


def rows_across_scales(d: int, dtype: torch.dtype = torch.float64) -> tuple[Tensor, Tensor, Tensor]:
    """One row per (|e|, |q|) in SCALES x SCALES, random directions, and a random incoming gradient."""
    torch.manual_seed(d)
    norms = torch.tensor(list(itertools.product(SCALES, SCALES)), dtype=torch.float64)
    e, q = torch.randn(2, len(norms), d, dtype=torch.float64)
    e = e / e.norm(dim=-1, keepdim=True) * norms[:, :1]
    q = q / q.norm(dim=-1, keepdim=True) * norms[:, 1:]
    return e.to(dtype), q.to(dtype), torch.randn(len(norms), d, dtype=torch.float64).to(dtype)


def degenerate_rows() -> dict[str, tuple[Tensor, Tensor]]:
    """(e, q) of one row each where the clamps decide (tests/rotation_reference.py lists them)."""
    e = torch.tensor([3.0, 4.0, 0.0, -1.0], dtype=torch.float64)
    q = torch.tensor([0.5, -2.0, 1.0, 2.0], dtype=torch.float64)
    return {
        "e = 0": (torch.zeros(4, dtype=torch.float64), q),
        "q = 0": (e, torch.zeros(4, dtype=torch.float64)),
        "e = q = 0": (torch.zeros(4, dtype=torch.float64), torch.zeros(4, dtype=torch.float64)),
        "exact antipode": (e, -2.0 * e),
        "near antipode": (e, -2.0 * e + torch.tensor([0.0, 0.0, 3e-6, 0.0], dtype=torch.float64)),
        "e = q": (e, e.clone()),
        "|e| below eps": (e * 1e-8, q),
        "|q| below eps": (e, q * 1e-8),
    }


def closed_form(case: str, e: Tensor, q: Tensor, g: Tensor) -> Tensor | None:
    """The degenerate rows' gradients, written out (findings of issue 31); None where only the reference says."""
    if case == "e = 0":
        w = q / q.norm()
        return q.norm() / 1e-6 * (g - 2 * w * (w @ g))
    if case in ("q = 0", "e = q = 0"):
        return torch.zeros_like(g)
    if case == "exact antipode":
        u = e / e.norm()
        return q.norm() / e.norm() * (g - 2 * u * (u @ g))
    if case == "e = q":
        return g  # R = I, lam = 1
    return None


# --- the forward: q itself


@pytest.mark.parametrize("dtype", FLOATING)
def test_the_result_is_q_bitwise_an_alias_recorded_when_x_requires_grad(dtype: torch.dtype) -> None:
    x = torch.randn(8, 5, dtype=dtype, requires_grad=True)
    q = torch.randn(8, 5, dtype=dtype)
    result = rotate_to(x, q)
    assert_alias(result, q)  # q's storage, sizes, strides and values: no copy, no kernel
    assert torch.equal(raw_bytes(result), raw_bytes(q))
    assert result.data_ptr() == q.data_ptr() and result.dtype == dtype
    assert result.requires_grad and result.grad_fn.name() == "RotateToBackward"


@pytest.mark.parametrize("why", ["x needs no grad", "no_grad", "inference_mode"])
def test_unrecorded_results_are_plain_aliases_that_need_no_grad(why: str) -> None:
    x = torch.randn(4, 3, requires_grad=why != "x needs no grad")
    q = torch.randn(4, 3)
    mode = {"no_grad": torch.no_grad(), "inference_mode": torch.inference_mode()}.get(why)
    with mode or torch.enable_grad():
        result = rotate_to(x, q)
    assert_alias(result, q)
    assert not result.requires_grad and result.grad_fn is None and result._base is None


def test_the_result_shares_qs_version_counter_and_a_changed_q_is_caught() -> None:
    x = torch.randn(4, 3, requires_grad=True)
    q = torch.randn(4, 3)
    result = rotate_to(x, q)
    q.add_(1)
    assert result._version == q._version == 1
    with pytest.raises(RuntimeError, match="modified (by an )?inplace"):  # autograd sees q changed under the result
        result.sum().backward()


def test_in_place_on_a_recorded_result_is_refused_not_written_into_q() -> None:
    x = torch.randn(4, 3, requires_grad=True)
    q = torch.randn(4, 3)
    before = q.clone()
    with pytest.raises(RuntimeError, match="is a view and is being modified inplace"):
        rotate_to(x, q).mul_(2)
    assert torch.equal(q, before)


def test_meta_tensors_give_shapes() -> None:
    x = torch.empty(2, 3, device="meta", requires_grad=True)
    result = rotate_to(x, torch.empty(2, 3, device="meta", dtype=torch.bfloat16))
    assert result.shape == (2, 3) and result.dtype == torch.bfloat16 and result.requires_grad


# --- the backward: the rotation trick's gradient, the library's at every row


@pytest.mark.parametrize("d", [2, 3, 32, 256])
def test_float64_gradient_is_the_references_at_every_scale(d: int) -> None:
    e, q, g = rows_across_scales(d)
    assert row_error(gradient(e, q, g), rotated_gradient(e, q, g)) < ROW_TOLERANCE[torch.float64]


@pytest.mark.parametrize("case", list(degenerate_rows()))
def test_degenerate_rows_get_the_librarys_clamped_gradient(case: str) -> None:
    e, q = degenerate_rows()[case]
    g = torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=torch.float64)
    got = gradient(e, q, g)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, rotated_gradient(e, q, g), rtol=1e-12, atol=1e-12 * rotated_gradient(e, q, g).abs().max())
    expected = closed_form(case, e, q, g)
    if expected is not None:
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12 * max(1.0, expected.abs().max().item()))


@pytest.mark.skipif(not library_available(), reason="needs vector-quantize-pytorch (benchmarks/clients/vector_quantize)")
def test_float64_gradient_is_the_librarys() -> None:
    e, q, g = rows_across_scales(32)
    cases = degenerate_rows().values()
    e = torch.cat([e, torch.stack([c[0] for c in cases]).repeat(1, 8)])
    q = torch.cat([q, torch.stack([c[1] for c in cases]).repeat(1, 8)])
    g = torch.randn(e.shape, dtype=torch.float64)
    leaf = e.clone().requires_grad_()
    library_rotate_to(leaf, q).backward(g)
    assert row_error(gradient(e, q, g), leaf.grad) < 1e-12


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_other_dtypes_are_within_a_rounding_of_the_float64_reference(dtype: torch.dtype) -> None:
    torch.manual_seed(1)
    e = (torch.randn(512, 64, dtype=torch.float64) * torch.logspace(-3, 3, 512, dtype=torch.float64)[:, None]).to(dtype)
    q = (torch.randn(512, 64, dtype=torch.float64) * 2).to(dtype)
    g = torch.randn(512, 64, dtype=torch.float64).to(dtype)
    got = gradient(e, q, g)
    assert got.dtype == dtype
    assert row_error(got, rotated_gradient(e.double(), q.double(), g.double())) < ROW_TOLERANCE[dtype]


def test_leading_dimensions_are_rows_and_q_gets_no_gradient() -> None:
    torch.manual_seed(0)
    codebook = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    q = codebook[torch.randint(0, 6, (2, 3, 4))]  # a VQ lookup: q is in the codebook's graph
    g = torch.randn(2, 3, 4, 5, dtype=torch.float64)
    rotate_to(x, q).backward(g)
    assert codebook.grad is None
    expected = rotated_gradient(x.detach().reshape(-1, 5), q.detach().reshape(-1, 5), g.reshape(-1, 5)).reshape(x.shape)
    assert row_error(x.grad, expected) < 1e-12
    one, target = torch.randn(5, dtype=torch.float64, requires_grad=True), q[0, 0, 0].detach()  # a single vector: one row
    rotate_to(one, target).sum().backward()
    assert row_error(one.grad[None], rotated_gradient(one.detach()[None], target[None], torch.ones(1, 5, dtype=torch.float64))) < 1e-12


def test_dtypes_may_differ_the_result_is_qs_and_the_gradient_xs() -> None:
    x = torch.randn(4, 8, dtype=torch.float64, requires_grad=True)
    q = torch.randn(4, 8).to(torch.bfloat16)
    result = rotate_to(x, q)
    assert result.dtype == torch.bfloat16 and result.data_ptr() == q.data_ptr()
    result.float().sum().backward()
    assert x.grad.dtype == torch.float64
    expected = rotated_gradient(x.detach(), q.double(), torch.ones(4, 8, dtype=torch.float64))
    assert row_error(x.grad, expected) < 1e-12


def test_double_backward_is_linear_in_the_incoming_gradient_only() -> None:
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    q = torch.randn(3, 4, dtype=torch.float64)
    g = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    (grad_x,) = torch.autograd.grad(rotate_to(x, q), x, g, create_graph=True)
    v = torch.randn(3, 4, dtype=torch.float64)
    grad_g, grad_x_x = torch.autograd.grad((grad_x * v).sum(), (g, x), allow_unused=True)
    assert grad_x_x is None  # lam and R are constants
    assert row_error(grad_g, _transpose_applied(x.detach(), q, v)) < 1e-12


def _transpose_applied(e: Tensor, q: Tensor, v: Tensor) -> Tensor:
    """d(v . grad_e)/dg = lam R v: the forward map lam R applied to v, row by row, from the reference's columns."""
    rows = []
    for ei, qi, vi in zip(e, q, v):
        jac = torch.stack([rotated_gradient(ei[None], qi[None], basis[None])[0] for basis in torch.eye(len(ei), dtype=e.dtype)])
        rows.append(jac @ vi)  # jac[k] = lam R^T e_k, so jac @ v = lam R v
    return torch.stack(rows)


def test_forward_mode_ad_is_refused() -> None:
    import torch.autograd.forward_ad as fwad

    with fwad.dual_level():
        x = fwad.make_dual(torch.randn(2, 3), torch.ones(2, 3))
        with pytest.raises(NotImplementedError, match=r"^gradbridge::rotate_to: forward-mode AD is not supported"):
            rotate_to(x, torch.zeros(2, 3))


@pytest.mark.parametrize(
    "x, q, error, match",
    [
        (torch.ones(2, 3), torch.ones(3), ValueError, r"same shape \(no broadcasting.*got \[2, 3\] and \[3\]$"),
        (torch.ones(3), torch.ones(3, device="meta"), ValueError, "same device, got cpu and meta$"),
        (torch.ones(3), torch.ones(3, dtype=torch.long), TypeError, r"both be real floating .* got Float and Long$"),
        (torch.ones(3, dtype=torch.cfloat), torch.ones(3, dtype=torch.cfloat), TypeError, "got ComplexFloat and ComplexFloat$"),
        (torch.tensor(1.0), torch.tensor(2.0), ValueError, "at least one dimension"),
        (torch.ones(3).to_sparse(), torch.ones(3), NotImplementedError, "x must be a dense strided tensor"),
    ],
)
def test_bad_arguments_raise_by_name(x: Tensor, q: Tensor, error: type, match: str) -> None:
    calls = [rotate_to] + ([torch.ops.gradbridge.rotate_to] if gradbridge_ext.NATIVE else [])
    for call in calls:
        with pytest.raises(error, match=r"^gradbridge::rotate_to\(x, q\): .*" + match):
            call(x, q)


def test_bad_types_raise_type_error() -> None:
    with pytest.raises(TypeError, match=r"^rotate_to\(\): argument 'x' must be a torch.Tensor, not list$"):
        rotate_to([1.0], torch.ones(1))
    with pytest.raises(TypeError, match=r"^rotate_to\(\): argument 'q' must be a torch.Tensor, not NoneType$"):
        rotate_to(torch.ones(1), None)


def test_an_inference_q_is_refused_while_x_requires_grad() -> None:
    with torch.inference_mode():
        q = torch.ones(3)
    with pytest.raises(RuntimeError, match=r"^gradbridge::rotate_to\(x, q\): q is an inference tensor"):
        rotate_to(torch.ones(3, requires_grad=True), q)
    assert_alias(rotate_to(torch.ones(3), q), q)  # nothing to record: a plain alias


def test_a_torch_function_subclass_sees_the_call() -> None:
    seen = []

    class Logged(Tensor):
        @classmethod
        def __torch_function__(cls, func, types, args=(), kwargs=None):
            seen.append(func)
            return super().__torch_function__(func, types, args, kwargs or {})

    x = torch.randn(2, 3, requires_grad=True).as_subclass(Logged)
    result = rotate_to(x, torch.randn(2, 3))
    assert seen[0] is rotate_to and isinstance(result, Logged)


def test_the_docstring_example_runs() -> None:
    flags = doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS
    parser, runner = doctest.DocTestParser(), doctest.DocTestRunner(optionflags=flags)
    test = parser.get_doctest(gradbridge_ext.rotate_to.__doc__, {}, "rotate_to", None, 0)
    assert test.examples
    runner.run(test)
    assert runner.summarize(verbose=False).failed == 0


# --- the stack


class Quantizer(nn.Module):
    """An encoder, a nearest-codebook lookup, rotate_to, a decoder: VectorQuantize's rotation-trick path."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.encoder, self.decoder = nn.Linear(6, 4), nn.Linear(4, 6)
        self.codebook = nn.Parameter(torch.randn(8, 4))

    def forward(self, x: Tensor) -> Tensor:
        e = self.encoder(x)
        q = self.codebook[torch.cdist(e.detach(), self.codebook.detach()).argmin(-1)]
        return self.decoder(rotate_to(e, q)) + 0 * (q - e.detach()).pow(2).sum()  # the codebook's own loss path


def gradients(model: nn.Module, forward, x: Tensor) -> list[Tensor | None]:
    model.zero_grad(set_to_none=True)
    forward(x).pow(2).sum().backward()
    return [p.grad for p in model.parameters()]


def assert_close_gradients(got: list, expected: list) -> None:
    for g, e in zip(got, expected, strict=True):
        assert (g is None) == (e is None)
        if e is not None:
            torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)


X = torch.randn(5, 6, generator=torch.Generator().manual_seed(3))


@requires_torch("2.5", "torch.compiler.substitute_in_graph, without which rotate_to breaks the graph")
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_gradients_are_eagers(backend: str) -> None:
    eager = Quantizer()
    model = copy.deepcopy(eager)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    torch.testing.assert_close(compiled(X), eager(X))
    assert_close_gradients(gradients(model, compiled, X), gradients(eager, eager, X))


@tiered("forward, backend", [(f, b) for f in ["eager forward", "compiled forward"] for b in ["aot_eager", "inductor"]],
        lambda f, b: (f, b) in {("eager forward", "aot_eager"), ("compiled forward", "inductor")})
def test_compiled_autograd_gradients_are_eagers(forward: str, backend: str, implementation: str, request: pytest.FixtureRequest) -> None:
    if forward == "compiled forward" and not torch_at_least("2.5"):
        pytest.skip("needs torch 2.5: torch.compiler.substitute_in_graph")
    if implementation == "fallback" and forward == "eager forward":
        # As in test_compiled_gradients.py: torch's, not ours. The fallback's Function gives q (in the
        # codebook's graph here) None, which compiled autograd cannot add to the codebook's other gradient.
        from torch._dynamo.exc import TorchRuntimeError, Unsupported

        reason = "compiled autograd cannot take a Python Function's None gradient"
        request.applymarker(pytest.mark.xfail(raises=(Unsupported, TorchRuntimeError), reason=reason))
    eager = Quantizer()
    model = copy.deepcopy(eager)
    torch._dynamo.reset()
    call = model if forward == "eager forward" else torch.compile(model, backend=backend, fullgraph=True)
    with compiled_backward(backend):
        got = gradients(model, call, X)
    assert_close_gradients(got, gradients(eager, eager, X))


@requires_torch("2.6", "torch.export that keeps a custom operator in the graph it captures")
@pytest.mark.native_only("torch.export keeps a backward only through the operator; the fallback refuses")
@pytest.mark.parametrize("strict", [False, True], ids=["non-strict", "strict"])
def test_export_keeps_the_operator_and_its_backward(strict: bool) -> None:
    model = Quantizer()
    torch._dynamo.reset()
    program = torch.export.export(copy.deepcopy(model), (X,), strict=strict)
    assert "gradbridge.rotate_to" in str(program.graph)
    exported = program.module()
    assert_close_gradients(gradients(exported, exported, X), gradients(model, model, X))
    decomposed = program.run_decompositions()
    assert "gradbridge" not in str(decomposed.graph)  # an alias of q below autograd
    torch.testing.assert_close(decomposed.module()(X), model(X))


@requires_torch("2.5", "torch.library.register_vmap, rotate_to's rule for vmap")
def test_vmap_and_func_grad() -> None:
    x, q = torch.randn(4, 3, 5, dtype=torch.float64), torch.randn(4, 3, 5, dtype=torch.float64)
    assert torch.equal(tf.vmap(rotate_to)(x, q), q)
    assert torch.equal(tf.vmap(rotate_to, in_dims=(1, 1), out_dims=1)(x, q), q)
    assert torch.equal(tf.vmap(rotate_to, in_dims=(0, None))(x, q[0]), q[0].expand(4, 3, 5))
    g = torch.randn(4, 3, 5, dtype=torch.float64)
    per_sample = tf.vmap(tf.grad(lambda xi, qi, gi: (rotate_to(xi, qi) * gi).sum()))(x, q, g)
    assert row_error(per_sample, rotated_gradient(x, q, g)) < 1e-12
    assert row_error(tf.grad(lambda xi: (rotate_to(xi, q) * g).sum())(x), rotated_gradient(x, q, g)) < 1e-12


@pytest.mark.native_only("the operator itself: the fallback registers none")
def test_torchscript_calls_the_operator() -> None:
    @torch.jit.script
    def scripted(x: Tensor, q: Tensor) -> Tensor:
        return torch.ops.gradbridge.rotate_to(x, q)

    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    q = torch.randn(3, 4, dtype=torch.float64)
    g = torch.randn(3, 4, dtype=torch.float64)
    result = scripted(x, q)
    assert torch.equal(result, q) and result.data_ptr() == q.data_ptr()
    result.backward(g)
    assert row_error(x.grad, rotated_gradient(x.detach(), q, g)) < 1e-12


@requires_torch("2.4", "torch.library.opcheck")
@pytest.mark.native_only("the operator itself: the fallback registers none")
def test_opcheck() -> None:
    x = torch.randn(3, 4, requires_grad=True)
    aot = ("test_aot_dispatch_dynamic",) if torch_at_least("2.6") else ()
    torch.library.opcheck(torch.ops.gradbridge.rotate_to.default, (x, torch.randn(3, 4)), test_utils=("test_schema", "test_faketensor", *aot))


@pytest.mark.native_only("the fallback's public names are Python functions")
def test_the_public_name_is_the_compiled_entry_and_its_hand_off_refuses_other_calls() -> None:
    assert gradbridge_ext.rotate_to is gradbridge_ext._C.rotate_to
    assert rotate_to.__text_signature__ == "(x, q, /)"
    for args in [(1, torch.ones(1)), (torch.ones(1), None), (torch.ones(1),)]:
        with pytest.raises(TypeError, match=r"takes what rotate_to\(\) has parsed"):
            gradbridge_ext._C._rotate_to_parsed(*args)
