"""The CUDA sources (csrc/cuda) run on the CPU through the host emulation in
tests/cuda_emulation, against format.py, ot_rows and the reference backend.

No GPU is needed: the kernels are built with the host compiler and every CUDA thread is
a std::thread (see _cuda_emulation.py). The same checks with real kernels are in
test_cuda_backend.py (GPU only). Buffers are sized exactly and pre-filled with NaN / -1,
so a kernel that skips or overruns an element shows up; the sanitizer tests rerun a
sample under AddressSanitizer+UBSan and ThreadSanitizer.
"""

import gc
import itertools
import os
import subprocess
import sys
import weakref
from pathlib import Path

import pytest
import torch
from _cuda_emulation import ROOT, Emulated, build, compiler
from _triton_tolerance import assert_matches_reference, make_qt, randn

from otq_kernels.backends import reference
from otq_kernels.format import pack_codes
from otq_kernels.quantizers import ot_rows

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
BUILD_DIR = ROOT / "build" / "cuda_emulation"


@pytest.fixture(scope="module")
def emulated() -> Emulated:
    if compiler() is None:
        pytest.skip("no host C++ compiler for the CUDA emulation")
    return Emulated(build(BUILD_DIR))


def check_linear(emu, m, n, k, bits, granularity, dtype, with_bias, split_k=1, x=None,
                 tensor_cores=False, fragment=False, block_rows=16):
    qt = make_qt((n, k), bits, granularity, "cpu", seed=bits * 100 + n + k)
    x = randn((m, k), "cpu", dtype, seed=m) if x is None else x
    bias = randn((n,), "cpu", dtype, seed=n) if with_bias else None
    y = emu.linear(x, qt, bias, split_k=split_k, tensor_cores=tensor_cores, fragment=fragment,
                   block_rows=block_rows)
    truth = reference.linear(x.double(), qt, None if bias is None else bias.double())
    assert_matches_reference(y, reference.linear(x, qt, bias), truth, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("granularity", ["tensor", "channel"])
@pytest.mark.parametrize("bits", range(2, 9))
def test_linear_every_bit_width(emulated, bits, granularity, dtype):
    check_linear(emulated, 3, 21, 100, bits, granularity, dtype, with_bias=True)


@pytest.mark.parametrize("bits", range(2, 9))
def test_linear_split_k(emulated, bits):
    """split_k 3 over 10 groups: uneven splits, fp32 partials, fix-up kernel with bias."""
    check_linear(emulated, 2, 19, 300, bits, "channel", torch.float16, True, split_k=3)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("granularity", ["tensor", "channel"])
@pytest.mark.parametrize("bits", range(2, 9))
def test_linear_one_row(emulated, bits, granularity, dtype):
    """M = 1 runs the one-row kernels, which load a step ahead: 2100 columns are 66 groups
    (2-3 steps per lane, a partial last group); split_k 2 ends one split mid-step."""
    check_linear(emulated, 1, 5, 2100, bits, granularity, dtype, with_bias=True)
    check_linear(emulated, 1, 5, 2100, bits, granularity, dtype, with_bias=True, split_k=2)


@pytest.mark.parametrize("n,k", [(1, 1), (7, 33), (17, 64), (33, 7)])
def test_linear_odd_shapes(emulated, n, k):
    check_linear(emulated, 2, n, k, 5, "channel", torch.float32, True)


@pytest.mark.parametrize("bits", [2, 3, 5, 6, 7])
@pytest.mark.parametrize("k", [32, 96, 160])
def test_linear_plane_rows_of_few_words(emulated, k, bits):
    """K_pad/32 odd: 1-bit rows are 4-byte, 2-bit rows 8-byte aligned (uint2/scalar loads)."""
    check_linear(emulated, 9, 17, k, bits, "tensor", torch.float16, True, split_k=2)


def test_linear_larger_m_runs_in_chunks(emulated):
    check_linear(emulated, 11, 9, 40, 3, "tensor", torch.bfloat16, True, split_k=2)


def test_linear_split_k_above_group_count(emulated):
    """A forced split_k above the K groups is clamped to one group per split."""
    check_linear(emulated, 1, 5, 96, 4, "tensor", torch.float32, False, split_k=64)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_linear_unaligned_activations(emulated, dtype):
    """x not 16-byte aligned: the kernel must take its scalar path (a vector load would fault)."""
    x = randn((2, 129), "cpu", dtype)[:, 1:]
    assert x.data_ptr() % 16
    check_linear(emulated, 2, 9, 128, 4, "tensor", dtype, False, x=x)


MMA_DTYPES = [torch.float16, torch.bfloat16]


@pytest.mark.parametrize("dtype", MMA_DTYPES, ids=str)
@pytest.mark.parametrize("granularity", ["tensor", "channel"])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_mma_every_bit_width(emulated, bits, granularity, dtype):
    """The tensor-core kernel (lut_mma.cu): 21 rows = a full and a partial 16-row tile."""
    check_linear(emulated, 3, 21, 100, bits, granularity, dtype, True, tensor_cores=True)


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("m,n,k,split_k", [(1, 16, 32, 1), (8, 5, 7, 1), (2, 33, 300, 3),
                                           (11, 17, 96, 2), (16, 9, 64, 1), (20, 3, 40, 2),
                                           (1, 7, 1000, 64)])
def test_mma_shapes_splits_and_m_chunks(emulated, m, n, k, split_k, bits):
    """Odd K tails (x masked past K), fewer rows than a tile, split-K, two n-tiles (M 9..16)
    and M > 16 in launches of 16; each bit width has its own table-byte extraction."""
    check_linear(emulated, m, n, k, bits, "channel", torch.float16, True, split_k=split_k,
                 tensor_cores=True)


@pytest.mark.parametrize("granularity", ["tensor", "channel"])
@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("m,k,split_k", [(3, 5000, 1), (16, 5000, 2), (1, 1040, 1),
                                         (1, 5000, 2)])
def test_mma_loads_ahead_over_long_k(emulated, m, k, split_k, bits, granularity):
    """Long K: each warp's whole spans (2 groups; 4 at M = 1) run in chunks loaded ahead,
    then the rest in step, and the groups outside whole spans one at a time. 5000 columns
    are 156 whole groups and a partial one; split_k 2 gives 79 per split, so the second
    split starts at an odd group (one lone group before its spans, 3 after the first
    split's at M = 1). 1040 columns are 32 whole groups and a partial one."""
    check_linear(emulated, m, 17, k, bits, granularity, torch.float16, True, split_k=split_k,
                 tensor_cores=True)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_mma_unaligned_activations(emulated, bits):
    """x 4- but not 16-byte aligned, or rows of K % 8 != 0 columns: each lane's 8 columns
    of a group are no 16-byte vector, so the kernel must take its masked pair loads."""
    x = randn((3, 129), "cpu", torch.float16)[:, 1:]
    assert x.data_ptr() % 16
    check_linear(emulated, 3, 17, 128, bits, "channel", torch.float16, True, x=x,
                 tensor_cores=True)
    check_linear(emulated, 3, 17, 4100, bits, "tensor", torch.float16, True,
                 tensor_cores=True)


@pytest.mark.parametrize("fragment", [False, True], ids=["canonical", "fragment"])
@pytest.mark.parametrize("dtype,bits,granularity", [(torch.float32, 4, "tensor"),
                                                    (torch.float16, 5, "tensor"),
                                                    (torch.float16, 8, "channel")], ids=str)
def test_mma_rejects_what_it_cannot_run(emulated, dtype, bits, granularity, fragment):
    qt = make_qt((4, 40), bits, granularity, "cpu")
    with pytest.raises(RuntimeError, match="invalid argument"):
        emulated.linear(torch.randn(1, 40).to(dtype), qt, None, tensor_cores=True,
                        fragment=fragment)


@pytest.mark.parametrize("dtype", MMA_DTYPES, ids=str)
@pytest.mark.parametrize("m,n,k,split_k", [(1, 21, 100, 1), (3, 33, 300, 3), (1, 17, 5000, 1),
                                           (16, 17, 5000, 2), (20, 9, 1536, 1)])
def test_frag_eight_bits_per_tensor(emulated, m, n, k, split_k, dtype):
    """8-bit codes with one codebook per layer on fragment-order codes: a table of single
    entries, two look-ups per A register; partial spans, splits, long K loaded ahead (2
    spans of 16 words per lane), two n-tiles and M > 16."""
    check_linear(emulated, m, n, k, 8, "tensor", dtype, True, split_k=split_k, fragment=True)


@pytest.mark.parametrize("dtype", MMA_DTYPES, ids=str)
@pytest.mark.parametrize("granularity", ["tensor", "channel"])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_frag_every_bit_width(emulated, bits, granularity, dtype):
    """lut_frag.cu (fragment-order codes): 21 rows = a full and a partial 16-row block, 100
    columns = one partial span."""
    check_linear(emulated, 3, 21, 100, bits, granularity, dtype, True, fragment=True)


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("m,n,k,split_k", [(1, 16, 32, 1), (8, 5, 7, 1), (2, 33, 300, 3),
                                           (11, 17, 96, 2), (16, 9, 64, 1), (20, 3, 40, 2),
                                           (1, 7, 1000, 64), (9, 40, 1536, 3)])
def test_frag_shapes_splits_and_m_chunks(emulated, m, n, k, split_k, bits):
    """Odd K tails (x masked in the last span), fewer rows than a block, splits on span
    boundaries (300 columns: 3 spans over 3 splits; split_k 64 over 8 spans: one each;
    1536 = 12 spans over 3 splits of 4: one per warp), two n-tiles (M 9..16), M > 16 in
    launches of 16."""
    check_linear(emulated, m, n, k, bits, "channel", torch.float16, True, split_k=split_k,
                 fragment=True)


@pytest.mark.parametrize("granularity", ["tensor", "channel"])
@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("m,k,split_k", [(1, 5000, 1), (16, 5000, 2), (3, 4096, 1)])
def test_frag_loads_ahead_over_long_k(emulated, m, k, split_k, bits, granularity):
    """Long K: each warp's spans run with their words loaded 2 (4 bits) or 4 spans ahead
    and x one span ahead. 5000 columns are 39 whole spans and a partial one (10 per warp,
    the last warp's last span masked); split_k 2 gives 20 spans per split; 4096 columns
    are 32 whole spans, 8 per warp: whole chunks of loads ahead at every width."""
    check_linear(emulated, m, 17, k, bits, granularity, torch.float16, True, split_k=split_k,
                 fragment=True)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_frag_unaligned_activations(emulated, bits):
    """x not 16-byte aligned, or K % 8 != 0: every span takes the masked pair loads."""
    x = randn((3, 257), "cpu", torch.float16)[:, 1:]
    assert x.data_ptr() % 16
    check_linear(emulated, 3, 17, 256, bits, "channel", torch.float16, True, x=x,
                 fragment=True)
    check_linear(emulated, 3, 17, 4100, bits, "tensor", torch.float16, True, fragment=True)


# The codes 32-row blocks take (cuda.wide_blocks_support): (bits, granularity).
WIDE_CODES = [(2, "tensor"), (2, "channel"), (3, "tensor"), (3, "channel"), (4, "tensor"),
              (8, "tensor")]


@pytest.mark.parametrize("dtype", MMA_DTYPES, ids=str)
@pytest.mark.parametrize("bits,granularity", WIDE_CODES, ids=str)
@pytest.mark.parametrize("m,n", [(3, 21), (16, 40), (9, 64)])
def test_frag_32_row_blocks(emulated, m, n, bits, granularity, dtype):
    """Blocks of two 16-row blocks, each warp's x fragments serving both: 21 rows = one
    block whose second row block is partial; 40 rows = 3 row blocks, so the second block's
    second row block lies past the layout (it reads the last one and stores nothing);
    64 rows = two whole blocks; one and two n-tiles; per-channel tables of both row blocks
    (3 bits) or register tables (2 bits)."""
    check_linear(emulated, m, n, 100, bits, granularity, dtype, True, fragment=True,
                 block_rows=32)


@pytest.mark.parametrize("bits,granularity", WIDE_CODES, ids=str)
@pytest.mark.parametrize("m,k,split_k", [(1, 5000, 1), (16, 5000, 2), (20, 4100, 3)])
def test_frag_32_row_blocks_long_k_and_splits(emulated, m, k, split_k, bits, granularity):
    """Long K with 32-row blocks: words loaded 1 (4 and 8 bits) or 2 spans ahead per
    warp, x one span ahead, the masked last span; splits on span boundaries; M > 16 in
    launches of 16 (the last with one n-tile)."""
    check_linear(emulated, m, 33, k, bits, granularity, torch.float16, True, split_k=split_k,
                 fragment=True, block_rows=32)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_frag_32_row_blocks_unaligned_activations(emulated, bits):
    """x not 16-byte aligned: every span takes the masked pair loads."""
    x = randn((3, 257), "cpu", torch.float16)[:, 1:]
    assert x.data_ptr() % 16
    check_linear(emulated, 3, 40, 256, bits, "tensor", torch.float16, True, x=x,
                 fragment=True, block_rows=32)


@pytest.mark.parametrize("bits,granularity,block_rows", [(4, "channel", 32), (2, "tensor", 24),
                                                        (3, "channel", 0)], ids=str)
def test_frag_rejects_block_rows_it_cannot_run(emulated, bits, granularity, block_rows):
    """The launcher refuses per-channel 4-bit codes in 32-row blocks (two 64 KB table
    sets) and any other row count than 16 or 32."""
    qt = make_qt((4, 40), bits, granularity, "cpu")
    x = torch.randn(1, 40).half()
    with pytest.raises(RuntimeError, match="invalid argument"):
        emulated.linear(x, qt, None, fragment=True, block_rows=block_rows)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_fragment_planes_layout_and_cache(bits):
    """The fragment-order layout (launchers.h, lut_linear_frag): every code read back from
    its lane, row and column; padding codes 0; cached until the planes change in place."""
    from otq_kernels.backends.cuda import _RUNTIME_LAYOUTS, fragment_planes
    from otq_kernels.format import plane_widths, unpack_planes

    n, k = 21, 300  # 2 row blocks (the second partial), 3 spans (the last partial)
    qt = make_qt((n, k), bits, "channel", "cpu")
    planes = fragment_planes(qt)
    codes = unpack_planes(qt.planes, bits, k).tolist()
    got = [[[[0] * 64 for _ in range(32)] for _ in range(3)] for _ in range(2)]
    offset = 0
    for plane, w in zip(planes, plane_widths(bits), strict=True):
        q = 2 if w == 1 else 4
        assert plane.shape == (2, 3, 2 * w // q, 32, q) and plane.dtype == torch.int32
        words = plane.transpose(2, 3).reshape(2, 3, 32, 2 * w).tolist()  # a lane's words
        for b, s, lane, j in itertools.product(range(2), range(3), range(32), range(64)):
            field = (words[b][s][lane][j * w // 32] >> (j * w % 32)) & ((1 << w) - 1)
            got[b][s][lane][j] |= field << offset
        offset += w
    for b, s, lane, r, i, c in itertools.product(range(2), range(3), range(32), range(2),
                                                 range(4), range(8)):
        g, t = divmod(lane, 4)
        row, col = 16 * b + g + 8 * r, 128 * s + 32 * i + 8 * t + c
        want = codes[row][col] if row < n and col < k else 0
        assert got[b][s][lane][32 * r + 8 * i + c] == want, (b, s, lane, r, i, c)
    assert fragment_planes(qt) is planes
    key = ("fragment", id(qt.planes[0]))
    assert key in _RUNTIME_LAYOUTS
    del qt
    gc.collect()
    assert key not in _RUNTIME_LAYOUTS


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_runtime_layouts_build_in_bounded_row_chunks(bits, monkeypatch):
    """With a chunk of 2 row blocks' codes, both layouts of an odd-shaped layer are built
    in steps (no unpack sees more rows than a chunk, the last chunk partial) and equal the
    one-step build."""
    from otq_kernels import ops
    from otq_kernels.backends import cuda

    linear = make_qt((70, 300), bits, "channel", "cpu")  # 5 row blocks, the last partial
    conv = make_qt((37, 5, 3, 3), bits, "tensor", "cpu")
    whole = [cuda._build_fragment(linear), cuda._build_tap_major(conv)]
    unpacked_rows = []
    real_unpack = ops.unpack
    monkeypatch.setattr(ops, "unpack", lambda qt, backend=None, rows=None: (
        unpacked_rows.append(rows.stop - rows.start), real_unpack(qt, backend, rows))[1])
    for qt, build_layout, want in zip((linear, conv),
                                      (cuda._build_fragment, cuda._build_tap_major), whole,
                                      strict=True):
        unpacked_rows.clear()
        monkeypatch.setattr(cuda, "LAYOUT_CHUNK_CODES", 2 * cuda.ROWS_PER_BLOCK * qt.k)
        assert all(torch.equal(a, b) for a, b in zip(build_layout(qt), want, strict=True))
        blocks = -(-qt.n // cuda.ROWS_PER_BLOCK)
        assert unpacked_rows == [32] * (blocks // 2) + [qt.n % 32] * (blocks % 2)
    assert cuda._row_chunks(0, 300) == [] and cuda._row_chunks(5, 10**9) == [slice(0, 5)]


def test_runtime_layouts_bytes_clear_and_in_place_refresh():
    """runtime_layout_bytes counts the cached copies and clear_runtime_layouts drops them.
    An in-place change of normal planes is copied into the cached tensors (what a captured
    CUDA graph reads); inference tensors have no version counter, so a change to them
    needs clear_runtime_layouts (as documented)."""
    from otq_kernels.backends import cuda

    cuda.clear_runtime_layouts()
    assert cuda.runtime_layout_bytes() == 0
    qt = make_qt((40, 300), 3, "tensor", "cpu")
    other = make_qt((40, 300), 3, "tensor", "cpu", seed=7)
    planes = cuda.fragment_planes(qt)
    # 3 row blocks x 3 spans x 32 lanes x (4 + 2 words) x 4 bytes
    assert cuda.runtime_layout_bytes() == 3 * 3 * 32 * 6 * 4
    fresh = cuda._build_fragment(other)
    for mine, theirs in zip(qt.planes, other.planes, strict=True):
        mine.copy_(theirs)
    assert cuda.fragment_planes(qt) is planes  # refreshed in place
    assert all(torch.equal(a, b) for a, b in zip(planes, fresh, strict=True))
    cuda.clear_runtime_layouts()
    assert cuda.runtime_layout_bytes() == 0

    with torch.inference_mode():
        qt = make_qt((40, 300), 3, "tensor", "cpu")
        stale = cuda.fragment_planes(qt)
        for mine, theirs in zip(qt.planes, other.planes, strict=True):
            mine.copy_(theirs)
    assert cuda.fragment_planes(qt) is stale  # not seen
    cuda.clear_runtime_layouts()
    assert all(torch.equal(a, b) for a, b in zip(cuda.fragment_planes(qt), fresh, strict=True))
    cuda.clear_runtime_layouts()


def test_runtime_layouts_rebuilt_after_clear_keep_one_finalizer():
    """Each clear and rebuild leaves one finalizer on the planes (the cleared entry's is
    detached), and the rebuilt entry still leaves with its tensor."""
    from otq_kernels.backends import cuda

    qt = make_qt((40, 300), 3, "tensor", "cpu")
    cuda.fragment_planes(qt)
    live = len(weakref.finalize._registry)
    for _ in range(5):
        cuda.clear_runtime_layouts()
        cuda.fragment_planes(qt)
    assert len(weakref.finalize._registry) == live
    key = ("fragment", id(qt.planes[0]))
    del qt
    gc.collect()
    assert key not in cuda._RUNTIME_LAYOUTS and len(weakref.finalize._registry) == live - 1


def test_misaligned_vector_load_is_reported(emulated):
    """The emulation's own check: a misaligned plane makes the launch fail, no wrong answer."""
    qt = make_qt((4, 128), 4, "tensor", "cpu")
    plane = torch.empty(qt.planes[0].numel() + 1, dtype=torch.int32)[1:].view_as(qt.planes[0])
    plane.copy_(qt.planes[0])
    qt.planes[0] = plane
    with pytest.raises(RuntimeError, match="misaligned"):
        emulated.linear(torch.randn(1, 128), qt, None)


def test_bad_bits_is_an_error(emulated):
    qt = make_qt((4, 40), 3, "tensor", "cpu")
    object.__setattr__(qt, "bits", 9)  # (past the Python checks: the native one's)
    with pytest.raises(RuntimeError, match="invalid argument"):
        emulated.linear(torch.randn(1, 40), qt, None)


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("k", [1, 31, 33, 100])
def test_pack_unpack_bit_exact(emulated, bits, k):
    codes = torch.randint(0, 2**bits, (3, k), generator=torch.Generator().manual_seed(k))
    planes = emulated.pack(codes, bits)
    for got, want in zip(planes, pack_codes(codes, bits), strict=True):
        assert torch.equal(got, want)
    assert torch.equal(emulated.unpack(planes, bits, k), codes)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("granularity", ["channel", "tensor"])
@pytest.mark.parametrize("bits", range(2, 9))
def test_dequantize_bit_exact(emulated, bits, granularity, dtype):
    """Every width and codebook kind: 16-byte stores of whole octets (K % 8 == 0)."""
    qt = make_qt((5, 72), bits, granularity, "cpu", seed=bits)
    assert torch.equal(emulated.dequantize(qt, dtype), qt.dequantize(dtype))


@pytest.mark.parametrize("bits", [3, 4, 8])
@pytest.mark.parametrize("k", [1, 7, 9, 31, 33, 100, 264])
def test_dequantize_odd_k_takes_scalar_stores(emulated, bits, k):
    """K % 8 != 0: every octet stored element-wise, the last one partial (a store past a
    row would overwrite the next row's first values)."""
    qt = make_qt((3, k), bits, "channel", "cpu", seed=k)
    assert torch.equal(emulated.dequantize(qt, torch.float16), qt.dequantize(torch.float16))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("granularity", ["channel", "tensor"])
def test_dequantize_odd_k_other_dtypes(emulated, granularity, dtype):
    qt = make_qt((3, 33), 5, granularity, "cpu", seed=33)
    assert torch.equal(emulated.dequantize(qt, dtype), qt.dequantize(dtype))


def test_dequantize_misaligned_output_takes_scalar_stores(emulated):
    """An output 2 bytes off a 16-byte boundary: whole octets stored element-wise too (a
    16-byte store there is a fault, in the emulation as on the GPU)."""
    qt = make_qt((4, 64), 4, "channel", "cpu", seed=1)
    buf = torch.full((4 * 64 + 1,), float("nan"), dtype=torch.float16)
    out = buf[1:].view(4, 64)
    assert out.data_ptr() % 16 != 0
    emulated.dequantize(qt, torch.float16, out=out)
    assert torch.equal(out, qt.dequantize(torch.float16))
    assert torch.isnan(buf[0])


def test_dequant_path_expands_natively_up_to_the_weight_count(monkeypatch):
    """Where the cuda backend runs on the GPU, layers of up to NATIVE_DEQUANT_MAX_NUMEL
    weights, or the GPU's tuning entry dequant_native_max_numel, expand through
    dequant.cu; none where the backend does not run."""
    from otq_kernels import ops
    from otq_kernels.backends import cuda

    qt = make_qt((16, 64), 4, "channel", "cpu")
    monkeypatch.setattr(cuda, "unavailable", lambda device: None)
    monkeypatch.setattr(cuda, "NATIVE_DEQUANT_MAX_NUMEL", 16 * 64)
    assert cuda.expands_natively(qt)
    monkeypatch.setattr(cuda, "NATIVE_DEQUANT_MAX_NUMEL", 16 * 64 - 1)
    assert not cuda.expands_natively(qt)
    entries = {}
    monkeypatch.setattr(ops, "_tuning_entry", lambda device, op, name, absent: (
        entries.get((op, name), absent)))
    entries["linear", "dequant_native_max_numel"] = 16 * 64
    assert cuda.expands_natively(qt)
    entries["linear", "dequant_native_max_numel"] = 0
    assert not cuda.expands_natively(qt)
    entries.clear()
    monkeypatch.setattr(cuda, "NATIVE_DEQUANT_MAX_NUMEL", 1 << 30)
    monkeypatch.setattr(cuda, "unavailable", lambda device: "built for other GPUs")
    assert not cuda.expands_natively(qt)


def test_dequantize_wrapper_rejects_bad_inputs():
    """cuda.dequantize checks the dtype and the device before touching the extension."""
    from otq_kernels.backends import cuda

    qt = make_qt((4, 40), 3, "tensor", "cpu")
    with pytest.raises(ValueError, match="float16/bfloat16/float32"):
        cuda.dequantize(qt, torch.int32)
    with pytest.raises(ValueError, match="CUDA"):
        cuda.dequantize(qt, torch.float16)


def test_a_refused_shared_memory_opt_in_is_returned_not_left_pending(emulated):
    """A kernel's opt-in to more shared memory than the GPU gives fails the launch with
    its error, cleared: left pending, torch's next launch check raised it again, on an
    op of its own."""
    import ctypes

    pending = ctypes.c_int(-1)
    assert emulated.lib.otq_emu_refused_smem_opt_in(ctypes.byref(pending)) != 0
    assert pending.value == 0


def test_kernel_image_status_is_success(emulated):
    """The launcher behind cuda_check_kernel_image (the emulation has every image)."""
    assert emulated.lib.otq_emu_kernel_image_status() == 0


def check_fit_rows(emu, x, bits, assign):
    codes, centroids = emu.fit_rows(x, bits, nearest=assign == "nearest")
    ref_codes, ref_centroids = ot_rows(x.double(), bits, assign)
    assert torch.equal(codes, ref_codes)
    torch.testing.assert_close(centroids, ref_centroids.float(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("assign", ["rank", "nearest"])
@pytest.mark.parametrize("bits", range(2, 9))
def test_fit_rows_matches_ot_rows(emulated, bits, assign):
    """Segmented sort (3 rows) with fewer values than levels at high bits (c = n)."""
    x = torch.randn(3, 37, generator=torch.Generator().manual_seed(bits))
    check_fit_rows(emulated, x, bits, assign)


@pytest.mark.parametrize("assign", ["rank", "nearest"])
def test_fit_rows_one_row_ties_and_signed_zeros(emulated, assign):
    """The single-row path (device-wide sort): stable ties, -0.0 sorted as +0.0."""
    x = torch.randint(-3, 4, (1, 301), generator=torch.Generator().manual_seed(5)).float()
    x[:, ::7] = -0.0
    check_fit_rows(emulated, x, 3, assign)


@pytest.mark.parametrize("assign", ["rank", "nearest"])
def test_fit_rows_subnormal_rows(emulated, assign):
    """float32 subnormals keep their order and means (the GPU build's conversions avoid
    --use_fast_math's flush to zero: tools/check_cuda_sources.sh reads its PTX)."""
    x = torch.randn(3, 257, generator=torch.Generator().manual_seed(11)) * 1e-39
    x[0, :8] = torch.tensor([-2e-40, -1e-40, 1e-40, 2e-40] * 2)
    codes, centroids = emulated.fit_rows(x, 2, nearest=assign == "nearest")
    ref_codes, ref_centroids = ot_rows(x.double(), 2, assign)
    assert torch.equal(codes, ref_codes)
    torch.testing.assert_close(centroids, ref_centroids.float(), rtol=1e-6, atol=0)


def test_fit_rows_short_workspace_is_an_error(emulated):
    with pytest.raises(RuntimeError, match="invalid argument"):
        emulated.fit_rows(torch.randn(2, 10), 2, workspace_bytes=16)


SANITIZER_RUNTIMES = {"address": "libasan.so", "thread": "libtsan.so"}


@pytest.mark.parametrize("sanitizer", SANITIZER_RUNTIMES)
def test_kernels_clean_under_sanitizer(emulated, tmp_path, sanitizer):
    """A sample of every launcher under ASan+UBSan (bounds) or TSan (shared-memory races)."""
    runtime = subprocess.run([compiler(), f"-print-file-name={SANITIZER_RUNTIMES[sanitizer]}"],
                             capture_output=True, text=True, check=True).stdout.strip()
    if not Path(runtime).is_file():
        pytest.skip(f"{SANITIZER_RUNTIMES[sanitizer]} not installed")
    env = dict(os.environ, LD_PRELOAD=runtime, ASAN_OPTIONS="detect_leaks=0:abort_on_error=1",
               UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1",
               TSAN_OPTIONS="halt_on_error=1:report_signal_unsafe=0")
    script = Path(__file__).with_name("_cuda_emulation.py")
    done = subprocess.run([sys.executable, str(script), sanitizer, str(BUILD_DIR)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-8000:]
    assert "sample ok" in done.stdout


def check_conv(emu, x_shape, w_shape, bits, granularity, dtype, stride=(1, 1), padding=(0, 0),
               dilation=(1, 1), split_k=1, nchw=True, with_bias=True):
    qt = make_qt(w_shape, bits, granularity, "cpu", seed=bits * 100 + sum(w_shape))
    x = randn(x_shape, "cpu", dtype, seed=sum(x_shape))
    bias = randn((w_shape[0],), "cpu", dtype, seed=w_shape[0]) if with_bias else None
    y = emu.conv2d(x, qt, bias, stride, padding, dilation, split_k=split_k, nchw=nchw)
    assert y.is_contiguous(memory_format=torch.contiguous_format if nchw
                           else torch.channels_last)
    args = (stride, padding, dilation, 1)
    truth = reference.conv2d(x.double(), qt, None if bias is None else bias.double(), *args)
    assert_matches_reference(y, reference.conv2d(x, qt, bias, *args), truth, dtype)


@pytest.mark.parametrize("dtype", MMA_DTYPES, ids=str)
@pytest.mark.parametrize("granularity", ["tensor", "channel"])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_conv_every_bit_width(emulated, bits, granularity, dtype):
    """lut_conv.cu, 3x3 with padding 1 over 2 images of 5x6: 60 output pixels (one tile of
    64, 4 past the last pixel), 20 output channels (a full and a partial 16-row block),
    K' = 144 (a partial last group), 16 channels (16-byte x loads)."""
    check_conv(emulated, (2, 16, 5, 6), (20, 16, 3, 3), bits, granularity, dtype,
               padding=(1, 1))


@pytest.mark.parametrize("x_shape,w_shape,stride,padding,dilation,split_k,nchw", [
    ((1, 3, 6, 5), (9, 3, 3, 3), (1, 1), (1, 1), (1, 1), 1, True),   # C % 8: element loads
    ((1, 8, 3, 4), (17, 8, 1, 1), (1, 1), (0, 0), (1, 1), 1, False),  # 12 pixels: 2 n-tiles
    ((2, 24, 7, 7), (16, 24, 3, 3), (2, 2), (1, 1), (1, 1), 3, True),  # stride 2, split-K
    ((1, 16, 9, 8), (5, 16, 1, 3), (1, 2), (0, 2), (1, 2), 2, False),  # 1x3, dilation 2
    ((1, 32, 4, 4), (16, 32, 3, 3), (1, 1), (2, 2), (2, 2), 64, True),  # split per group
    ((2, 1, 9, 7), (16, 1, 3, 3), (1, 1), (1, 1), (1, 1), 1, False),  # C = 1: mnist's input
    ((2, 24, 6, 5), (1, 24, 3, 3), (1, 1), (1, 1), (1, 1), 3, True),  # N = 1: its output
], ids=["c3-elements", "pointwise-12px-nhwc", "stride2-split3", "1x3-dilated-nhwc",
        "pad2-dil2-split64", "c1-input-layer-nhwc", "n1-output-layer-split3"])
def test_conv_shapes_strides_and_splits(emulated, x_shape, w_shape, stride, padding,
                                        dilation, split_k, nchw):
    check_conv(emulated, x_shape, w_shape, 4, "channel", torch.float16, stride, padding,
               dilation, split_k=split_k, nchw=nchw)


@pytest.mark.parametrize("c,split_k", [(256, 1), (160, 2)], ids=["c256", "c160-split2"])
def test_conv_wide_channels(emulated, c, split_k):
    """C >= 128 as in the UNet: a warp's 128-column step stays inside a tap on some steps
    and wraps on others (C = 160: at a different step for each lane)."""
    check_conv(emulated, (1, c, 7, 7), (20, c, 3, 3), 4, "channel", torch.float16,
               padding=(1, 1), split_k=split_k)


def test_conv_without_bias_per_tensor_bf16(emulated):
    check_conv(emulated, (1, 8, 4, 4), (3, 8, 3, 3), 3, "tensor", torch.bfloat16,
               padding=(1, 1), with_bias=False)


def test_tap_major_planes_layout_and_cache():
    """The conv kernel's runtime layout: the codes of [N, C, KH, KW] as rows in (kh, kw, c)
    order, packed canonically; cached until the planes change in place."""
    from otq_kernels.backends.cuda import _RUNTIME_LAYOUTS, tap_major_planes
    from otq_kernels.format import unpack_planes

    qt = make_qt((5, 3, 2, 3), 3, "channel", "cpu")
    planes = tap_major_planes(qt)
    codes = unpack_planes(qt.planes, 3, 18).reshape(5, 3, 2, 3).permute(0, 2, 3, 1)
    assert torch.equal(unpack_planes(planes, 3, 18), codes.reshape(5, 18))
    assert tap_major_planes(qt) is planes
    before = [p.clone() for p in planes]
    qt.planes[0].copy_(qt.planes[0].flip(0))  # an in-place write: refreshed in place
    rebuilt = tap_major_planes(qt)
    assert rebuilt is planes and not torch.equal(planes[0], before[0])
    codes = unpack_planes(qt.planes, 3, 18).reshape(5, 3, 2, 3).permute(0, 2, 3, 1)
    assert torch.equal(unpack_planes(planes, 3, 18), codes.reshape(5, 18))
    key = ("tap_major", id(qt.planes[0]))
    assert key in _RUNTIME_LAYOUTS
    del qt
    gc.collect()
    assert key not in _RUNTIME_LAYOUTS  # the entry leaves with the layer's planes
    pointwise = make_qt((5, 7, 1, 1), 4, "tensor", "cpu")
    assert tap_major_planes(pointwise) is pointwise.planes  # one tap: no re-pack


# ------------------------------------------------ pinned by a mutation campaign (session 70)
def test_runtime_layout_rows_longer_than_a_chunk_build_one_block_a_step():
    """A row of more codes than LAYOUT_CHUNK_CODES: each step takes exactly one 16-row
    block (the least that keeps blocks whole), the last one partial."""
    from otq_kernels.backends import cuda

    k = cuda.LAYOUT_CHUNK_CODES + 1
    assert cuda._row_chunks(40, k) == [slice(0, 16), slice(16, 32), slice(32, 40)]
    assert cuda._row_chunks(40, cuda.LAYOUT_CHUNK_CODES // 32) == [slice(0, 32),
                                                                      slice(32, 40)]
