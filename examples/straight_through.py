"""Straight-through estimators: the trick ``x + (q - x).detach()`` against ``gradbridge_ext.straight_through``.

Two small models train both ways from the same start, full batch, on scikit-learn's
digits (bundled with the package, no download): a BitNet-style MLP (ternary weights,
int8 activations, the STE on both) and a VQ autoencoder (nearest-codebook lookup, the
STE from the encoder's output to its code). The script prints and checks:

(a) values on the grid: the weight each BitLinear multiplies by has exactly 3 distinct
    values with straight_through (the trick has more in some layer, in fp32 too; the
    check asks that of bf16 and fp16),
    and the VQ's quantized output is its codebook vectors exactly (the trick's is not);
(b) training in fp32: the VQ's final losses agree to VQ_TOLERANCE (relative), and both STEs
    train the BitMLP below BITMLP_TRAINED; the BitMLP's two final losses are printed, not
    compared (see BITMLP_TRAINED);
(c) the step time, straight_through / trick (measured and printed, not checked).

    python examples/straight_through.py [--steps 80] [--dtype float32] [--seed 0] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import Tensor, nn

import gradbridge_ext

Ste = Callable[[Tensor, Tensor], Tensor]  # (x, q) -> q's values with x's gradient


def trick(x: Tensor, q: Tensor) -> Tensor:
    """The idiom users write today; its values are x + (q - x), rounded twice, not q."""
    return x + (q - x).detach()


STES: dict[str, Ste] = {"trick": trick, "straight_through": gradbridge_ext.straight_through}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CHECK_DTYPES = ("float32", "bfloat16", "float16")  # where (a) is measured, on the trained models
LAST = 10  # (b) takes the mean loss of the last LAST steps: one step's loss jumps as weights flip
# (b), VQ: in fp32 the trick's values differ from q by a rounding only, and nothing in the VQ
# turns that into a discrete change, so both runs stay together (the script prints their
# relative gap; examples/results/straight_through.txt holds one run's).
VQ_TOLERANCE = 1e-4
# (b), BitMLP: one rounding of the trick's moves a weight across a ternary boundary, and from
# then on the runs are two trainings, as two seeds are: which of the two ends lower, and by
# how much, changes with the seed and with the CPU's rounding, so a check of agreement at one
# seed would pass or fail by luck. What is checked is that both train it, from their first
# loss (about ln 10 = 2.30) to below this bound, well above where the runs end.
BITMLP_TRAINED = 0.05


# The quantizers of the `bitnet` package's BitLinear (github.com/kyegomez/BitNet,
# bitnet/bitlinear.py), written here from its definitions: that package is not installed.
def activation_quant(x: Tensor) -> Tensor:
    """int8, absmax per token (the last dimension)."""
    scale = 127 / x.abs().amax(-1, keepdim=True).clamp(min=1e-5)
    return (x * scale).round().clamp(-128, 127) / scale


def weight_quant(w: Tensor) -> Tensor:
    """Ternary {-1, 0, 1}, scaled by the mean |w|."""
    s = 1 / w.abs().mean().clamp(min=1e-5)
    return (w * s).round().clamp(-1, 1) / s


class BitLinear(nn.Linear):
    def __init__(self, fan_in: int, fan_out: int, ste: Ste) -> None:
        super().__init__(fan_in, fan_out, bias=False)
        # NB: normal init, as language models use (GPT-2: std 0.02). nn.Linear's uniform
        # init keeps every |w| <= 2 mean|w|, where q - w is exact (Sterbenz) and so is the
        # trick; the trick rounds only where |w| > 2 mean|w|, as normal or trained weights have.
        nn.init.normal_(self.weight, std=0.02)
        self.ste = ste

    def used_weight(self) -> Tensor:
        """The tensor forward multiplies by: ternary values, the weight's gradient."""
        return self.ste(self.weight, weight_quant(self.weight.detach()))

    def forward(self, x: Tensor) -> Tensor:
        x = F.rms_norm(x, x.shape[-1:])  # BitLinear normalizes before it quantizes
        return F.linear(self.ste(x, activation_quant(x.detach())), self.used_weight())


