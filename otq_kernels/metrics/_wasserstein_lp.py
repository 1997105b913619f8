"""Exact discrete optimal transport through POT's network simplex (the only CPU/numpy step).

POT is imported lazily so that importing the metrics package stays light.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["LPResult", "solve_ot"]

NUM_ITER_MAX = 10_000_000


@dataclass
class LPResult:
    """Optimal transport between a [n] and b [m] with cost M [n, m] (float64, input device).

    cost: the optimal value <plan, M>
    plan: [n, m] optimal coupling (zero on rows/columns of zero mass)
    u, v: [n], [m] optimal dual potentials (NaN on zero-mass entries, which the LP omits)
    """

    cost: float
    plan: torch.Tensor
    u: torch.Tensor
    v: torch.Tensor


def solve_ot(a: torch.Tensor, b: torch.Tensor, M: torch.Tensor) -> LPResult:
    """Solve min <P, M> over couplings of (a, b) exactly with ot.emd.

    a: [n], b: [m] non-negative with equal sums; M: [n, m]. Zero-mass entries are dropped
    before the solve (exact, and much faster on images with empty regions). Raises
    RuntimeError unless the network simplex reports an optimal solution.
    """
    import ot

    ia, ib = torch.nonzero(a > 0).squeeze(1), torch.nonzero(b > 0).squeeze(1)
    a_np = a[ia].detach().cpu().numpy().astype(np.float64)
    b_np = b[ib].detach().cpu().numpy().astype(np.float64)
    b_np *= a_np.sum() / b_np.sum()  # equal sums to the last bit, as ot.emd requires
    m_np = np.ascontiguousarray(M[ia][:, ib].detach().cpu().numpy(), dtype=np.float64)
    plan, log = ot.emd(a_np, b_np, m_np, numItermax=NUM_ITER_MAX, log=True)
    if log.get("result_code") != 1:
        raise RuntimeError(f"ot.emd did not reach an optimal solution: result_code="
                           f"{log.get('result_code')} ({log.get('warning')}); problem size "
                           f"{len(a_np)}x{len(b_np)}")
    dev, f64 = a.device, torch.float64
    full = torch.zeros(len(a), len(b), dtype=f64, device=dev)
    full[ia[:, None], ib[None, :]] = torch.as_tensor(plan, dtype=f64, device=dev)
    u = torch.full((len(a),), float("nan"), dtype=f64, device=dev)
    v = torch.full((len(b),), float("nan"), dtype=f64, device=dev)
    u[ia] = torch.as_tensor(log["u"], dtype=f64, device=dev)
    v[ib] = torch.as_tensor(log["v"], dtype=f64, device=dev)
    return LPResult(float(log["cost"]), full, u, v)


def block_pair_costs(wa: np.ndarray, wb: np.ndarray, cost: np.ndarray) -> np.ndarray:
    """Exact OT value between many small histogram pairs (used for local plan refinement).

    wa, wb: [K, k] non-negative rows with equal sums per row; cost: [K, k, k] -> [K].
    """
    import ot

    out = np.empty(len(wa))
    for i in range(len(wa)):
        sa, sb = wa[i] > 0, wb[i] > 0
        a, b = wa[i, sa], wb[i, sb]
        mass = a.sum()  # solved at mass 1, then scaled: POT's simplex gets masses below
        # ~1e-155 wrong and segfaults below ~1e-170 (a Gaussian blob's far blocks)
        val, log = ot.emd2(a / mass, b / b.sum(), cost[i][np.ix_(sa, sb)],
                           numItermax=NUM_ITER_MAX, log=True)
        if log.get("result_code") != 1:
            raise RuntimeError(f"ot.emd2 failed on a {len(a)}x{len(b)} block pair: "
                               f"result_code={log.get('result_code')}")
        out[i] = val * mass
    return out
