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

Quantized factors (plan.lowrank_spec, format 1.4: squeeze/factors.py), about a quarter of the bytes at int4/int4:
U = P_r·sqrt(Σ_r) is rounded per component (the clip of smallest squared error); then V is fitted to what that U
can express, V = argmin tr((E − ÛV) H (E − ÛV)ᵀ) = (ÛᵀÛ)⁻¹ÛᵀE (least squares: the minimiser for any H), and
quantized with one scale per `group` elements of a row, its codes chosen by GPTQ on the layer's Hessian (V's rows
multiply the same inputs as W's) where that lowers the layer loss, else rounded to nearest.
"""
import dataclasses
from dataclasses import dataclass

import torch

from .. import factors as stored
from .. import quant
from ..factors import FactorSpec
from ..state import State
from . import gptq

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


OVERSAMPLE, POWER_ITERATIONS = 8, 2  # the randomized SVD's extra directions and subspace iterations (Halko et al.)
# Directions every randomized SVD finds at least: the allocator asks for its largest rank (8 by default) and the
# lowrank pass for the one chosen, and one sketch width for both makes the pass store the factors that were priced.
SKETCH_RANK = 8


def weighted_svd(error: torch.Tensor, s: torch.Tensor, rank: int | None = None):
    """(P, Σ, Qᵀ) of error·diag(s), in float64: all of it, or with `rank` its top `rank` directions only, found by a
    randomized range finder when that is much smaller than the matrix (the allocator prices ranks 1-8 of hundreds of
    grids; a full SVD of each was most of a budget compile's time). The random directions come from a generator
    seeded with 0, so compile stays deterministic."""
    a = error.double() * s[None, :]
    k = None if rank is None else max(rank, SKETCH_RANK) + OVERSAMPLE
    if k is None or 2 * k > min(a.shape):
        return torch.linalg.svd(a, full_matrices=False)
    omega = torch.randn(a.shape[1], k, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    basis = torch.linalg.qr(a @ omega).Q
    for _ in range(POWER_ITERATIONS):  # sharpens the basis where the spectrum decays slowly (rounding errors do)
        basis = torch.linalg.qr(a @ torch.linalg.qr(a.t() @ basis).Q).Q
    p, sigma, qt = torch.linalg.svd(basis.t() @ a, full_matrices=False)
    return basis @ p[:, :rank], sigma[:rank], qt[:rank]


def factors(svd, s: torch.Tensor, rank: int) -> tuple:
    """(U [R, r], V [r, C]) in f16 from a weighted SVD."""
    p, sigma, qt = svd
    root = torch.sqrt(sigma[:rank])
    return (p[:, :rank] * root).to(LOWRANK_DTYPE), ((root[:, None] * qt[:rank]) / s[None, :]).to(LOWRANK_DTYPE)


def rounded_factors(error: torch.Tensor, svd, ranks, spec: FactorSpec) -> dict:
    """{r: (the rank-r correction of `error` with factors on `spec`'s integer grids, V rounded to nearest; V before
    rounding; each V element's step)} (module docstring). U's codes have one scale per component, so rank r's are
    the first r of the largest rank's."""
    p, sigma, _ = svd
    top = max(ranks)
    u_codes, u_scales = stored.quantize_u((p[:, :top] * torch.sqrt(sigma[:top])).float(), spec)
    u_hat = (u_codes.double() * u_scales.double()[:, None]).t()  # [R, top], exactly what the decoder rebuilds
    out = {}
    for r in ranks:
        v = torch.linalg.lstsq(u_hat[:, :r], error.double()).solution.float()  # gelsy: a zero U column is fine
        v_codes, v_scales = quant.quantize(v, stored.v_spec(spec), "low-rank V")
        out[r] = (stored.QuantizedFactors(u_codes[:r], v_codes, u_scales[:r], v_scales, spec.ubits, spec.vbits,
                                          spec.group), v, quant.expand_scales(v_scales, spec.group, v.shape[1]))
    return out


def quantized_factors(errors: list, svds: list, ranks, spec: FactorSpec, hessian: torch.Tensor | None,
                      gptq_config: gptq.GPTQConfig) -> list:
    """[{r: the rank-r correction with quantized factors}] of each error of one layer (sharing its Hessian): V
    rounded to nearest or, where it removes more of the measure, by GPTQ, the V of every error and rank going
    through one GPTQ call as stacked rows (rows are independent given H, and the call's column loop is its cost)."""
    rounded = [rounded_factors(e, svd, ranks, spec) for e, svd in zip(errors, svds)]
    out = [{r: f for r, (f, _, _) in per.items()} for per in rounded]
    if hessian is None or not float(torch.trace(hessian)) > 0:
        return out
    fitted = [(v, step.expand(v.shape)) for per in rounded for _, v, step in per.values()]
    codes = iter(gptq.gptq_codes(torch.cat([v for v, _ in fitted]), torch.cat([step for _, step in fitted]),
                                 stored.v_spec(spec).qmax, hessian, gptq_config).split([v.shape[0] for v, _ in fitted]))
    for error, per in zip(errors, out):
        residual = Residual(error, hessian)
        for r, f in per.items():
            refined = stored.QuantizedFactors(f.u_codes, next(codes), f.u_scales, f.v_scales, spec.ubits,
                                              spec.vbits, spec.group)
            if residual.removed(refined) > residual.removed(f):
                per[r] = refined
    return out


def corrections(errors: list, hessian: torch.Tensor | None, ranks, spec: FactorSpec,
                gptq_config: gptq.GPTQConfig = gptq.GPTQConfig(), config: "LowRankConfig" = None) -> list:
    """[{r: the stored factors (squeeze/factors.py) of a rank-r correction of the error}] for each error [R, C] of
    one layer (the allocator prices the errors of several grids of a tensor together) and each of `ranks`."""
    s = column_scale(hessian, errors[0].shape[1], config or LowRankConfig())
    svds = [weighted_svd(e, s, max(ranks)) for e in errors]
    if spec.quantized:
        return quantized_factors(errors, svds, ranks, spec, hessian, gptq_config)
    return [{r: stored.F16Factors(*factors(svd, s, r)) for r in ranks} for svd in svds]


class Residual:
    """How much of one error E's output measure tr(E H Eᵀ)/(R·tr H) a correction U·V removes, for many corrections
    of it: 2 tr(Uᵀ E H Vᵀ) − tr(UᵀU · V H Vᵀ), computed as (UᵀE)·H, so a correction costs r·R·C + r·C² instead of
    the R·C² of forming E·H (float64). For pricing and choosing; the lowrank pass measures what it stores in the
    decoder's arithmetic."""

    def __init__(self, error: torch.Tensor, hessian: torch.Tensor | None):
        self.e = error.double()
        self.h = None if hessian is None else hessian.double()
        self.norm = self.e.shape[0] * (self.e.shape[1] if self.h is None else float(torch.trace(self.h)))

    def removed(self, f) -> float:
        u, v = (m.double() for m in f.matrices())
        ue, vh = u.t() @ self.e, v
        if self.h is not None:
            ue, vh = ue @ self.h, v @ self.h
        return (2 * float((ue * v).sum()) - float(((u.t() @ u) * (vh @ v.t())).sum())) / self.norm


def output_error(error: torch.Tensor, hessian: torch.Tensor | None) -> float:
    """tr(E H Eᵀ) / (R·tr H): the layer's output error (passes/gptq.py's layer loss) normalised so that white noise
    of variance v scores v, the sensitivity probe's unit (the allocator prices candidates in it); the mean squared
    error without a Hessian."""
    delta = error.double()
    if hessian is None:
        return float(delta.square().mean())
    return float(((delta @ hessian.double()) * delta).sum()) / (delta.shape[0] * float(torch.trace(hessian.double())))


def correct(e, hessian: torch.Tensor | None, config: LowRankConfig, gptq_config: gptq.GPTQConfig):
    """The entry with a rank-r correction of its quantization error if that lowers the output error, else as it was
    (its note says which)."""
    rows, cols = quant.matrix_shape(e.shape)
    rank = min(e.plan.lowrank_rank, rows, cols)
    w = quant.as_matrix(e.tensor)
    w_hat = quant.dequantize(e.codes, e.scales, e.plan.quant.group, torch.float32, (rows, cols))
    spec = e.plan.lowrank_spec
    f = corrections([w - w_hat], hessian, [rank], spec, gptq_config, config)[0][rank]
    u, v = f.matrices()
    before = output_error(w - w_hat, hessian)
    after = output_error(w - quant.add_lowrank(w_hat, u, v), hessian)
    what = "layer loss" if hessian is not None else "squared error"
    form = f" int{spec.ubits}/int{spec.vbits}" if spec.quantized else ""
    note = (e.note + "; ") if e.note else ""
    if not (torch.isfinite(u).all() and torch.isfinite(v).all()) or after >= before:
        return dataclasses.replace(e, note=note + f"lowrank r={rank}{form} dropped ({what} not lowered)")
    return dataclasses.replace(e, lowrank=f, note=note + f"lowrank r={rank}{form}: {what} {after / before:.3f}×")


def run(state: State, config: LowRankConfig = LowRankConfig()) -> State:
    gptq_config = gptq.GPTQConfig.from_recipe(state.recipe, state.device)
    out = []
    for e in state.entries:
        if e.plan is not None and e.plan.scheme == "int" and e.plan.lowrank_rank > 0 and e.numel > 0:
            e = correct(e, state.hessian_of(e)[0], config, gptq_config)
        out.append(e)
    return dataclasses.replace(state, entries=tuple(out))