class BitMLP(nn.Module):
    def __init__(self, ste: Ste, sizes: tuple[int, ...] = (64, 128, 128, 10)) -> None:
        super().__init__()
        self.layers = nn.ModuleList(BitLinear(a, b, ste) for a, b in zip(sizes, sizes[1:]))

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == 0 else layer(F.relu(x))
        return x


class VQAutoencoder(nn.Module):
    """Each image -> `tokens` vectors of `dim`, each replaced by its nearest of `codes` codebook vectors."""

    def __init__(self, ste: Ste, tokens: int = 4, dim: int = 8, codes: int = 32) -> None:
        super().__init__()
        self.tokens, self.dim, self.ste = tokens, dim, ste
        self.encoder = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, tokens * dim))
        self.codebook = nn.Parameter(torch.randn(codes, dim))
        self.decoder = nn.Sequential(nn.Linear(tokens * dim, 128), nn.ReLU(), nn.Linear(128, 64))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(reconstruction, encoder output z, its codebook vectors z_q, what the decoder got)."""
        z = self.encoder(x).view(-1, self.tokens, self.dim)
        nearest = (z.detach().unsqueeze(-2) - self.codebook.detach()).square().sum(-1).argmin(-1)
        z_q = self.codebook[nearest]
        z_st = self.ste(z, z_q)  # z_q's values; the gradient goes to the encoder, not the codebook
        return self.decoder(z_st.flatten(1)), z, z_q, z_st


def vq_loss(model: VQAutoencoder, x: Tensor) -> Tensor:
    recon, z, z_q, _ = model(x)
    # Reconstruction, codebook (moves codes to the encoder) and commitment (the encoder to its codes).
    return F.mse_loss(recon, x) + F.mse_loss(z_q, z.detach()) + 0.25 * F.mse_loss(z, z_q.detach())


def train(steps: int, dtype: torch.dtype, seed: int) -> dict:
    """Both models, trained with each STE from the same start, steps interleaved so timings pair up."""
    digits = load_digits()
    x = torch.tensor(digits.data / 16, dtype=dtype)
    y = torch.tensor(digits.target)
    models: dict[tuple[str, str], nn.Module] = {}
    for name, ste in STES.items():
        torch.manual_seed(seed)  # the same weights for both STEs
        models[("BitMLP", name)] = BitMLP(ste).to(dtype)
        torch.manual_seed(seed)
        models[("VQ", name)] = VQAutoencoder(ste).to(dtype)
    losses = {
        "BitMLP": lambda m: F.cross_entropy(m(x), y),
        "VQ": lambda m: vq_loss(m, x),
    }
    optimizers = {key: torch.optim.Adam(m.parameters(), lr=3e-3) for key, m in models.items()}
    times: dict[tuple[str, str], list[float]] = {key: [] for key in models}
    final: dict[tuple[str, str], float] = {}
    first: dict[tuple[str, str], float] = {}
    last = min(LAST, steps)
    for step in range(steps + 1):  # step 0 warms up and is not timed
        for key, model in models.items():
            start = time.perf_counter()
            loss = losses[key[0]](model)
            loss.backward()
            optimizers[key].step()
            optimizers[key].zero_grad(set_to_none=True)
            first.setdefault(key, loss.item())
            final[key] = final.get(key, 0.0) + (loss.item() / last if step > steps - last else 0.0)
            if step:
                times[key].append(time.perf_counter() - start)
    return {"models": models, "x": x, "first": first, "final": final, "times": times}


def exactness(models: dict[tuple[str, str], nn.Module], x: Tensor) -> dict:
    """(a) on copies of the trained models in each dtype: distinct weight values, VQ outputs off the codebook."""
    out: dict = {}
    for dtype_name in CHECK_DTYPES:
        dtype = DTYPES[dtype_name]
        for name in STES:
            mlp = BitMLP(STES[name]).to(dtype)
            mlp.load_state_dict(models[("BitMLP", name)].state_dict())
            out[("distinct", dtype_name, name)] = [layer.used_weight().unique().numel() for layer in mlp.layers]
            vq = VQAutoencoder(STES[name]).to(dtype)
            vq.load_state_dict(models[("VQ", name)].state_dict())
            _, _, z_q, z_st = vq(x.to(dtype))
            out[("off codebook", dtype_name, name)] = (z_st != z_q).float().mean().item()
    return out


def conclusions(steps: int = 80, dtype: str = "float32", seed: int = 0) -> dict:
    """Everything the script prints, and whether each checked conclusion holds."""
    run = train(steps, DTYPES[dtype], seed)
    exact = exactness(run["models"], run["x"])
    final, times = run["final"], run["times"]
    ours, trick_ = "straight_through", "trick"
    low = ("bfloat16", "float16")
    return {
        **run, "exact": exact, "dtype": dtype, "steps": steps,
        "a_ours_on_grid": all(n == 3 for d in CHECK_DTYPES for n in exact[("distinct", d, ours)])
                          and all(exact[("off codebook", d, ours)] == 0 for d in CHECK_DTYPES),
        "a_trick_off_grid": any(n > 3 for d in low for n in exact[("distinct", d, trick_)])
                            and any(exact[("off codebook", d, trick_)] > 0 for d in low),
        "b_vq_gap": abs(final[("VQ", ours)] - final[("VQ", trick_)]) / final[("VQ", trick_)],
        "b_vq_agree": abs(final[("VQ", ours)] - final[("VQ", trick_)]) <= VQ_TOLERANCE * final[("VQ", trick_)],
        "b_bitmlp_trained": all(final[("BitMLP", name)] < BITMLP_TRAINED < run["first"][("BitMLP", name)] for name in STES),
        "c_time_ratio": {m: statistics.median(a / b for a, b in zip(times[(m, ours)], times[(m, trick_)]))
                         for m in ("BitMLP", "VQ")},
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=80, help="full-batch Adam steps per model and STE")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="training dtype; (b) is checked in float32 only")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads; these small steps run fastest on one, above all on a shared machine")  # fmt: skip
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    c = conclusions(args.steps, args.dtype, args.seed)
    ex, final = c["exact"], c["final"]
    print(f"digits (1797 images, 8x8), {args.steps} full-batch Adam steps per model and STE, "
          f"{args.dtype}, torch {torch.__version__}")  # fmt: skip
    print("(a) distinct values of the weight each BitLinear multiplies by (ternary: 3), per layer;")
    print("    share of the VQ's quantized outputs that differ from their codebook vectors")
    for d in CHECK_DTYPES:
        print(f"    {d:9} " + "; ".join(f"{n}: {ex[('distinct', d, n)]}, off codebook "
                                        f"{ex[('off codebook', d, n)]:.4f}" for n in STES))  # fmt: skip
    print(f"(b) mean loss of the last {min(LAST, args.steps)} steps, trick vs straight_through: " + ", ".join(
        f"{m} {final[(m, 'trick')]:.4f} vs {final[(m, 'straight_through')]:.4f}" for m in ("BitMLP", "VQ"))
        + f"; VQ's relative gap {c['b_vq_gap']:.1e}")  # fmt: skip
    print("(c) step time straight_through / trick (median of paired steps, not checked): "
          + ", ".join(f"{m} {r:.3f}" for m, r in c["c_time_ratio"].items()))
    checked = [
        ("(a) with straight_through, every BitLinear multiplies by exactly 3 distinct values and every VQ "
         "output is its codebook vector, in " + ", ".join(CHECK_DTYPES), c["a_ours_on_grid"]),
        ("(a) with the trick, in bfloat16 or float16, some BitLinear multiplies by more than 3 values "
         "and some VQ outputs are off the codebook", c["a_trick_off_grid"]),
    ]
    if args.dtype == "float32":
        checked += [
            (f"(b) the VQ's final losses, trick and straight_through, agree to {VQ_TOLERANCE:.0e} (relative)",
             c["b_vq_agree"]),
            (f"(b) both STEs train the BitMLP, from a first loss above {BITMLP_TRAINED} to a final one below it "
             f"(trick {c['first'][('BitMLP', 'trick')]:.2f} to {final[('BitMLP', 'trick')]:.4f}, straight_through "
             f"{c['first'][('BitMLP', 'straight_through')]:.2f} to {final[('BitMLP', 'straight_through')]:.4f}); "
             "their runs part, so the two are not compared", c["b_bitmlp_trained"]),
        ]
    print("\nChecked on the run above:")
    for statement, holds in checked:
        print(f"  [{'yes' if holds else 'NO '}] {statement}")
    return 0 if all(holds for _, holds in checked) else 1


if __name__ == "__main__":
    sys.exit(main())
