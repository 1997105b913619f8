"""The CUDA LUT GEMV (lut_gemv.cu) or tensor-core kernel at small M over forced split-K.

For issue 6's goal shapes (8192², 14336×4096), bits 2/3/4/8 and both granularities, it
times ``cuda.linear(x, qt, split_k=s, tensor_cores=False)`` for s in ``--splits`` and
F.linear on the dense weight (CUDA-graph replays by default, L2 flushed), one row each,
with ``heuristic_split_k`` = what ``cuda.split_k_for`` picks. The question it answers:
is the heuristic's split (and its split-K fix-up kernel) worth it at M = 1.
``--tensor-cores`` sweeps lut_mma.cu instead (2-4 bits; ``splitk_mma.json``).

``--ncu-target`` runs four GEMV configurations at M = 1, the tensor-core kernel at M = 16
and M = 1 on the canonical planes (lut_mma) and on fragment-order codes (lut_frag; at
M = 16 per tensor also in 32-row blocks, lut_frag32), and the CUDA conv (lut_conv) at
28x28 and 7x7, each launch twice without timing, for Nsight Compute to profile
(``ncu --kernel-name regex:"lut_gemv|lut_mma|lut_frag|lut_conv" ...``).
"""

from __future__ import annotations

import common
import torch
import torch.nn.functional as F
from bench_linear import cuda_kernel

SHAPES = [(8192, 8192), (14336, 4096)]
KERNELS = {False: "lut_gemv", True: "lut_mma"}  # by --tensor-cores
ROW_KEY = ("op", "M", "N", "K", "dtype")


def sweep_config(run: common.Run, n: int, k: int, bits: int, gran: str, m: int,
                 splits: list[int], dtype: torch.dtype, tensor_cores: bool = False) -> None:
    """fp16 and every split of one (shape, bits, granularity, M): one row each."""
    from otq_kernels.backends import _device, cuda

    base = {"op": "linear", "M": m, "N": n, "K": k, "shape": f"{n}x{k}",
            "dtype": str(dtype).replace("torch.", "")}
    qt = common.random_qt(n, k, bits, gran, run.device)
    dense = qt.dequantize(dtype).reshape(n, k).contiguous()
    x = torch.randn(m, k, device=run.device, dtype=dtype)
    y_ref = F.linear(x, dense)
    graph = not run.args.eager
    run.add({**base, "backend": "fp16", "kernel": "cublas", "bits": bits, "granularity": gran,
             **run.time(lambda: F.linear(x, dense), graph=graph)})
    picked = cuda.split_k_for(n, k, _device.sm_count(run.device))
    for split_k in splits:
        fn = cuda_kernel(KERNELS[tensor_cores], split_k)
        run.add({**base, "backend": "cuda", "kernel": KERNELS[tensor_cores], "bits": bits,
                 "granularity": gran, "split_k": split_k, "heuristic_split_k": picked,
                 "rel_err": common.rel_error(fn(x, qt), y_ref),
                 **run.time(lambda fn=fn: fn(x, qt), graph=graph)})


def ncu_target(device: torch.device, configs: list[tuple]) -> None:
    """Each configuration's launch of its kernel (bench_linear.CUDA_KERNELS), twice,
    untimed (for ncu; lut_frag's first call builds the fragment-order codes)."""
    for n, k, bits, gran, m, kernel in configs:
        qt = common.random_qt(n, k, bits, gran, device)
        x = torch.randn(m, k, device=device, dtype=torch.float16)
        for _ in range(2):
            cuda_kernel(kernel)(x, qt)
        torch.cuda.synchronize(device)
        print(f"ran {n}x{k} b{bits} {gran} M{m} {kernel}", flush=True)


