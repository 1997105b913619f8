"""The hand-written CUDA backend: wraps ``otq_kernels._C`` (csrc/cuda).

- ``linear``: LUT GEMV (fp32 accumulation, bias fused, split-K with an fp32 workspace);
  M rows are processed in chunks of ``GEMV_MAX_M`` (it is meant for small M); or the
  tensor-core kernel (chunks of ``MMA_MAX_M``) where the GPU's tuning entry says so, on
  the canonical planes or on the codes in fragment order (:func:`fragment_planes`, built
  once per layer and cached; only ``fragment=True`` or a tuning entry's
  ``cuda_mma_fragment`` selects it: it has not been timed on a GPU yet), in blocks of 16
  weight rows or of 32 (``block_rows=32`` or the tuning entry's ``cuda_frag_32_rows_min_m``;
  untimed too).
- ``conv2d`` (groups = 1, fp16/bf16 x, 2-4 bits): implicit GEMM on tensor cores over the
  weight's codes re-packed tap-major (:func:`tap_major_planes`, built once per layer and
  cached) and channels-last x. Only ``backend="cuda"`` or a tuning entry's
  ``conv2d.cuda_max_m`` selects it (for the ``conv2d.kernel_sizes`` it lists): it has not
  been timed on a GPU yet.
- ``fit_rows``: equal-mass binning on CUB's stable (segmented) radix sort.
- ``pack`` / ``unpack``: the canonical bit planes.
- ``dequantize``: the dequant path's dense weight (:func:`expands_natively` says where it
  replaces the Triton expansion: small layers, where a launch's host time is most of it).

The wrappers validate devices, dtypes, shapes and alignment, allocate outputs and
workspaces with torch and launch on ``torch.cuda.current_stream()``.
"""

from __future__ import annotations

import functools
import weakref

import torch

from .._native import native, unavailable_reason
from ..dispatch_log import note_kernel
from ..format import QuantizedTensor, check_codes, padded_k, plane_widths
from . import _device, as_dtype, checked_split_k, conv_output_format
from ._native_args import (
    aligned,
    checked_codebook,
    checked_planes,
    fit_args,
    require_device,
    unpack_args,
)

DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
GEMV_MAX_M = 8          # rows of x per kernel launch (csrc/cuda/launchers.h kGemvMaxM)
MMA_MAX_M = 16          # the same for the tensor-core kernel (kMmaMaxM)
ROWS_PER_BLOCK = 16     # weight rows per thread block (csrc/cuda/lut_gemv.cu)
GROUP = 32              # weights per lane step
MAX_SPLIT_K = 64
# Blocks per SM below which the heuristic splits K. On an H200 (132 SMs,
# benchmarks/sweep_splitk.py) one split beat 2, 4, 8 and 16 at 512 and 896 blocks (3.9
# and 6.8 per SM) for the LUT GEMV at M = 1, and won 19 of 24 cells for the tensor-core
# kernel at M = 1 and 16 (the rest within 8%).
BLOCKS_PER_SM = 2
MMA_MAX_BITS = 4        # pair tables of 2**(2 * bits) entries (csrc/cuda/lut_mma.cu)
CONV_PIXELS_PER_BLOCK = (16, 64)  # output pixels per conv block: <= 16 of them, else 64
CONV_MIN_GROUPS_PER_SPLIT = 8     # two per warp
FRAG_SPAN = 128         # columns per span of the fragment-order codes (kFragSpanColumns)
LAYOUT_CHUNK_CODES = 1 << 22  # codes per step of a runtime layout build (_row_chunks)
LINEAR_KERNELS = {"gemv": 0, "mma": 1, "frag": 2, "frag32": 3}  # the binding's `kernel` codes
FRAG_BLOCK_ROWS = (16, 32)  # weight rows per block of lut_frag.cu
NATIVE_DEQUANT_MAX_NUMEL = 1 << 22  # weights up to which dequant expands with dequant.cu


def unavailable(device) -> str | None:
    if device.type != "cuda":
        return f"the cuda backend needs CUDA tensors, not {device}"
    return unavailable_reason(require_cuda=True) or _no_kernel_image(_device.index(device))


