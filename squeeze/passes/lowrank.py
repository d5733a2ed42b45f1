"""lowrank: add a small low-rank correction U·V of the quantization error W − Q(W) to the tensors whose plan asks
for one (plan.lowrank_rank = r, from a recipe's `lowrank_rank` or the budget allocator).

The error of a fine grid is close to white noise, which no low rank captures; what a low rank captures is the error
that matters most to the layer's outputs. As in LQER (Zhang et al., 2024), the error is scaled per input column by
s = sqrt(diag H) (H: the layer's input Hessian from calibration, squeeze/calibrate.py) before the SVD, so the top r
directions are those of the largest *output* error, and unscaled after: U = P_r·sqrt(Σ_r), V = sqrt(Σ_r)·Q_rᵀ / s
(the square roots split the magnitude evenly, which keeps both factors well inside f16). Without a Hessian s = 1.

The factors are stored in f16 (docs/FORMAT.md, "low-rank correction") and the decoder adds them one outer product at
a time. The pass measures the correction it actually stores (f16 factors, the format's order of operations) and
keeps it only if it lowers the layer loss (or, without a Hessian, the squared error); the entry's note says by how
much.
"""
import dataclasses
from dataclasses import dataclass

import torch

from .. import quant
from ..state import State

LOWRANK_DTYPE = torch.float16


@dataclass(frozen=True)
class LowRankConfig:
    min_column_scale: float = 1e-3   # floor on s relative to its mean: inputs that never fire get no huge V entries


def column_scale(hessian: torch.Tensor | None, cols: int, config: LowRankConfig = LowRankConfig()) -> torch.Tensor:
    """s [C]: how much an error in each input column moves the layer's outputs (ones without a Hessian)."""
    if hessian is None:
        return torch.ones(cols, dtype=torch.float64)
    s = torch.sqrt(torch.diag(hessian.double()).clamp(min=0))
    return s.clamp(min=config.min_column_scale * float(s.mean()) or 1.0)


def weighted_svd(error: torch.Tensor, s: torch.Tensor):
    """(P, Σ, Qᵀ) of error·diag(s), in float64."""
    return torch.linalg.svd(error.double() * s[None, :], full_matrices=False)


def factors(svd, s: torch.Tensor, rank: int) -> tuple:
    """(U [R, r], V [r, C]) in the stored dtype from a weighted SVD."""
    p, sigma, qt = svd
    root = torch.sqrt(sigma[:rank])
    return (p[:, :rank] * root).to(LOWRANK_DTYPE), ((root[:, None] * qt[:rank]) / s[None, :]).to(LOWRANK_DTYPE)


def output_error(error: torch.Tensor, hessian: torch.Tensor | None) -> float:
    """tr(E H Eᵀ) / (R·tr H): the layer's output error (passes/gptq.py's layer loss) normalised so that white noise
    of variance v scores v, the sensitivity probe's unit (the allocator prices candidates in it); the mean squared
    error without a Hessian."""
    delta = error.double()
    if hessian is None:
        return float(delta.square().mean())
    return float(((delta @ hessian.double()) * delta).sum()) / (delta.shape[0] * float(torch.trace(hessian.double())))


def correct(e, hessian: torch.Tensor | None, config: LowRankConfig):
    """The entry with a rank-r correction of its quantization error if that lowers the output error, else as it was
    (its note says which)."""
    rows, cols = quant.matrix_shape(e.shape)
    rank = min(e.plan.lowrank_rank, rows, cols)
    w = quant.as_matrix(e.tensor)
    spec = e.plan.quant
    w_hat = quant.dequantize(e.codes, e.scales, spec.group, torch.float32, (rows, cols))
    s = column_scale(hessian, cols, config)
    u, v = factors(weighted_svd(w - w_hat, s), s, rank)
    before = output_error(w - w_hat, hessian)
    after = output_error(w - quant.add_lowrank(w_hat, u, v), hessian)
    what = "layer loss" if hessian is not None else "squared error"
    note = (e.note + "; ") if e.note else ""
    if not (torch.isfinite(u).all() and torch.isfinite(v).all()) or after >= before:
        return dataclasses.replace(e, note=note + f"lowrank r={rank} dropped ({what} not lowered)")
    return dataclasses.replace(e, lowrank=(u, v), note=note + f"lowrank r={rank}: {what} {after / before:.3f}×")


def run(state: State, config: LowRankConfig = LowRankConfig()) -> State:
    out = []
    for e in state.entries:
        if e.plan is not None and e.plan.scheme == "int" and e.plan.lowrank_rank > 0 and e.numel > 0:
            e = correct(e, state.hessian_of(e)[0], config)
        out.append(e)
    return dataclasses.replace(state, entries=tuple(out))
