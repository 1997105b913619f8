"""Train the bundled demo Flow Matching UNet on scikit-learn's digits (16×16, CPU).

Writes ``otq_kernels/assets/fm_digits.safetensors`` (fp32 weights + metadata: config,
steps, seed, command, final loss, wall time) and an 8×8 grid of samples to
``docs/img/demo_samples.png``.

    python python/train_demo_model.py --steps 2000 --batch-size 64 --seed 0
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import torch

from otq_kernels import fm
from otq_kernels.data import load_digits
from otq_kernels.models import UNetModel, unet_config

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", default="digits")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--ema-decay", type=float, default=0.995)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=ROOT / "otq_kernels/assets/fm_digits.safetensors")
    p.add_argument("--grid", type=Path, default=ROOT / "docs/img/demo_samples.png")
    p.add_argument("--sample-steps", type=int, default=20)
    return p.parse_args(argv)


def save_grid(x: torch.Tensor, path: Path, nrow: int = 8, scale: int = 4) -> None:
    """Save samples x [B, 1, H, W] in [-1, 1] as an ``nrow``-wide grayscale PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    b, _, h, w = x.shape
    img = ((x.clamp(-1, 1) + 1) / 2)[:, 0]
    rows = (b + nrow - 1) // nrow
    grid = torch.ones(rows * (h + 1) + 1, nrow * (w + 1) + 1)
    for i in range(b):
        r, c = divmod(i, nrow)
        grid[1 + r * (h + 1) : 1 + r * (h + 1) + h, 1 + c * (w + 1) : 1 + c * (w + 1) + w] = img[i]
    grid = grid.repeat_interleave(scale, 0).repeat_interleave(scale, 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    plt.imsave(path, grid.numpy(), cmap="gray", vmin=0, vmax=1)


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    torch.manual_seed(args.seed)
    kwargs = unet_config(args.config)
    model = UNetModel(**kwargs)
    data = load_digits(size=16)
    t0 = time.time()

    def log(step: int, loss: float) -> None:
        print(f"step {step:5d}  loss {loss:.4f}  {time.time() - t0:6.0f}s", flush=True)

    losses = fm.train(
        model,
        data,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        warmup=args.warmup,
        schedule="cosine",
        ema_decay=args.ema_decay,
        ema_warmup=False,  # (as the bundled model was trained, before the warm-up existed)
        log_every=50,
        callback=log,
    )
    wall = time.time() - t0
    final = sum(losses[-100:]) / len(losses[-100:])
    x0 = fm.make_noise((64, 1, 16, 16), seed=1234)
    samples = fm.sample(model, x0, steps=args.sample_steps, method="midpoint")
    save_grid(samples, args.grid)

    from safetensors.torch import save_file

    meta = {
        "config": args.config,
        "config_kwargs": json.dumps(kwargs),
        "steps": str(args.steps),
        "batch_size": str(args.batch_size),
        "lr": str(args.lr),
        "ema_decay": str(args.ema_decay),
        "seed": str(args.seed),
        "final_loss": f"{final:.5f}",
        "train_seconds": f"{wall:.0f}",
        "data": "sklearn digits 8x8 -> 16x16 bilinear, [-1,1], 1797 images",
        "command": "python python/train_demo_model.py " + shlex.join(sys.argv[1:]),
        "torch": torch.__version__,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().float() for k, v in model.state_dict().items()}
    save_file(state, str(args.out), metadata=meta)
    print(json.dumps(meta, indent=1))
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.2f} MB) and {args.grid}")


if __name__ == "__main__":
    main()
