"""Codebook fitting (DESIGN §3): ot, lloyd, uniform, piecewise, log2.

Every method works on a matrix of rows X [R, n] (R = N rows for "channel", one row of
all values for "tensor") and returns codes int64 [R, n] and centroids [R, 2**bits]
ascending. The functions named ``*_rows`` are the torch reference (the oracle for the
fused Triton / CUDA / C++ paths); they compute in float64.
"""

from __future__ import annotations

import torch

from .format import GRANULARITIES, QuantizedTensor, check_bits

METHODS = ("ot", "lloyd", "uniform", "piecewise", "log2")
ASSIGNS = ("rank", "nearest")
LLOYD_MAX_ITERS = 50


# ----------------------------------------------------------------------------- helpers
def _pad_levels(centroids: torch.Tensor, bits: int) -> torch.Tensor:
    """Pad [R, K] centroids to [R, 2**bits] by repeating the last one."""
    missing = 2**bits - centroids.shape[1]
    if missing <= 0:
        return centroids
    return torch.cat([centroids, centroids[:, -1:].expand(-1, missing)], dim=1)


def nearest_codes(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Nearest centroid (lowest index on ties). x [R, n], centroids [R, K] ascending -> [R, n]."""
    mids = (centroids[:, 1:] + centroids[:, :-1]) / 2
    return torch.searchsorted(mids.contiguous(), x.contiguous(), right=False)


def chunk_of_rank(n: int, k: int, device=None) -> torch.Tensor:
    """Equal-mass chunk id of each rank 0..n-1: K chunks, the first n mod K one longer. [n]."""
    q, r = divmod(n, k)
    i = torch.arange(n, device=device)
    big = r * (q + 1)
    return torch.where(i < big, i // (q + 1), r + (i - big) // max(q, 1))


def _cell_means(x: torch.Tensor, codes: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """Mean of x per code (empty cells keep ``old``). x, codes [R, n]; old [R, K]."""
    sums = torch.zeros_like(old).scatter_add_(1, codes, x)
    counts = torch.zeros_like(old).scatter_add_(1, codes, torch.ones_like(x))
    return torch.where(counts > 0, sums / counts.clamp_min(1), old)


# ----------------------------------------------------------------------------- methods
def ot_rows(x: torch.Tensor, bits: int, assign: str = "rank"):
    """Equal-mass (W2-optimal) binning. x [R, n] -> (codes [R, n], centroids [R, 2**bits])."""
    r, n = x.shape
    k = min(2**bits, n)
    values, order = torch.sort(x, dim=1, stable=True)
    chunk = chunk_of_rank(n, k, x.device)
    sums = torch.zeros(r, k, dtype=x.dtype, device=x.device).index_add_(1, chunk, values)
    counts = torch.bincount(chunk, minlength=k).to(x.dtype)
    centroids = sums / counts
    if assign == "nearest":
        codes = nearest_codes(x, centroids)
    else:
        codes = torch.empty_like(order).scatter_(1, order, chunk.expand(r, n).contiguous())
    return codes, _pad_levels(centroids, bits)


def lloyd_rows(x: torch.Tensor, bits: int):
    """Lloyd-Max from the ot start until no code changes or 50 iterations, row by row.
    x [R, n].

    After the first iteration a row whose codes did not change holds the means of its
    cells already (a fixed point): it leaves the loop, the others go on (one slow row
    kept every row iterating); the result is the same, bit for bit."""
    k = min(2**bits, x.shape[1])
    codes, centroids = ot_rows(x, bits)
    centroids = centroids[:, :k].contiguous()
    rows = None  # the rows still iterating, None while all are (x is not copied then)
    xs, held, means = x, codes, centroids  # (those rows': x, codes, centroids)
    for step in range(LLOYD_MAX_ITERS):
        new_codes = nearest_codes(xs, means)
        changed = (new_codes != held).any(1)
        if not bool(changed.any()):
            break
        if step and not bool(changed.all()):  # (the first makes every row's cell means)
            rows = changed.nonzero().squeeze(1) if rows is None else rows[changed]
            xs, new_codes, means = xs[changed], new_codes[changed], means[changed]
        held, means = new_codes, _cell_means(xs, new_codes, means)
        if rows is None:
            codes, centroids = held, means
        else:
            codes[rows], centroids[rows] = held, means
    return codes, _pad_levels(centroids, bits)


def uniform_rows(x: torch.Tensor, bits: int):
    """Asymmetric min-max grid of 2**bits levels. x [R, n]."""
    levels = 2**bits
    lo = x.min(dim=1, keepdim=True).values
    step = (x.max(dim=1, keepdim=True).values - lo) / (levels - 1)
    flat = step == 0
    codes = torch.round((x - lo) / torch.where(flat, torch.ones_like(step), step))
    codes = torch.where(flat, torch.zeros_like(codes), codes).clamp_(0, levels - 1).long()
    centroids = lo + torch.arange(levels, dtype=x.dtype, device=x.device) * step
    return codes, centroids


def quantile_edges(x: torch.Tensor, k: int) -> torch.Tensor:
    """Empirical quantiles at 0, 1/K, ..., 1 (linear interpolation). x [R, n] -> [R, K+1]."""
    values = torch.sort(x, dim=1).values
    n = x.shape[1]
    pos = torch.linspace(0, 1, k + 1, dtype=torch.float64, device=x.device) * (n - 1)
    lo = pos.floor().long()
    hi = (lo + 1).clamp(max=n - 1)
    frac = (pos - lo).to(x.dtype)
    return values[:, lo] + (values[:, hi] - values[:, lo]) * frac


def piecewise_rows(x: torch.Tensor, bits: int):
    """Quantile bins with midpoint centroids. x [R, n]."""
    k = min(2**bits, x.shape[1])
    edges = quantile_edges(x, k)
    codes = torch.searchsorted(edges.contiguous(), x.contiguous(), right=True) - 1
    codes = codes.clamp_(0, k - 1)
    return codes, _pad_levels((edges[:, :-1] + edges[:, 1:]) / 2, bits)


def _geometric(lo: torch.Tensor, hi: torch.Tensor, i: torch.Tensor, count: torch.Tensor):
    """Level i of ``count`` on the grid 2**linspace(log2 lo, log2 hi). All [R, K] broadcastable."""
    a, b = torch.log2(lo), torch.log2(hi)
    t = i / (count - 1).clamp_min(1)
    return torch.exp2(a + (b - a) * t)


def log2_rows(x: torch.Tensor, bits: int):
    """Sign-split geometric levels (K/2 per side), nearest level, no zero level. x [R, n]."""
    k = min(2**bits, x.shape[1])
    pos, neg = x > 0, x < 0
    has_pos, has_neg = pos.any(1, keepdim=True), neg.any(1, keepdim=True)
    n_pos = torch.where(has_pos & has_neg, k // 2, torch.where(has_pos, k, 0))
    n_neg = k - n_pos
    mag = x.abs()
    inf = torch.tensor(float("inf"), dtype=x.dtype, device=x.device)
    pmin = torch.where(pos, mag, inf).amin(1, keepdim=True)
    pmax = torch.where(pos, mag, -inf).amax(1, keepdim=True)
    nmin = torch.where(neg, mag, inf).amin(1, keepdim=True)
    nmax = torch.where(neg, mag, -inf).amax(1, keepdim=True)
    j = torch.arange(k, dtype=x.dtype, device=x.device).unsqueeze(0)
    neg_level = -_geometric(nmin, nmax, (n_neg - 1 - j), n_neg)
    pos_level = _geometric(pmin, pmax, (j - n_neg), n_pos)
    centroids = torch.where(j < n_neg, neg_level, pos_level)
    centroids = torch.where(has_pos | has_neg, centroids, torch.zeros_like(centroids))
    return nearest_codes(x, centroids), _pad_levels(centroids, bits)


_REFERENCE = {
    "ot": ot_rows,
    "lloyd": lambda x, bits, assign="rank": lloyd_rows(x, bits),
    "uniform": lambda x, bits, assign="rank": uniform_rows(x, bits),
    "piecewise": lambda x, bits, assign="rank": piecewise_rows(x, bits),
    "log2": lambda x, bits, assign="rank": log2_rows(x, bits),
}


# Values per chunk of rows the reference fits at once: its float64 temporaries (lloyd's
# took 14x the layer's fp32 size per channel) stay a few tens of MiB per chunk.
REFERENCE_CHUNK = 1 << 20


def fit_rows_reference(x: torch.Tensor, bits: int, method: str = "ot", assign: str = "rank"):
    """Torch reference. x [R, n] float -> (codes int64 [R, n], centroids f32 [R, 2**bits]).
    Rows are fitted a chunk of rows at a time (each row on its own: the same result)."""
    r, n = x.shape
    step = max(1, REFERENCE_CHUNK // max(n, 1))
    if r <= step:
        codes, centroids = _REFERENCE[method](x.to(torch.float64), bits, assign)
        return codes, centroids.to(torch.float32)
    codes = torch.empty(r, n, dtype=torch.int64, device=x.device)
    centroids = torch.empty(r, 2**bits, dtype=torch.float32, device=x.device)
    for first in range(0, r, step):
        part = slice(first, first + step)
        codes[part], book = _REFERENCE[method](x[part].to(torch.float64), bits, assign)
        centroids[part] = book
    return codes, centroids


# ----------------------------------------------------------------------------- checks
FIT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def check_weight(w) -> None:
    """Raise ValueError unless ``w`` is a non-empty, finite, floating-point tensor within
    float32's range (codebooks are float32)."""
    if not isinstance(w, torch.Tensor):
        raise ValueError(f"weight must be a torch.Tensor, got {type(w).__name__}")
    if w.dtype not in FIT_DTYPES:
        raise ValueError(f"weight must be a floating-point tensor of "
                         f"{', '.join(map(str, FIT_DTYPES))}, got {w.dtype} (convert it with "
                         ".float() first)")
    if w.layout != torch.strided:
        raise ValueError(f"weight must be a dense tensor, got layout {w.layout} (.to_dense())")
    if w.is_meta:
        raise ValueError("weight is on the meta device (it holds no values): load or "
                         "initialise the weights before quantizing")
    if w.numel() == 0 or w.dim() == 0:
        raise ValueError(f"weight must be a non-empty tensor with ≥1 dimension, got shape "
                         f"{tuple(w.shape)}")
    w = w.detach()  # (an inference tensor or a parameter: the checks record no graph)
    if not bool(torch.isfinite(w).all()):
        bad = int((~torch.isfinite(w)).sum())
        raise ValueError(f"weight has {bad} NaN/Inf value(s); cannot fit a codebook")
    if w.dtype == torch.float64:  # the only dtype that can hold values past float32's
        _check_float32_range(w)


def _check_float32_range(w: torch.Tensor) -> None:
    fp32_max = torch.finfo(torch.float32).max
    low, high = torch.aminmax(w)
    if max(-float(low), float(high)) > fp32_max:
        bad = int((w.abs() > fp32_max).sum())
        raise ValueError(f"weight has {bad} value(s) beyond float32's range (|w| > "
                         f"{fp32_max:.4g}); codebooks are float32")


def check_options(bits, method: str, granularity: str, assign: str) -> int:
    """Validate the fitting options (ValueError naming the bad one) -> bits as an int."""
    bits = check_bits(bits)
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")
    if granularity not in GRANULARITIES:
        raise ValueError(f"unknown granularity {granularity!r}; choose one of {GRANULARITIES}")
    if assign not in ASSIGNS:
        raise ValueError(f"unknown assign {assign!r}; choose one of {ASSIGNS}")
    return bits


def weight_rows(w: torch.Tensor, granularity: str) -> torch.Tensor:
    """The rows a codebook is fitted on: [N, K] for channel, [1, numel] for tensor."""
    if granularity == "tensor" or w.dim() == 1:
        return w.reshape(1, -1)
    return w.reshape(w.shape[0], -1)


# ----------------------------------------------------------------------------- public
def fit_codebook(
    w: torch.Tensor,
    bits: int = 4,
    method: str = "ot",
    granularity: str = "channel",
    assign: str = "rank",
    backend: str | None = None,
) -> QuantizedTensor:
    """Fit a 2**bits codebook to ``w`` (any float shape [N, ...]) and pack its codes.

    backend: None/"auto" (fastest available for w's device), "reference", "cpu", "triton",
    "cuda". The fused backends implement "ot"; other methods use the torch reference.
    """
    check_weight(w)
    bits = check_options(bits, method, granularity, assign)
    from .ops import fit_checked_rows, pack  # ops imports this module; keep the cycle lazy

    rows = weight_rows(w.detach(), granularity)
    codes, centroids = fit_checked_rows(rows, bits, method, assign, backend)
    n = w.shape[0] if w.dim() > 1 else 1
    planes = pack(codes.reshape(n, -1), bits)  # (native where built: format.pack_codes'
    # int64 temporaries took about 6x the layer's fp32 size)
    return QuantizedTensor(
        planes=planes,
        codebook=centroids.to(torch.float32),
        bits=bits,
        shape=tuple(w.shape),
        granularity="tensor" if w.dim() == 1 else granularity,
        method=method,
    )


def fake_quantize(w: torch.Tensor, bits: int, method: str = "ot",
                  granularity: str = "channel") -> torch.Tensor:
    """Quantize then dequantize ``w`` (same shape and dtype)."""
    return fit_codebook(w, bits, method, granularity).dequantize().to(w.dtype)


def fake_quantize_state_dict(state_dict: dict, bits: int, method: str = "ot") -> dict:
    """The seed code's "paper mode" on a state dict.

    Every floating-point tensor is fake-quantized: per output channel if ndim >= 2, per
    tensor if 1-D; tensors with fewer than 2**bits elements are copied unchanged (except
    for "uniform", which the seed applies to every tensor). Other entries pass through.
    """
    bits = check_options(bits, method, "channel", "rank")
    out = {}
    for name, value in state_dict.items():
        is_float = isinstance(value, torch.Tensor) and value.dtype.is_floating_point
        too_small = is_float and method != "uniform" and value.numel() < 2**bits
        if not is_float or too_small or value.numel() == 0 or value.dim() == 0:
            out[name] = value.clone() if isinstance(value, torch.Tensor) else value
            continue
        check_weight(value)
        out[name] = fake_quantize(value, bits, method, "channel" if value.dim() >= 2 else "tensor")
    return out