@functools.cache
def _no_kernel_image(index: int) -> str | None:
    """Why GPU ``index`` cannot run the extension's kernels (built for other
    architectures: setup.py's OTQ_CUDA_ARCHS), or None; asked once per GPU."""
    try:
        with torch.cuda.device(index):
            native(require_cuda=True).cuda_check_kernel_image()
    except (RuntimeError, AttributeError) as err:  # AttributeError: an older build
        major, minor = torch.cuda.get_device_capability(index)
        if major < 8:  # (the kernels' mma.sync.m16n8k16 needs sm_80: no build runs here)
            return (f"this GPU (sm_{major}{minor}) is older than the CUDA kernels' minimum, "
                    "sm_80; auto dispatch leaves the cuda backend out")
        return (f"otq_kernels._C has no kernels for this GPU (sm_{major}{minor}): {err}; "
                f"rebuild it with OTQ_CUDA_ARCHS={major}{minor}")
    return None


def _require_cuda(t, name: str, device: torch.device | None = None) -> None:
    require_device(t, name, "cuda", device)


def _stream(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


def _checked_bias(bias: torch.Tensor | None, n: int, dtype: torch.dtype,
                  device: torch.device) -> torch.Tensor | None:
    """bias [n] on ``device`` as a contiguous ``dtype`` tensor (the kernels read it as x's
    type, like the reference), or None."""
    if bias is None:
        return None
    _require_cuda(bias, "bias", device)
    if bias.shape != (n,):
        raise ValueError(f"bias must be [{n}], got {list(bias.shape)}")
    return as_dtype(bias, dtype).contiguous()


def tensor_cores_support(dtype: torch.dtype, bits: int) -> bool:
    """Whether the mma kernel takes x of ``dtype`` and ``bits``-bit codes."""
    return dtype in (torch.float16, torch.bfloat16) and bits <= MMA_MAX_BITS


def fragment_supports(dtype: torch.dtype, bits: int, per_channel: bool) -> bool:
    """Whether the tensor-core kernel on fragment-order codes (lut_frag.cu) takes x of
    ``dtype`` and these codes: what the mma kernel takes, and 8 bits with one codebook per
    layer (a table of single entries; 256 per row do not fit for per-channel codebooks)."""
    return tensor_cores_support(dtype, bits) or (
        dtype in (torch.float16, torch.bfloat16) and bits == 8 and not per_channel)


def tuned_for_tensor_cores(device: torch.device) -> bool:
    """Whether the tuning table of this GPU says the mma kernel beat the LUT GEMV."""
    from ..ops import tuning_flag  # ops imports the backends

    return tuning_flag(device, "linear", "cuda_tensor_cores")


def use_tensor_cores(dtype: torch.dtype, bits: int, m: int, device: torch.device,
                     per_channel: bool = False) -> bool:
    """The automatic kernel choice (``linear(tensor_cores=None)``) for x [M, K] of ``dtype``.

    A tensor-core kernel where one runs (:func:`fragment_supports`: the mma kernel, and for
    8-bit codes with a per-tensor codebook lut_frag), the GPU's tuning entry has
    ``cuda_tensor_cores: true`` and M > its ``cuda_gemv_max_m_by_bits[bits]``, or for 2-4
    bits not listed there its ``cuda_gemv_max_m`` (absent: 0); else the LUT GEMV
    (bench_linear measured it faster there). 8-bit codes need their own entry.
    """
    from ..ops import _tuning_entry, tuning_int

    if not (fragment_supports(dtype, bits, per_channel) and tuned_for_tensor_cores(device)):
        return False
    crossover = _tuning_entry(device, "linear", "cuda_gemv_max_m_by_bits", {}).get(str(bits))
    if crossover is None:
        if bits > MMA_MAX_BITS:
            return False
        crossover = tuning_int(device, "linear", "cuda_gemv_max_m")
    return m > int(crossover)


def use_fragment_layout(device: torch.device) -> bool:
    """Whether the GPU's tuning entry has ``cuda_mma_fragment: true``: the tensor-core
    kernel then reads the codes in fragment order (bench_linear measured it faster)."""
    from ..ops import tuning_flag  # ops imports the backends

    return tuning_flag(device, "linear", "cuda_mma_fragment")


def wide_blocks_support(bits: int, per_channel: bool) -> bool:
    """Whether lut_frag.cu runs blocks of 32 weight rows on these codes: with a per-layer
    codebook, or per channel at 2 and 3 bits (two row blocks' 4-bit tables, 128 KB, would
    leave one block per SM)."""
    return not per_channel or bits <= 3


def tuned_block_rows(device: torch.device, m: int, bits: int, per_channel: bool) -> int:
    """lut_frag's weight rows per block for x of M rows: 32 where the GPU's tuning entry
    lists ``cuda_frag_32_rows_min_m`` <= M and :func:`wide_blocks_support`, else 16."""
    from ..ops import _tuning_entry  # ops imports the backends

    min_m = _tuning_entry(device, "linear", "cuda_frag_32_rows_min_m", None)
    wide = min_m is not None and m >= int(min_m) and wide_blocks_support(bits, per_channel)
    return 32 if wide else 16


def split_k_for(n: int, k: int, sms: int, rows_per_block: int = ROWS_PER_BLOCK) -> int:
    """Split-K factor for N rows of K (every CUDA linear kernel; blocks of
    ``rows_per_block`` weight rows): at least ``BLOCKS_PER_SM`` blocks per SM, >= 32 groups
    per warp slice.

    >>> split_k_for(16, 32 * 32 * 8, 132)
    8
    >>> split_k_for(8192, 8192, 132)
    1
    >>> split_k_for(8192, 8192, 132, rows_per_block=32)
    2
    """
    blocks = -(-n // rows_per_block)
    groups = padded_k(k) // GROUP
    want = -(-BLOCKS_PER_SM * sms // blocks)
    return max(1, min(want, groups // 32, MAX_SPLIT_K))


def _checked_block_rows(block_rows: int | None, fragment: bool, device: torch.device, m: int,
                        bits: int, per_channel: bool) -> int:
    """The weight rows per block of the launch (16 off lut_frag), checked."""
    if block_rows is not None and (type(block_rows) is not int
                                   or block_rows not in FRAG_BLOCK_ROWS):
        raise ValueError(f"block_rows must be 16 or 32, got {block_rows!r}")
    if not fragment:
        if block_rows == 32:
            raise ValueError("block_rows=32 needs the fragment-order kernel (fragment=True)")
        return ROWS_PER_BLOCK
    if block_rows is None:
        return tuned_block_rows(device, m, bits, per_channel)
    if block_rows == 32 and not wide_blocks_support(bits, per_channel):
        raise ValueError(f"block_rows=32 takes per-channel codebooks at 2 and 3 bits only, "
                         f"got {bits} bits per channel")
    return block_rows


def linear_kernel(dtype: torch.dtype, bits: int, m: int, device: torch.device,
                  per_channel: bool, tensor_cores: bool | None = None,
                  fragment: bool | None = None, block_rows: int | None = None) -> str:
    """The kernel :func:`linear` launches for x [M, K] of ``dtype`` on these codes: "gemv",
    "mma", "frag" or "frag32" (a key of ``LINEAR_KERNELS``). The arguments are
    :func:`linear`'s (None: the GPU's tuning entry decides); a combination that no kernel
    takes is a ValueError.
    """
    if fragment is None and block_rows == 32:  # 32-row blocks imply fragment order
        fragment = True
    if tensor_cores is None:  # fragment=True implies the tensor-core kernel; fragment=False
        # leaves the canonical-order one, which not every width and dtype has
        tensor_cores = bool(fragment) or (
            use_tensor_cores(dtype, bits, m, device, per_channel)
            and (fragment is None or tensor_cores_support(dtype, bits)))
    if fragment and not tensor_cores:
        raise ValueError("fragment=True needs the tensor-core kernel (tensor_cores)")
    if tensor_cores and fragment is None:  # 8-bit codes have one tensor-core kernel
        fragment = bits > MMA_MAX_BITS or use_fragment_layout(device)
    fragment = bool(tensor_cores and fragment)
    if fragment and not fragment_supports(dtype, bits, per_channel):
        raise ValueError(f"fragment=True needs float16/bfloat16 x and bits <= {MMA_MAX_BITS}, "
                         f"or 8 bits with a per-tensor codebook; got {dtype}, "
                         f"bits={bits}, {'per-channel' if per_channel else 'per-tensor'}")
    if tensor_cores and not fragment and not tensor_cores_support(dtype, bits):
        raise ValueError(f"tensor_cores needs float16/bfloat16 x and bits <= "
                         f"{MMA_MAX_BITS}, got {dtype} and bits={bits}")
    rows = _checked_block_rows(block_rows, fragment, device, m, bits, per_channel)
    return ("frag32" if rows == 32 else "frag") if fragment else (
        "mma" if tensor_cores else "gemv")


def linear(x: torch.Tensor, qt: QuantizedTensor, bias: torch.Tensor | None,
           split_k: int | None = None, tensor_cores: bool | None = None,
           fragment: bool | None = None, block_rows: int | None = None) -> torch.Tensor:
    """y = x @ W^T + bias. x [M, K] fp16/bf16/fp32 on CUDA -> [M, N] in x.dtype.

    split_k: force a split-K factor (None = heuristic from the SM count).
    tensor_cores: True = the mma kernel (csrc/cuda/lut_mma.cu: pair look-ups,
    mma.m16n8k16; fp16/bf16 x and 2-4-bit codes only), False = the LUT GEMV, None =
    :func:`use_tensor_cores` (the GPU's tuning entry, measured by bench_linear).
    fragment: with the mma kernel (True implies it when tensor_cores is None), read the
    codes in fragment order (csrc/cuda/lut_frag.cu, :func:`fragment_planes`), which also
    runs 8-bit codes with a per-tensor codebook (:func:`fragment_supports`); None =
    :func:`use_fragment_layout` at 2-4 bits, True at 8 bits (their only tensor-core kernel).
    block_rows: lut_frag's weight rows per block, 16 or 32 (each warp's x fragments then
    serve two row blocks; :func:`wide_blocks_support`; 32 implies ``fragment`` when that is
    None); None = :func:`tuned_block_rows`.
    """
    _require_cuda(x, "x")
    dev = x.device
    if x.dtype not in DTYPE_CODES:
        raise ValueError(f"x must be float16/bfloat16/float32, got {x.dtype}")
    if x.dim() != 2 or x.shape[1] != qt.k:
        raise ValueError(f"x must be [M, {qt.k}], got {list(x.shape)}")
    planes = checked_planes(qt.planes, qt.bits, qt.n, qt.k, "cuda", dev)
    book = checked_codebook(qt, "cuda", dev)
    per_channel = book.shape[0] == qt.n and qt.n > 1
    m, n, k = x.shape[0], qt.n, qt.k
    kernel = linear_kernel(x.dtype, qt.bits, m, dev, per_channel, tensor_cores, fragment,
                           block_rows)
    tensor_cores, fragment = kernel != "gemv", kernel.startswith("frag")
    block_rows = 32 if kernel == "frag32" else ROWS_PER_BLOCK
    y = torch.empty(m, n, dtype=x.dtype, device=dev)
    if m == 0:
        return y
    b = _checked_bias(bias, n, x.dtype, dev)
    with torch.cuda.device(dev):
        split_k = checked_split_k(split_k) or split_k_for(n, k, _device.sm_count(dev), block_rows)
        split_k = min(split_k, padded_k(k) // GROUP)  # no empty splits: smaller workspace
        rows = min(m, MMA_MAX_M if tensor_cores else GEMV_MAX_M)  # the launch's chunk
        ws = (torch.empty(split_k * rows * n, dtype=torch.float32, device=dev)
              if split_k > 1 else None)
        xa = aligned(x)
        if fragment:
            planes = fragment_planes(qt)
        note_kernel(f"lut_{kernel}", split_k)
        native(require_cuda=True).cuda_lut_linear(
            xa.data_ptr(), DTYPE_CODES[x.dtype], m, k, [p.data_ptr() for p in planes], qt.bits,
            book.data_ptr(), per_channel, n, 0 if b is None else b.data_ptr(), y.data_ptr(),
            split_k, 0 if ws is None else ws.data_ptr(), _stream(dev), LINEAR_KERNELS[kernel])
    return y


# (layout name, id(planes[0])) -> (a weak reference to planes[0], what the layout depends
# on, the layout's planes, the finalizer that removes the entry when the tensor dies). Tensors
# cannot key a WeakKeyDictionary: it compares keys with ==, which is elementwise for tensors.
_RUNTIME_LAYOUTS: dict[tuple[str, int], tuple] = {}


def _planes_stamp(qt: QuantizedTensor) -> tuple:
    """What a cached runtime layout of qt depends on: the planes' in-place versions (None
    for inference tensors, which have no version counter), their data and the weight
    shape."""
    try:
        versions = tuple(p._version for p in qt.planes)
    except RuntimeError:
        versions = None
    return versions, tuple(p.data_ptr() for p in qt.planes), qt.shape


def _runtime_layout(qt: QuantizedTensor, name: str, build) -> list[torch.Tensor]:
    """``build(qt)`` (a runtime layout of qt's codes, DESIGN.md section 2), built at first
    use and cached until qt's planes change or are freed.

    After an in-place change of the planes the new layout is copied into the cached
    tensors, so that a CUDA graph captured on them reads the new codes once a call outside
    the graph has refreshed them (a replay alone cannot notice the change).
    """
    key, stamp = (name, id(qt.planes[0])), _planes_stamp(qt)
    hit = _RUNTIME_LAYOUTS.get(key)
    same_tensor = hit is not None and hit[0]() is qt.planes[0]
    if same_tensor and hit[1] == stamp:
        return hit[2]
    planes = build(qt)
    if same_tensor and [p.shape for p in planes] == [p.shape for p in hit[2]]:
        with torch.inference_mode():  # the cached tensors may be inference tensors
            for cached, new in zip(hit[2], planes, strict=True):
                cached.copy_(new)
        planes = hit[2]
    leave = hit[3] if same_tensor else weakref.finalize(qt.planes[0], _RUNTIME_LAYOUTS.pop,
                                                        key, None)
    _RUNTIME_LAYOUTS[key] = (weakref.ref(qt.planes[0]), stamp, planes, leave)
    return planes


def runtime_layout_bytes() -> int:
    """Bytes held by the cached runtime layouts (tap-major conv codes, fragment-order linear
    codes): each a second copy of the codes of a layer that the CUDA conv or ``fragment``
    kernel has run."""
    return sum(p.numel() * p.element_size()
               for _, _, planes, _ in _RUNTIME_LAYOUTS.values() for p in planes)


def clear_runtime_layouts() -> None:
    """Drop every cached runtime layout; each is rebuilt at its layer's next call. Not
    while a captured CUDA graph that uses them may still be replayed: it would read freed
    memory."""
    for *_, leave in list(_RUNTIME_LAYOUTS.values()):
        leave.detach()  # (else each clear and rebuild would add one to the tensor)
    _RUNTIME_LAYOUTS.clear()


def _row_chunks(n: int, k: int) -> list[slice]:
    """The row ranges of a layout build, one step each: whole 16-row blocks of about
    ``LAYOUT_CHUNK_CODES`` codes (at least one block), so that the build's transient
    memory (int64 codes in unpack and pack) stays bounded whatever the layer's size."""
    rows = max(1, LAYOUT_CHUNK_CODES // max(k, 1) // ROWS_PER_BLOCK) * ROWS_PER_BLOCK
    return [slice(start, min(start + rows, n)) for start in range(0, n, rows)]


def _codes_u8(qt: QuantizedTensor, rows: slice) -> torch.Tensor:
    """The codes of qt's ``rows`` as uint8 [rows, K]: an eighth of int64's bytes while a
    layout is re-ordered."""
    from .. import ops  # ops imports the backends

    return ops.unpack(qt, rows=rows).to(torch.uint8)


def _build_tap_major(qt: QuantizedTensor) -> list[torch.Tensor]:
    from .. import ops  # ops imports the backends

    n, c, kh, kw = qt.shape
    out = [torch.empty(p.shape, dtype=p.dtype, device=p.device)  # K' = K: the same shapes
           for p in qt.planes]
    for rows in _row_chunks(n, qt.k):
        codes = _codes_u8(qt, rows).reshape(-1, c, kh, kw).permute(0, 2, 3, 1)
        for plane, packed in zip(out, ops.pack(codes.reshape(-1, qt.k), qt.bits), strict=True):
            plane[rows] = packed
    return out


def tap_major_planes(qt: QuantizedTensor) -> list[torch.Tensor]:
    """The codes of a conv weight [N, C, KH, KW] re-packed as rows of K' = KH * KW * C in
    (kh, kw, c) order: bit planes int32 [N, K'_pad * w / 32] (the canonical plane format
    of the permuted weight), the runtime layout of csrc/cuda/lut_conv.cu (DESIGN.md section
    2: built at first use, never saved). Cached per layer until its planes change; a 1x1
    weight's own planes (one tap: no copy)."""
    if qt.shape[2] == qt.shape[3] == 1:
        return qt.planes  # one tap: the canonical order already is (kh, kw, c)
    return _runtime_layout(qt, "tap_major", _build_tap_major)


def fragment_codes(codes: torch.Tensor) -> torch.Tensor:
    """codes [N, K] -> the 64 codes of each lane, [B, S, 32, 64] (B = ceil(N / 16) row
    blocks, S = ceil(K / 128) spans): lane 4g + t of block b and span s takes rows 16b + g
    + 8r (r < 2) and columns 128s + 32i + 8t + c (i < 4, c < 8) in the order (r, i, c);
    code 0 past N and K (csrc/cuda/launchers.h, lut_linear_frag)."""
    n, k = codes.shape
    blocks, spans = -(-n // ROWS_PER_BLOCK), -(-k // FRAG_SPAN)
    full = codes.new_zeros(blocks * ROWS_PER_BLOCK, spans * FRAG_SPAN)
    full[:n, :k] = codes
    lanes = full.view(blocks, 2, 8, spans, 4, 4, 8).permute(0, 3, 2, 5, 1, 4, 6)
    return lanes.reshape(blocks, spans, 32, 64)


def _build_fragment(qt: QuantizedTensor) -> list[torch.Tensor]:
    from .. import ops  # ops imports the backends

    blocks, spans = -(-qt.n // ROWS_PER_BLOCK), -(-qt.k // FRAG_SPAN)
    shapes = [(2 * w // _fragment_words(w), 32, _fragment_words(w)) for w in plane_widths(qt.bits)]
    out = [torch.empty(blocks, spans, *shape, dtype=torch.int32, device=qt.device)
           for shape in shapes]
    for rows in _row_chunks(qt.n, qt.k):
        lanes = fragment_codes(_codes_u8(qt, rows))
        first, count = rows.start // ROWS_PER_BLOCK, lanes.shape[0]
        packed = ops.pack(lanes.reshape(-1, 64), qt.bits)
        for plane, words, (loads, _, q) in zip(out, packed, shapes, strict=True):
            parts = words.view(count, spans, 32, loads, q).transpose(2, 3)
            plane[first:first + count] = parts
    return out


def _fragment_words(w: int) -> int:
    """Words per lane and load of a fragment-order plane of width w (launchers.h)."""
    return 2 if w == 1 else 4


def fragment_planes(qt: QuantizedTensor) -> list[torch.Tensor]:
    """The codes of a linear weight [N, K] in fragment order, the runtime layout of
    csrc/cuda/lut_frag.cu (DESIGN.md section 2: built at first use, never saved): per
    plane of width w, int32 [B, S, 2w / q, 32, q] (q = 4 words, 2 at w = 1; B, S and the
    order of a lane's codes as in :func:`fragment_codes`), so that each warp load of the
    kernel reads 32 lanes x q words in a row. As many bytes as the canonical planes (plus
    padding to 16 rows and 128 columns), cached per layer until its planes change."""
    return _runtime_layout(qt, "fragment", _build_fragment)


def conv_split_k_for(n: int, pixels: int, k: int, sms: int) -> int:
    """Split-K factor of the conv kernel: at least ``BLOCKS_PER_SM`` blocks per SM over
    (16-row blocks) x (pixel tiles), at least ``CONV_MIN_GROUPS_PER_SPLIT`` K' groups each.

    >>> conv_split_k_for(256, 49, 2304, 132)  # the mnist UNet's 7x7 convs: 16 blocks
    9
    >>> conv_split_k_for(256, 784, 2304, 132)  # 28x28: 208 blocks
    2
    """
    tile = CONV_PIXELS_PER_BLOCK[0] if pixels <= CONV_PIXELS_PER_BLOCK[0] \
        else CONV_PIXELS_PER_BLOCK[1]
    blocks = -(-n // ROWS_PER_BLOCK) * -(-pixels // tile)
    want = -(-BLOCKS_PER_SM * sms // blocks)
    return max(1, min(want, padded_k(k) // GROUP // CONV_MIN_GROUPS_PER_SPLIT, MAX_SPLIT_K))


def conv2d_supports(dtype: torch.dtype, bits: int, groups: int = 1) -> bool:
    """Whether :func:`conv2d` takes x of ``dtype``, ``bits``-bit codes and ``groups``
    (auto dispatch passes such convs on to the next backend; pointwise Conv1d layers run
    as a linear layer)."""
    return groups == 1 and tensor_cores_support(dtype, bits)


def conv2d(x: torch.Tensor, qt: QuantizedTensor, bias: torch.Tensor | None, stride, padding,
           dilation, groups: int, split_k: int | None = None) -> torch.Tensor:
    """y = conv2d(x, W) + bias on tensor cores (csrc/cuda/lut_conv.cu).

    x [B, C, H, W] float16/bfloat16 on CUDA (NCHW or channels-last; copied to
    channels-last when it is not) -> y [B, N, OH, OW] in x.dtype and x's memory format
    (:func:`conv_output_format`). groups = 1 and 2-4-bit codes only. split_k: force a
    split-K factor (None = :func:`conv_split_k_for`).
    """
    _require_cuda(x, "x")
    dev = x.device
    if groups != 1:
        raise ValueError(f"the cuda conv2d runs groups=1 only, got groups={groups}")
    if not tensor_cores_support(x.dtype, qt.bits):
        raise ValueError(f"the cuda conv2d needs float16/bfloat16 x and bits <= {MMA_MAX_BITS}, "
                         f"got {x.dtype} and bits={qt.bits}")
    if len(qt.shape) != 4 or x.dim() != 4 or x.shape[1] != qt.shape[1]:
        raise ValueError(f"x must be [B, {qt.shape[1]}, H, W] for a weight of shape "
                         f"{list(qt.shape)}, got {list(x.shape)}")
    from ..ops import conv2d_output_shape  # ops imports the backends

    n, c, kh, kw = qt.shape
    batch, _, h, w = x.shape
    (sh, sw), (ph, pw), (dh, dw) = (tuple(int(v) for v in a) for a in (stride, padding, dilation))
    _, _, oh, ow = conv2d_output_shape(x.shape, qt.shape, (sh, sw), (ph, pw), (dh, dw))
    if oh <= 0 or ow <= 0:
        raise ValueError(f"input {list(x.shape)} too small for the kernel")
    k = kh * kw * c
    if max(h * w * c, oh * ow, padded_k(k) + 4 * GROUP) >= 2**31:
        raise ValueError(f"the cuda conv2d needs one image (H*W*C), one output image and "
                         f"the weight's rows (KH*KW*C) below 2**31 values; got x "
                         f"{list(x.shape)} and a weight of shape {list(qt.shape)}")
    checked_planes(qt.planes, qt.bits, n, k, "cuda", dev)
    book = checked_codebook(qt, "cuda", dev)
    per_channel = book.shape[0] == n and n > 1
    fmt = conv_output_format(x)
    y = torch.empty(batch, n, oh, ow, dtype=x.dtype, device=dev, memory_format=fmt)
    if y.numel() == 0:
        return y
    b = _checked_bias(bias, n, x.dtype, dev)
    with torch.cuda.device(dev):
        planes = [aligned(p) for p in tap_major_planes(qt)]
        xc = x.contiguous(memory_format=torch.channels_last)
        xc = xc if xc.data_ptr() % 16 == 0 else xc.clone(memory_format=torch.channels_last)
        if xc is not x:
            note_kernel("x to channels-last")
        split_k = checked_split_k(split_k) or conv_split_k_for(n, batch * oh * ow, k,
                                                               _device.sm_count(dev))
        split_k = min(split_k, padded_k(k) // GROUP)
        ws = (torch.empty(split_k * batch * oh * ow * n, dtype=torch.float32, device=dev)
              if split_k > 1 else None)
        note_kernel("lut_conv", split_k)
        native(require_cuda=True).cuda_lut_conv2d(
            xc.data_ptr(), DTYPE_CODES[x.dtype], [batch, c, h, w, n],
            [kh, kw, sh, sw, ph, pw, dh, dw], [p.data_ptr() for p in planes], qt.bits,
            book.data_ptr(), per_channel, 0 if b is None else b.data_ptr(), y.data_ptr(),
            fmt == torch.contiguous_format, split_k, 0 if ws is None else ws.data_ptr(),
            _stream(dev))
    return y


def fit_rows(rows: torch.Tensor, bits: int, assign: str = "rank"):
    """Equal-mass ("ot") codebooks per row on the GPU (values sorted as float32).

    rows [R, n] float on CUDA -> (codes int64 [R, n], centroids float32 [R, 2**bits]).
    """
    _require_cuda(rows, "rows")
    bits = fit_args(rows, bits, assign)
    dev = rows.device
    x = rows.to(torch.float32).contiguous()
    if not bool(torch.isfinite(x).all()):  # after the cast: float64 beyond float32 range
        raise ValueError("rows contain NaN/Inf (in float32); cannot fit a codebook")
    r, n = x.shape
    lib = native(require_cuda=True)
    with torch.cuda.device(dev):
        codes = torch.empty(r, n, dtype=torch.int64, device=dev)
        centroids = torch.empty(r, 2**bits, dtype=torch.float32, device=dev)
        nbytes = lib.cuda_fit_rows_workspace_bytes(r, n, bits)
        ws = torch.empty(nbytes, dtype=torch.uint8, device=dev)
        lib.cuda_fit_rows(x.data_ptr(), r, n, bits, assign == "nearest", codes.data_ptr(),
                          centroids.data_ptr(), ws.data_ptr(), nbytes, _stream(dev))
    return codes, centroids


def pack(codes: torch.Tensor, bits: int) -> list[torch.Tensor]:
    """codes int [N, K] in [0, 2**bits) on CUDA -> bit planes (int32 [N, K_pad*w/32])."""
    _require_cuda(codes, "codes")
    bits = check_codes(codes, bits)
    dev = codes.device
    n, k = codes.shape
    with torch.cuda.device(dev):
        c = codes.to(torch.int64).contiguous()
        planes = [torch.empty(n, padded_k(k) * w // 32, dtype=torch.int32, device=dev)
                  for w in plane_widths(bits)]
        if c.numel():
            native(require_cuda=True).cuda_pack(c.data_ptr(), n, k, bits,
                                                [p.data_ptr() for p in planes], _stream(dev))
    return planes


def unpack(planes: list[torch.Tensor], bits: int, k: int) -> torch.Tensor:
    """Bit planes on CUDA -> codes int64 [N, k]."""
    bits, n, k = unpack_args(planes, bits, k)
    _require_cuda(planes[0], "plane")
    dev = planes[0].device
    planes = checked_planes(planes, bits, n, k, "cuda", dev)
    with torch.cuda.device(dev):
        codes = torch.empty(n, k, dtype=torch.int64, device=dev)
        if codes.numel():
            native(require_cuda=True).cuda_unpack([p.data_ptr() for p in planes], n, k, bits,
                                                  codes.data_ptr(), _stream(dev))
    return codes


def dequantize(qt: QuantizedTensor, dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """The dense weight of ``qt.shape`` in ``dtype`` (float16/bfloat16/float32) through
    csrc/cuda/dequant.cu: bit-exact against ``qt.dequantize(dtype)`` (the float32 codebook
    looked up, rounded once)."""
    if dtype not in DTYPE_CODES:
        raise ValueError(f"dtype must be float16/bfloat16/float32, got {dtype}")
    _require_cuda(qt.planes[0], "plane")
    dev = qt.device
    planes = checked_planes(qt.planes, qt.bits, qt.n, qt.k, "cuda", dev)
    book = checked_codebook(qt, "cuda", dev)
    with torch.cuda.device(dev):
        out = torch.empty(qt.n, qt.k, dtype=dtype, device=dev)
        if out.numel():
            native(require_cuda=True).cuda_dequantize(
                [p.data_ptr() for p in planes], qt.bits, book.data_ptr(),
                book.shape[0] == qt.n and qt.n > 1, qt.n, qt.k, DTYPE_CODES[dtype],
                out.data_ptr(), _stream(dev))
    return out.reshape(qt.shape)


def expands_natively(qt: QuantizedTensor) -> bool:
    """Whether the dequant path expands qt (on CUDA) with :func:`dequantize` rather than
    Triton's kernel: where this backend runs on qt's GPU and qt has at most the GPU's
    tuning entry ``dequant_native_max_numel`` weights (absent: ``NATIVE_DEQUANT_MAX_NUMEL``).
    Up to there the expansion writes at most 8 MB of fp16, a few microseconds of DRAM time
    for either kernel, so the launch's host time decides; above it Triton's kernel, whose
    grids were timed on large layers, stays until this one is timed there too."""
    from ..ops import _tuning_entry  # ops imports the backends

    if unavailable(qt.device) is not None:
        return False
    limit = _tuning_entry(qt.device, "linear", "dequant_native_max_numel",
                          NATIVE_DEQUANT_MAX_NUMEL)
    return qt.n * qt.k <= limit
