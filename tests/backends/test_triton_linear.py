"""Fused Triton codebook linear (gemv / splitk / gemm) against the reference backend."""

import pytest
import torch

triton = pytest.importorskip("triton")

from _triton_tolerance import DTYPES, assert_matches_reference, make_qt, randn  # noqa: E402

import otq_kernels as otq  # noqa: E402
from otq_kernels.backends import reference  # noqa: E402
from otq_kernels.backends.triton import matmul  # noqa: E402
from otq_kernels.backends.triton.matmul import KERNELS, choose_kernel, linear_triton  # noqa: E402


def check_linear(m, n, k, bits, granularity, dtype, device, with_bias=True, **options):
    """linear_triton on random inputs vs the reference backend (same codes)."""
    qt = make_qt((n, k), bits, granularity, device, seed=bits * 100 + n + k)
    x = randn((m, k), device, dtype, seed=m)
    bias = randn((n,), device, dtype, seed=7) if with_bias else None
    y = linear_triton(x, qt, bias, **options)
    truth = reference.linear(x.double(), qt, None if bias is None else bias.double())
    assert_matches_reference(y, reference.linear(x, qt, bias), truth, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("granularity", ["tensor", "channel"])
@pytest.mark.parametrize("bits", range(2, 9))
def test_every_bit_width(bits, granularity, kernel, dtype, device):
    m = 5 if kernel == "gemv" else 20
    check_linear(m, 9, 70, bits, granularity, dtype, device, with_bias=bits % 2 == 0,
                 kernel=kernel)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,k", [(1, 1), (7, 33), (33, 127), (33, 7)])
@pytest.mark.parametrize("m", [1, 2, 3, 7, 16, 33, 128])
def test_odd_shapes_auto_dispatch(m, n, k, dtype, device):
    check_linear(m, n, k, 3, "channel", dtype, device, with_bias=(m + n) % 2 == 1)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("split_k", [1, 2, 3, 5])
@pytest.mark.parametrize("kernel", ["gemv", "splitk", "splitk_fm"])
def test_split_k(kernel, split_k, dtype, device):
    m = 3 if kernel == "gemv" else 17
    check_linear(m, 7, 161, 7, "tensor", dtype, device, kernel=kernel, split_k=split_k)


@pytest.mark.parametrize("split_k", [-1, 0, 2.0, True])
@pytest.mark.parametrize("kernel", ["gemv", "gemm"])
def test_split_k_must_be_positive(kernel, split_k, device):
    """A ValueError (split_k=-1 made a grid with no program: y came back uninitialised)."""
    qt = make_qt((7, 33), 3, "tensor", device)
    with pytest.raises(ValueError, match="split_k must be a positive int"):
        linear_triton(randn((2, 33), device, torch.float32), qt, kernel=kernel,
                      split_k=split_k)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k", [7, 33])
def test_identity_reproduces_weight(k, dtype, kernel, device):
    qt = make_qt((11, k), 5, "channel", device)
    eye = torch.eye(k, device=device, dtype=dtype)
    y = linear_triton(eye, qt, None, kernel=kernel)
    assert torch.equal(y, qt.dequantize(dtype).T)


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("block_n,block_k", [(8, 128), (16, 256)])
def test_gemv_gpu_tiles(block_n, block_k, bits, monkeypatch, device):
    """The GEMV with GPU-size K tiles (several words per plane, W0 // W repeats) and a K
    tail, vs the reference: the interpreter's own config only has BLOCK_K = 32."""
    config = triton.Config({"BLOCK_N": block_n, "BLOCK_K": block_k}, num_warps=1)
    tuned = triton.autotune([config], key=["M"])(matmul._linear_gemv_kernel)
    monkeypatch.setattr(matmul, "_gemv_tuned", tuned)
    check_linear(3, 19, 2 * block_k + 45, bits, "channel", torch.float32, device,
                 kernel="gemv", split_k=1)


@pytest.mark.parametrize("w0", [8, 4, 2, 1])
def test_field_major_puts_each_fields_columns_together(w0):
    fields, k = 32 // w0, 300
    x = torch.randn(3, k)
    x_fm = matmul.field_major(x, w0)
    tile = matmul.FIELD_K * fields
    assert x_fm.shape == (3, -(-k // tile) * tile)
    for col in range(x_fm.shape[1]):
        t, j, w = col // tile, col % tile // matmul.FIELD_K, col % matmul.FIELD_K
        src = t * tile + w * fields + j
        want = x[:, src] if src < k else torch.zeros(3)
        assert torch.equal(x_fm[:, col], want), (col, src)


def test_x_layouts_are_tuned_apart():
    """A config tuned for strided x may not fit field-major x's shared memory."""
    assert "X_FIELD_MAJOR" in matmul._gemm_tuned.keys
    assert "X_FIELD_MAJOR" in matmul._splitk_tuned.keys
    config = triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "FIELD_K": 16, "GROUP_M": 8},
                           num_warps=8, num_stages=3)
    args = {"M": 4096, "N": 4096, "K": 4096, "W0": 2, "x_ptr": torch.empty(0).half()}
    assert matmul._prune_dot([config], {**args, "X_FIELD_MAJOR": False}) == [config]
    assert matmul.x_stage_bytes(config, 2, 2) > matmul.X_STAGE_LIMIT
    smaller = triton.Config({**config.kwargs, "BLOCK_M": 64}, num_warps=8, num_stages=3)
    assert matmul._prune_dot([config, smaller], {**args, "X_FIELD_MAJOR": True}) == [smaller]


@pytest.mark.parametrize("kernel", ["splitk", "splitk_fm", "gemm", "gemm_strided"])
@pytest.mark.parametrize("bits", range(2, 9))
def test_dot_several_k_tiles(bits, kernel, device):
    """Per-field tl.dot kernels over 3+ K tiles (2-bit tiles are 256 wide) and a K tail."""
    check_linear(20, 19, 600, bits, "tensor" if bits % 2 else "channel", torch.float32, device,
                 kernel=kernel, split_k=1)


@pytest.mark.parametrize("bits", [2, 3, 4, 7, 8])
def test_shipped_gemv_tiles_fit_registers(bits, monkeypatch):
    """Pruning keeps at least one GPU tile for every M tile and width, all within the
    register model that python/triton_aot_check.py holds to (no spills on sm_90)."""
    monkeypatch.setattr(matmul, "INTERPRET", False)  # the GPU config list
    widths = (otq.plane_widths(bits) + [0, 0])[:3]
    for block_m in (1, 2, 4, 8):
        args = {"N": 8192, "K": 8192, "BLOCK_M": block_m, "W0": widths[0], "W1": widths[1],
                "W2": widths[2]}
        kept = matmul._prune_gemv(matmul._gemv_configs(), args)
        assert kept
        for c in kept:
            assert matmul.gemv_fits_registers(block_m, c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"],
                                              widths, c.num_warps)


def test_non_contiguous_input(device):
    qt = make_qt((9, 40), 4, "channel", device)
    x = randn((40, 6), device, torch.float32).T
    assert not x.is_contiguous()
    torch.testing.assert_close(linear_triton(x, qt), reference.linear(x, qt, None))


def test_through_ops_with_leading_dims(device):
    qt = make_qt((9, 40), 4, "tensor", device)
    x = randn((2, 3, 40), device, torch.float32)
    bias = randn((9,), device, torch.float32)
    y = otq.ops.codebook_linear(x, qt, bias, backend="triton")
    torch.testing.assert_close(y, reference.linear(x.reshape(6, 40), qt, bias).reshape(2, 3, 9))


def test_dispatch_by_m():
    assert [choose_kernel(m) for m in (1, 8, 9, 64, 65, 4096)] == \
        ["gemv", "gemv", "splitk", "splitk", "gemm", "gemm"]


@pytest.mark.parametrize("flag, tuned", [
    ("triton_splitk_field_major", ["gemv", "splitk_fm", "splitk_fm", "gemm", "gemm"]),
    ("triton_gemm_tile", ["gemv", "splitk", "splitk", "gemm_tile", "gemm_tile"])],
    ids=["splitk_fm", "gemm_tile"])
def test_kernel_choice_follows_tuning_table(flag, tuned, monkeypatch):
    """The GPU's flag swaps one kernel for its tuned variant at the M it covers (M = 8, 9,
    64, 65, 4096), nothing else; absent (the shipped table), without a GPU or for another
    GPU: the default kernels."""
    from otq_kernels import ops
    from otq_kernels.backends import _device

    assert not ops.tuning_table("some unknown GPU")["linear"].get(flag, False)
    gpu, cpu = torch.device("cuda", 0), torch.device("cpu")
    grid, default = (8, 9, 64, 65, 4096), ["gemv", "splitk", "splitk", "gemm", "gemm"]
    monkeypatch.setattr(_device, "gpu_name", lambda device: "GPU X")
    monkeypatch.setattr(ops, "tuning_table", lambda name: {"linear": {flag: name == "GPU X"}})
    assert [choose_kernel(m, gpu) for m in grid] == tuned
    assert [choose_kernel(m, cpu) for m in grid] == default
    monkeypatch.setattr(_device, "gpu_name", lambda device: "GPU Y")
    assert [choose_kernel(m, gpu) for m in grid] == default


@pytest.mark.parametrize("tuned", [False, True])
def test_auto_dispatch_runs_tuned_splitk_layout(tuned, monkeypatch, device):
    """With no kernel forced, M = 20 reads field_major(x) exactly when tuning says so."""
    calls = []
    real = matmul.field_major
    monkeypatch.setattr(matmul, "_tuned", lambda dev, flag: tuned)
    monkeypatch.setattr(matmul, "field_major", lambda x, w0: calls.append(w0) or real(x, w0))
    check_linear(20, 9, 70, 2, "channel", torch.float32, device)
    assert calls == ([2] if tuned else [])


@pytest.mark.parametrize("tuned", [False, True])
def test_auto_dispatch_runs_tuned_gemm_kernel(tuned, monkeypatch, device):
    """With no kernel forced, M = 70 runs gemm_tile exactly when tuning says so (and the
    result matches the reference either way)."""
    launched = []
    real = matmul._launch
    monkeypatch.setattr(matmul, "_tuned", lambda dev, flag: tuned and flag == "triton_gemm_tile")
    monkeypatch.setattr(matmul, "_launch", lambda kernel, *a: launched.append(kernel) or real(
        kernel, *a))
    check_linear(70, 9, 40, 3, "tensor", torch.float32, device)
    assert launched == ["gemm_tile" if tuned else "gemm"]


def test_unknown_kernel_rejected(device):
    qt = make_qt((4, 8), 2, "tensor", device)
    with pytest.raises(ValueError, match="unknown kernel"):
        linear_triton(randn((1, 8), device, torch.float32), qt, kernel="magic")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter runs on CPU-only machines")
@pytest.mark.parametrize("m", [1, 20], ids=["gemv", "splitk"])
def test_interpreter_refuses_bfloat16(m):
    """The interpreter's tl.dot multiplies bfloat16 bit patterns (values near 1e10): the
    backend refuses bfloat16 x on CPU with a clear error, and auto runs it elsewhere."""
    qt = make_qt((9, 40), 4, "channel", "cpu")
    x, bias = randn((m, 40), "cpu", torch.bfloat16), randn((9,), "cpu", torch.bfloat16)
    with pytest.raises(ValueError, match="interpreter .* no bfloat16"):
        otq.ops.codebook_linear(x, qt, bias, backend="triton")
    truth = reference.linear(x.double(), qt, bias.double())
    assert_matches_reference(otq.ops.codebook_linear(x, qt, bias), reference.linear(x, qt, bias),
                             truth, torch.bfloat16)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available()
                    or torch.cuda.get_device_properties(0).total_memory < 16 * 2**30,
                    reason="needs a GPU with 16 GiB")
