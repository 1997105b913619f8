"""AOT-compile the otq Triton kernels for sm_90 on a CPU-only machine (ptxas ships in the wheel).

Catches what TRITON_INTERPRET=1 cannot: compile errors, shared memory per config, registers
and spills (cuobjdump --dump-resource-usage: STACK > 0 means local-memory spills). The GEMV
configs that survive matmul's pruning and every fp16/bf16 tl.dot linear and conv config
must not spill more than MAX_STACK_BYTES: that fails the check.

    python python/triton_aot_check.py [linear|conv|misc|fit ...]   # exit 1 if any fails
    OTQ_AOT_LONG=1 ...   # also the 16384-value fit blocks (slow)
    # against another triton, e.g. the GPU's 3.6: unzip its wheel into DIR, then
    PYTHONPATH=DIR python python/triton_aot_check.py
"""
import os
import subprocess
import sys
import tempfile
import time
import traceback

os.environ.pop("TRITON_INTERPRET", None)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from otq_kernels.backends.triton import conv, dequant, fit, matmul, packing  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/cuobjdump")
ONLY = sys.argv[1:]
FAILED: list[str] = []
# ptxas sometimes trades a few bytes of local memory for occupancy well below the register
# cap (triton 3.6: 8-16 B at 48-128 registers); register-pressure spills are 100s of bytes.
MAX_STACK_BYTES = 16
# 16384-value fit blocks take ~1 min each to compile; only used above OTQ_TRITON_FIT_MAX_N.
LONG_FIT = os.environ.get("OTQ_AOT_LONG") == "1"


def base_fn(f):
    while not isinstance(f, triton.runtime.JITFunction):
        f = f.fn
    return f


def compile_one(name, kernel, types: dict, consts: dict, num_warps=4, num_stages=3,
                no_spill=False, max_shared=None):
    """Compile for sm_90. Pointers are 16-byte aligned; with ``max_shared`` (the big-shape
    check) int arguments are taken as multiples of 16 as well, as Triton specializes them
    at run time for the goal shapes (that is what lets it pipeline more loads)."""
    fn = base_fn(kernel)
    sig, attrs = {}, {}
    for i, a in enumerate(fn.arg_names):
        if a in consts:
            sig[a] = "constexpr"
        else:
            t = types.get(a, "i32")
            sig[a] = t
            if t.startswith("*") or (max_shared is not None and a != "M"):
                attrs[(i,)] = [["tt.divisibility", 16]]
    t0 = time.time()
    try:
        k = triton.compile(ASTSource(fn, sig, consts, attrs), target=TARGET,
                           options={"num_warps": num_warps, "num_stages": num_stages})
    except Exception as e:  # noqa: BLE001
        msg = "".join(traceback.format_exception_only(type(e), e)).strip().splitlines()
        print(f"FAIL {name}: {' | '.join(msg[-6:])[:1500]}", flush=True)
        FAILED.append(name)
        return
    dt = time.time() - t0
    usage = ""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(k.asm["cubin"])
        f.flush()
        out = subprocess.run([CUOBJDUMP, "--dump-resource-usage", f.name], capture_output=True,
                             text=True).stdout
        for line in out.splitlines():
            if "REG" in line:
                usage = " ".join(line.split())
    stack = int(usage.split("STACK:")[1].split()[0]) if "STACK:" in usage else 0
    spills = no_spill and stack > MAX_STACK_BYTES
    too_big = max_shared is not None and k.metadata.shared > max_shared
    status = "FAIL" if spills or too_big else "ok  "
    if status == "FAIL":
        FAILED.append(name)
    print(f"{status} {name}: {dt:.1f}s shared={k.metadata.shared} {usage}"
          + (" (spills in a shipped config)" if spills else "")
          + (f" (needs more than {max_shared} B of shared memory)" if too_big else ""),
          flush=True)


def widths_list():
    return [(4, 2, 1), (8, 0, 0), (2, 0, 0), (4, 0, 0), (2, 1, 0)]


DT = {"fp16": "*fp16", "bf16": "*bf16", "fp32": "*fp32"}
TORCH_DT = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
SM90_MAX_SHARED = 232448  # bytes of shared memory one block may opt in to on sm_90