def ncu_conv_target(device: torch.device, sizes: list[int]) -> None:
    """The CUDA conv (lut_conv) on the mnist UNet's 256 -> 256 3x3 conv at batch 1, 4 bits
    per channel, at each image size, twice, untimed (for ncu; the first call builds the
    layer's tap-major codes)."""
    from otq_kernels.backends import cuda

    qt = common.random_qt(256, 256 * 9, 4, "channel", device, shape=(256, 256, 3, 3))
    for size in sizes:
        x = torch.randn(1, 256, size, size, device=device, dtype=torch.float16)
        for _ in range(2):
            cuda.conv2d(x, qt, None, (1, 1), (1, 1), (1, 1), 1)
        torch.cuda.synchronize(device)
        print(f"ran conv 256x256x3x3 @ {size}x{size} b4 channel", flush=True)


def main(argv=None) -> int:
    p = common.parser("splitk", __doc__.splitlines()[0])
    p.add_argument("--splits", type=common.COUNTS, default="1,2,4,8,16",
                   help="comma-separated split-K factors")
    p.add_argument("--bits", type=common.BIT_WIDTHS, default="4,2,3,8",
                   help="comma-separated bit widths")
    p.add_argument("--ms", type=common.COUNTS, default="1", help="comma-separated M values")
    p.add_argument("--eager", action="store_true", help="time eager calls, not graph replays")
    p.add_argument("--tensor-cores", action="store_true",
                   help="sweep the tensor-core kernel (lut_mma, 2-4 bits) into splitk_mma.json")
    p.add_argument("--ncu-target", action="store_true",
                   help="run the 8192² GEMV at M = 1 (4 bits both granularities, 2 and 8 "
                        "bits), the tensor-core kernel at M = 16 (4 bits per channel) and "
                        "M = 1 (4 bits per tensor) on canonical and fragment-order codes "
                        "(and the latter at M = 1 at 2, 3 and 8 bits, at M = 16 4 bits per "
                        "tensor in 16- and 32-row blocks), then the CUDA conv on "
                        "the mnist UNet's 3x3 conv at 28x28 and 7x7, untimed, for Nsight "
                        "Compute")
    args = p.parse_args(argv)
    if args.ncu_target:
        device = common.resolve_device(args.device)
        ncu_target(device, [(8192, 8192, 4, "channel", 1, "lut_gemv"),
                            (8192, 8192, 4, "tensor", 1, "lut_gemv"),
                            (8192, 8192, 2, "channel", 1, "lut_gemv"),
                            (8192, 8192, 8, "tensor", 1, "lut_gemv"),
                            (8192, 8192, 4, "channel", 16, "lut_mma"),
                            (8192, 8192, 4, "tensor", 1, "lut_mma"),
                            (8192, 8192, 4, "channel", 16, "lut_frag"),
                            (8192, 8192, 4, "tensor", 16, "lut_frag"),
                            (8192, 8192, 4, "tensor", 16, "lut_frag32"),
                            (8192, 8192, 4, "tensor", 1, "lut_frag"),
                            (8192, 8192, 2, "tensor", 1, "lut_frag"),
                            (8192, 8192, 3, "tensor", 1, "lut_frag"),
                            (8192, 8192, 8, "tensor", 1, "lut_frag")])
        ncu_conv_target(device, [28, 7])
        return 0
    run = common.Run("splitk_mma" if args.tensor_cores else "splitk", args)
    if run.device.type != "cuda":
        run.add(common.skipped_row("the CUDA kernels need a GPU", op="linear",
                                   backend="cuda", kernel=KERNELS[args.tensor_cores]))
        run.write(complete=True)
        return 0
    splits, ms = args.splits, args.ms
    run.finalizers.append(lambda rows: common.fill_ratios(rows, ROW_KEY + ("bits",
                                                                          "granularity")))
    for bits in args.bits:
        for gran in ("channel", "tensor"):
            for n, k in SHAPES:
                for m in ms:
                    if run.over_budget((n, k, bits, gran, m)):
                        continue
                    try:
                        sweep_config(run, n, k, bits, gran, m, splits, torch.float16,
                                     args.tensor_cores)
                    except Exception as exc:  # noqa: BLE001 - one config must not end the run
                        run.error(exc, op="linear", bits=bits, granularity=gran, N=n, K=k, M=m)
    run.write(complete=True)
    return 1 if run.meta["fatal_error"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