@pytest.mark.parametrize("kernel", KERNELS)
def test_activation_offsets_past_2_31(kernel):
    """x rows strided so that row * stride_xm passes 2**31 elements (int64 row offsets)."""
    device = torch.device("cuda")
    m, k, stride = 17, 64, 2**27  # row 16 starts at element 2**31
    base = torch.zeros((m - 1) * stride + k, dtype=torch.float16, device=device)
    x = base.as_strided((m, k), (stride, 1))
    x.copy_(randn((m, k), device, torch.float16))
    qt = make_qt((32, k), 4, "channel", device)
    y = linear_triton(x, qt, kernel=kernel)
    torch.testing.assert_close(y, reference.linear(x.contiguous(), qt, None), rtol=1e-2, atol=1e-2)


@pytest.mark.cuda
@pytest.mark.parametrize("m", [1, 20, 100])  # gemv with split-K workspace, splitk, gemm
def test_cuda_graph_capture_after_warmup(m):
    """A warmed-up call (autotuned, compiled) captures in a CUDA graph and replays exactly.

    Autotuning benchmarks synchronize, which capture forbids: the first call for a shape
    must happen outside capture (benchmarks/gpu_checks.py and torch.compile both do this).
    """
    device = torch.device("cuda")
    qt = make_qt((256, 1024), 4, "channel", device)
    x = randn((m, 1024), device, torch.float16)
    bias = randn((256,), device, torch.float16)
    eager = linear_triton(x, qt, bias)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        linear_triton(x, qt, bias)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = linear_triton(x, qt, bias)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(y, eager)