def gemv_jobs(types: dict, flags: dict) -> list:
    """The GEMV configs that pruning keeps on a large layer, for M tiles of 1, 2 and 8."""
    jobs = []
    widths = (flags["W0"], flags["W1"], flags["W2"])
    for bm in (1, 2, 8):
        args = {"N": 8192, "K": 8192, "BLOCK_M": bm, **flags}
        for c in matmul._prune_gemv(matmul._gemv_configs(), args):
            name = f"gemv W{''.join(map(str, widths))} {c.kwargs} BM{bm} w{c.num_warps}"
            jobs.append((name, matmul._linear_gemv_kernel, types,
                         {**flags, **c.kwargs, "BLOCK_M": bm}, c.num_warps, c.num_stages, True))
    return jobs


def linear_jobs():
    jobs = []
    for dt in ("fp16", "bf16", "fp32"):
        for w0, w1, w2 in widths_list():
            for pc in (True, False):
                types = types_for(dt)
                flags = dict(W0=w0, W1=w1, W2=w2, PER_CHANNEL=pc, HAS_BIAS=True,
                             WRITE_PARTIAL=False)
                if dt == "fp16" and pc:
                    jobs += gemv_jobs(types, flags)
                splitk = matmul._dot_configs("splitk")
                fm_args = {"N": 8192, "K": 8192, "W0": w0, "X_FIELD_MAJOR": True,
                           "x_ptr": torch.empty(0, dtype=TORCH_DT[dt])}
                splitk_fm = matmul._prune_dot(splitk, {**fm_args, "M": 64})
                gemm = matmul._prune_dot(matmul._dot_configs("gemm"), {**fm_args, "M": 8192})
                cfgs = ([(c, False) for c in splitk] + [(c, True) for c in splitk_fm]
                        + [(c, True) for c in gemm])
                if not (dt == "fp16" and pc):
                    cfgs = cfgs[:1] + cfgs[-1:]
                for c, field_major in cfgs:
                    prec = "ieee" if dt == "fp32" else "tf32"
                    name = (f"dot {dt} W{w0}{w1}{w2} {pc=} {field_major=} {c.kwargs} "
                            f"w{c.num_warps}/{c.num_stages}")
                    jobs.append((name, matmul._linear_gemm_kernel, types,
                                 {**flags, **c.kwargs, "DOT_PRECISION": prec,
                                  "X_FIELD_MAJOR": field_major},
                                 c.num_warps, c.num_stages, dt != "fp32", SM90_MAX_SHARED))
                tiles = matmul._tile_configs()
                if not (dt == "fp16" and pc):
                    tiles = tiles[:1]
                for c in tiles:  # gemm_tile: every config per channel in fp16, else one
                    prec = "ieee" if dt == "fp32" else "tf32"
                    name = f"tile {dt} W{w0}{w1}{w2} {pc=} {c.kwargs} w{c.num_warps}/{c.num_stages}"
                    jobs.append((name, matmul._linear_tile_gemm_kernel, types,
                                 {**flags, **c.kwargs, "DOT_PRECISION": prec},
                                 c.num_warps, c.num_stages, dt != "fp32", SM90_MAX_SHARED))
    jobs.append(("gemm fp32 tf32 partial", matmul._linear_gemm_kernel,
                 {"x_ptr": "*fp32", "p0_ptr": "*i32", "p1_ptr": "*i32", "p2_ptr": "*i32",
                  "codebook_ptr": "*fp32", "bias_ptr": "*fp32", "y_ptr": "*fp32"},
                 dict(W0=4, W1=0, W2=0, PER_CHANNEL=False, HAS_BIAS=False, WRITE_PARTIAL=True,
                      DOT_PRECISION="tf32", X_FIELD_MAJOR=False, BLOCK_M=16, BLOCK_N=64,
                      FIELD_K=16, GROUP_M=8), 4, 3))
    jobs.append(("reduce", matmul._splitk_reduce_kernel,
                 {"ws_ptr": "*fp32", "bias_ptr": "*fp16", "y_ptr": "*fp16"},
                 dict(SPLIT_K=4, HAS_BIAS=True, BLOCK=1024), 4, 3))
    return jobs


def types_for(dt: str) -> dict:
    """Pointer types of the linear and conv kernels with activations of dtype ``dt``."""
    return {"x_ptr": DT[dt], "p0_ptr": "*i32", "p1_ptr": "*i32", "p2_ptr": "*i32",
            "codebook_ptr": "*fp32", "bias_ptr": DT[dt], "y_ptr": DT[dt]}


