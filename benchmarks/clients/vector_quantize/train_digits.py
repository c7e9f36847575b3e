"""Train the library's example autoencoder on scikit-learn's digits; run inside one library tree.

run.py starts this once per tree (the original, then the patched one) with that tree first on
PYTHONPATH. The model is ``SimpleVQAutoEncoder`` and the hyperparameters are the defaults of
``train()``, both read out of the tree's own examples/autoencoder.py by its syntax tree (that file
imports torchvision, tqdm and fire at the top, which this run needs none of). The data are the
1,797 8x8 digits, scaled to [-1, 1] as the example scales FashionMNIST. The loss is the
example's: ``|clamp(out, -1, 1) - x|.mean() + alpha * commitment``.

Each step records the losses and whether the quantizer's output rows are, bit for bit, the
codebook rows its indices name (the codebook as it was when that forward began: the EMA update
rewrites it inside the forward). Prints one JSON object (one run) on stdout.
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
import time
from pathlib import Path

import torch
from torch import nn


def example_parts(tree: Path):
    """SimpleVQAutoEncoder and train()'s literal defaults, from the tree's examples/autoencoder.py."""
    source = (tree / "examples" / "autoencoder.py").read_text()
    module = ast.parse(source)
    functions = {node.name: node for node in module.body if isinstance(node, ast.FunctionDef)}
    from vector_quantize_pytorch import Sequential, VectorQuantize

    namespace = {"nn": nn, "torch": torch, "VectorQuantize": VectorQuantize, "Sequential": Sequential}
    isolated = ast.Module(body=[functions["SimpleVQAutoEncoder"]], type_ignores=[])
    # NB: the one function definition, from the pinned tree's own file: the example's model, unedited.
    exec(compile(isolated, str(tree / "examples" / "autoencoder.py"), "exec"), namespace)  # noqa: S102
    train = functions["train"].args
    defaults = {
        arg.arg: ast.literal_eval(value)
        for arg, value in zip(train.args[len(train.args) - len(train.defaults):], train.defaults)
    }
    return namespace["SimpleVQAutoEncoder"], defaults


def digits() -> torch.Tensor:
    from sklearn.datasets import load_digits

    images = torch.from_numpy(load_digits().images).float()  # (1797, 8, 8), values 0..16
    return (images / 16.0 * 2 - 1).unsqueeze(1)  # as ToTensor then Normalize((0.5,), (0.5,))


def install_impl(impl: str) -> str:
    """Make gradbridge_ext.rotate_to what the patched tree calls; say which it is."""
    if impl == "library":
        return "library rotate_to (unpatched tree)"
    if impl == "reference":
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import standin

        return standin.install()
    import gradbridge_ext

    if not hasattr(gradbridge_ext, "rotate_to"):
        sys.exit("train_digits: gradbridge_ext has no rotate_to yet; run with --impl reference for the stand-in")
    return f"gradbridge_ext.rotate_to (NATIVE={getattr(gradbridge_ext, 'NATIVE', '?')})"


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32)


def train(tree: Path, seed: int, steps: int, perturb: bool, data: torch.Tensor) -> dict:
    SimpleVQAutoEncoder, cfg = example_parts(tree)
    torch.manual_seed(seed)
    model = SimpleVQAutoEncoder(
        dim=cfg["dim"],
        codebook_size=cfg["num_codes"],
        rotation_trick=cfg["rotation_trick"],
        straight_through=cfg["straight_through"],
        directional_reparam=cfg["directional_reparam"],
    )
    if perturb:  # the control: one ulp on the first conv's weights, nothing else changed
        with torch.no_grad():
            w = next(m for m in model.modules() if isinstance(m, nn.Conv2d)).weight
            w.copy_(torch.nextafter(w, torch.full_like(w, float("inf"))))
    vq = next(m for m in model.modules() if type(m).__name__ == "VectorQuantize")
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"])
    batches = torch.Generator().manual_seed(seed)

    snapshot: dict = {}
    checks = {"rows": 0, "rows_off_codebook": 0, "max_abs_off": 0.0}

    def before(module, args):
        snapshot["embed"] = module._codebook.embed.detach().clone()

    def after(module, args, output):
        quantize, indices = output[0].detach(), output[1]
        rows = quantize.permute(0, 2, 3, 1).reshape(-1, quantize.shape[1])  # (b c h w) -> rows of c
        expected = snapshot["embed"][0][indices.reshape(-1)]
        off = (bits(rows) != bits(expected)).any(dim=-1)
        checks["rows"] += rows.shape[0]
        checks["rows_off_codebook"] += int(off.sum())
        checks["max_abs_off"] = max(checks["max_abs_off"], float((rows - expected).abs().max()))

    vq.register_forward_pre_hook(before)
    vq.register_forward_hook(after)

    rec, cmt, active, seconds = [], [], [], []
    for _ in range(steps):
        idx = torch.randint(0, data.shape[0], (cfg["batch_size"],), generator=batches)
        x = data[idx]
        start = time.perf_counter()
        opt.zero_grad()
        out, indices, cmt_loss = model(x)
        out = out.clamp(-1.0, 1.0)
        rec_loss = (out - x).abs().mean()
        (rec_loss + cfg["alpha"] * cmt_loss).backward()
        opt.step()
        seconds.append(time.perf_counter() - start)
        rec.append(rec_loss.item())
        cmt.append(cmt_loss.item())
        active.append(indices.unique().numel() / cfg["num_codes"])
    return {"seed": seed, "perturbed": perturb, "rec": rec, "cmt": cmt, "active": active,
            "step_seconds": seconds, "codebook_check": checks, "config": cfg}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tree", type=Path, required=True, help="the library tree (also first on PYTHONPATH)")
    parser.add_argument("--impl", choices=("library", "ext", "reference"), required=True)
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--perturb", action="store_true", help="the control: one ulp up on the first conv's weights")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    run = {"impl": args.impl, "rotate_to": install_impl(args.impl)}
    run.update(train(args.tree, args.seed, args.steps, args.perturb, digits()))
    json.dump(run, sys.stdout)


if __name__ == "__main__":
    main()