@pytest.mark.parametrize("kernel,reorders", [("splitk", False), ("splitk_fm", True),
                                             ("gemm", True), ("gemm_strided", False)])
def test_which_kernels_read_field_major_x(kernel, reorders, monkeypatch, device):
    """The *_fm / gemm kernels run on field_major(x), the strided ones on x itself."""
    calls = []
    real = matmul.field_major
    monkeypatch.setattr(matmul, "field_major", lambda x, w0: calls.append(w0) or real(x, w0))
    check_linear(20, 9, 70, 4, "channel", torch.float32, device, kernel=kernel)
    assert calls == ([4] if reorders else [])


# ------------------------------------------------ pinned by a mutation campaign (session 70)
def test_dot_pruning_keeps_the_tiles_the_problem_fills(monkeypatch):
    """_prune_dot on the shipped splitk tiles: BLOCK_M and BLOCK_N no larger than the
    (power-of-two rounded, at least 16) problem, each bound on its own dimension."""
    monkeypatch.setattr(matmul, "INTERPRET", False)  # the GPU config list
    configs = matmul._dot_configs("splitk")
    args = {"K": 4096, "W0": 4, "x_ptr": torch.empty(0).half(), "X_FIELD_MAJOR": False}

    def kept(m, n):
        return sorted((c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"])
                      for c in matmul._prune_dot(configs, {**args, "M": m, "N": n}))

    assert kept(16, 64) == [(16, 64)]
    assert kept(16, 4096) == [(16, 64), (16, 128)]
    assert kept(40, 100) == [(16, 64), (16, 128), (32, 64), (64, 64), (64, 128)]
    assert matmul._fits(16, 1) and matmul._fits(32, 17) and not matmul._fits(32, 16)
    for m, n, want in ((64, 4096, [(64, 128)]), (128, 64, [(128, 64)]),
                       (16, 16, [(64, 128)])):  # none fits: the smallest tile
        tiles = matmul._prune_tile(matmul._tile_configs(), {"M": m, "N": n})
        assert [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) for c in tiles] == want