def conv_jobs():
    jobs = []
    for dt in ("fp16", "bf16", "fp32"):
        types = types_for(dt)
        cfgs = conv._conv_configs() if dt == "fp16" else conv._conv_configs()[:1]
        for widths in ((4, 2, 1), (8, 0, 0)) if dt == "fp16" else ((4, 2, 1),):
            for c in cfgs:
                for kh in (3, 1):
                    flags = dict(W0=widths[0], W1=widths[1], W2=widths[2], PER_CHANNEL=True,
                                 HAS_BIAS=True, DOT_PRECISION="ieee" if dt == "fp32" else "tf32",
                                 KH=kh, KW=kh)
                    name = f"conv {dt} W{''.join(map(str, widths))} k{kh} {c.kwargs} w{c.num_warps}"
                    jobs.append((name, conv._conv2d_kernel, types, {**flags, **c.kwargs},
                                 c.num_warps, c.num_stages, dt != "fp32"))
    c = conv._conv_configs()[0]  # split channel blocks: float32 partials, no bias
    jobs.append(("conv fp16 W421 k3 partials", conv._conv2d_kernel,
                 {**types_for("fp16"), "y_ptr": "*fp32"},
                 dict(W0=4, W1=2, W2=1, PER_CHANNEL=True, HAS_BIAS=False, DOT_PRECISION="tf32",
                      KH=3, KW=3, **c.kwargs), c.num_warps, c.num_stages, True))
    for c in conv._conv_configs():  # channels-last x: unit channel stride, vector loads
        jobs.append((f"conv fp16 W421 k3 nhwc {c.kwargs}", conv._conv2d_kernel, types_for("fp16"),
                     dict(W0=4, W1=2, W2=1, PER_CHANNEL=True, HAS_BIAS=True, DOT_PRECISION="tf32",
                          KH=3, KW=3, stride_xc=1, **c.kwargs), c.num_warps, c.num_stages, True))
    return jobs


def misc_jobs():
    jobs = []
    for w in widths_list():
        for dt, walk in (("fp16", False), ("fp16", True), ("fp32", False)):
            jobs.append((f"dequant {dt} W{w} walk_k={walk}", dequant._dequantize_kernel,
                         {"p0_ptr": "*i32", "p1_ptr": "*i32", "p2_ptr": "*i32",
                          "codebook_ptr": "*fp32", "out_ptr": DT[dt]},
                         dict(W0=w[0], W1=w[1], W2=w[2], PER_CHANNEL=True, WALK_K=walk,
                              BLOCK_N=32, BLOCK_K=128), 4, 3))
        types = {"codes_ptr": "*i64", "p0_ptr": "*i32", "p1_ptr": "*i32", "p2_ptr": "*i32"}
        jobs.append((f"pack W{w}", packing._pack_kernel, types,
                     dict(W0=w[0], W1=w[1], W2=w[2], BLOCK_K=256), 4, 3))
        jobs.append((f"unpack W{w}", packing._unpack_kernel, types,
                     dict(W0=w[0], W1=w[1], W2=w[2], BLOCK_K=256), 4, 3))
    return jobs


def fit_jobs():
    jobs = []
    for block in (2, 128, 1024, 4096) + ((16384,) if LONG_FIT else ()):
        for dt, key16 in (("fp32", False), ("fp16", True), ("bf16", True)):
            for nearest in (False, True):
                if block == 16384 and dt == "bf16":
                    continue
                for bits in ((8,) if block >= 4096 else (2, 8)):
                    block_r = max(1, min(2048 // max(block, 2**bits), 4096))
                    jobs.append((f"fit {dt} B{block}x{block_r} bits{bits} nearest={nearest}",
                                 fit._fit_rows_kernel,
                                 {"x_ptr": DT[dt], "codes_ptr": "*i64", "cent_ptr": "*fp32"},
                                 dict(BITS=bits, BLOCK=block, BLOCK_R=block_r, NEAREST=nearest,
                                      KEY16=key16), fit._num_warps(block * block_r), 3))
    return jobs


ALL = {"linear": linear_jobs, "conv": conv_jobs, "misc": misc_jobs, "fit": fit_jobs}
if __name__ == "__main__":
    print("triton", triton.__version__, flush=True)
    for group in (ONLY or list(ALL)):
        jobs = ALL[group]()
        print(f"== {group}: {len(jobs)} kernels", flush=True)
        for job in jobs:
            compile_one(*job)
    print(f"triton_aot_check: {len(FAILED)} kernel(s) failed to compile", flush=True)
    sys.exit(1 if FAILED else 0)