def test_field_major_tiles_fit_shared_memory_at_every_width(monkeypatch):
    """x_stage_bytes: num_stages x [BLOCK_M, FIELD_K * 32 // W0] activations; the 128-row
    gemm tiles fit X_STAGE_LIMIT at 8 bits (64-column K tiles), not at 2 (256)."""
    monkeypatch.setattr(matmul, "INTERPRET", False)
    configs = matmul._dot_configs("gemm")
    for w0, block_k in ((8, 64), (4, 128), (2, 256), (1, 512)):
        for c in configs:
            assert matmul.x_stage_bytes(c, w0, 2) == (c.num_stages * c.kwargs["BLOCK_M"]
                                                      * block_k * 2)
    args = {"M": 4096, "N": 4096, "K": 4096, "x_ptr": torch.empty(0).half(),
            "X_FIELD_MAJOR": True}
    wide = {w0: [c.kwargs["BLOCK_M"] for c in matmul._prune_dot(configs, {**args, "W0": w0})]
            for w0 in (8, 2)}
    assert 128 in wide[8] and 128 not in wide[2] and wide[2]


@pytest.mark.parametrize("allow_tf32", [False, True])
def test_dot_precision_follows_torchs_tf32_switch_for_float32_only(allow_tf32):
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = allow_tf32  # (monkeypatch cannot restore it)
    try:
        assert matmul._dot_precision(torch.float32) == ("tf32" if allow_tf32 else "ieee")
        assert matmul._dot_precision(torch.float16) == "tf32"
        assert matmul._dot_precision(torch.bfloat16) == "tf32"
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


# ------------------------------------------------ pinned by a mutation campaign (session 71)
@pytest.mark.parametrize("kernel", KERNELS)
def test_activation_rows_strided_past_k(kernel, device):
    """x a column slice of a wider tensor (row stride K + 5, read in place, not copied):
    the kernels step x's rows by stride_xm (stepping by K passed every other CPU test)."""
    qt = make_qt((9, 40), 4, "channel", device)
    x = randn((5 if kernel == "gemv" else 20, 45), device, torch.float32)[:, :40]
    assert x.stride() == (45, 1)
    torch.testing.assert_close(linear_triton(x, qt, kernel=kernel), reference.linear(x, qt, None))
