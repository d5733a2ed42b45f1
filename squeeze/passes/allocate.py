"""allocate: choose each matrix's bit width so that predicted loss is lowest for the bytes a budget leaves.

For every tensor the recipe quantizes with its [defaults] (tensors a [[rules]] entry matches are pinned, as are
float and control tensors), each candidate grid — a width b and a std clip k, so a step Δ = k·σ/(2^(b−1)−1): with
entropy coding the step, not b, sets the rate — gives, from an actual round-to-nearest quantization:
  bytes  ≈ the codes' order-0 entropy (what rans codes them to, within 0.5%) + the scales;
  ΔL     ≈ sensitivity · weighted mean squared error, the sensitivity being the loss increase per unit of
           weight-noise variance measured on calibration data (squeeze/calibrate.py: sensitivities). Each input
           column's squared error is weighted by its share of diag(H) (the layer's input Hessian; uniform without
           one): white noise of variance v scores v, as in the probe, and an error the inputs never excite scores 0.
Refinements of the grids on that hull add candidates: the same width and clip with one scale per `group` elements
of a row instead of per row (a finer clip where a row's parts differ, for more scale bytes); keeping the tensor in
f16 (bytes: the order-0 entropy of its two byte planes; ΔL: that of the f16 rounding); and, when the config asks for
them, rank-r corrections (passes/lowrank.py), which add r·(R + C) f16 values and remove the r largest weighted
singular values of the error.
Where the gptq pass will refine a tensor, the grids on its round-to-nearest hull are then re-scored on GPTQ's codes
(their entropy, and ΔL = sensitivity × tr(E H Eᵀ)/(R·tr H), which is v for white noise of variance v).
Only each tensor's lower convex hull of (bytes, ΔL) can be optimal. Starting from its cheapest point everywhere,
the pass repeatedly moves the tensor whose next hull point buys the most loss per byte while the pool lasts
(marginal analysis: the greedy form of reverse water-filling). compile's budget loop (squeeze/compiler.py:
compile_to_budget) sets the pool and checks the real size.
"""
import dataclasses
import heapq
from dataclasses import dataclass

import numpy as np
import torch

from .. import quant
from ..dtypes import torch_dtype
from ..calibrate import PROBE_NOISE
from ..codecs import rans
from ..errors import SqueezeError
from ..state import Plan, State
from . import gptq, lowrank


@dataclass(frozen=True)
class AllocateConfig:
    bits_choices: tuple = (2, 3, 4, 5, 6, 7, 8)
    clip_k_choices: tuple = (2.5, 3.5, 5.0, 7.0, 10.0, 14.0)
    # Low-rank corrections are off by default: their candidates are predicted from the round-to-nearest error, whose
    # top directions GPTQ has already largely removed, so the allocator overpays for them (measured: at equal bytes
    # the drift doubled on the 6.6M-param checkpoint; BENCHMARKS.md). (4, 8, 16, 32) turns them on.
    lowrank_ranks: tuple = ()
    group_choices: tuple = (128,)           # scale groups tried besides one scale per row; () for rows only
    float_option: bool = True               # may a tensor stay f16


@dataclass(frozen=True)
class Option:
    bits: int
    clip_k: float
    bytes: float
    loss: float
    rank: int = 0           # of the low-rank correction (0: none)
    group: int = 0          # scale group (0: one scale per row)
    keep_float: bool = False  # stored f16, not quantized (bits, clip_k, rank, group unused)


def options_for(e, sensitivity: float, config: AllocateConfig, hessian: torch.Tensor | None = None,
                gptq_config: gptq.GPTQConfig | None = None) -> list:
    """The tensor's lower convex hull of (estimated bytes, predicted loss increase) over the candidate grids and their
    refinements, cheapest first. With `gptq_config` (the tensor will get GPTQ codes) and a Hessian, the grids on the
    round-to-nearest hull are re-scored on the codes GPTQ gives them: GPTQ lowers the output error by a factor that
    differs from tensor to tensor (0.16-0.66x on the 6.6M checkpoint) and raises the entropy of coarse grids, so
    scoring round-to-nearest would misprice both."""
    w2 = quant.as_matrix(e.tensor)
    rows, cols = w2.shape
    max_mse = (PROBE_NOISE ** 2) * float(w2.double().var())  # beyond the probe, sensitivity·mse is a guess
    s = lowrank.column_scale(hessian, cols)
    weight = rows * float(s.square().sum())  # Σ (E·s)² / weight: the weighted mse

    def predicted(error: torch.Tensor) -> float:
        return sensitivity * float((error.double() * s).square().sum()) / weight

    errors = {}  # (bits, clip_k, group) -> error matrix, for the low-rank refinement

    def grid(bits: int, k: float, group: int) -> Option | None:
        spec = dataclasses.replace(e.plan.quant, bits=bits, clip="std", clip_value=k, group=group)
        codes, scales = quant.quantize(e.tensor, spec, e.name)
        error = w2 - quant.dequantize(codes, scales, spec.group, torch.float32, w2.shape)
        if float(error.double().square().mean()) > max_mse:
            return None
        counts = np.bincount(codes.numpy().ravel().astype(np.int64) + 128, minlength=256)
        errors[(bits, k, group)] = error
        size = rans.entropy_bits(counts) / 8 + scales.numel() * scales.element_size()
        return Option(bits, k, size, predicted(error), group=group)

    def with_gptq(o: Option) -> Option:
        """The grid re-scored as the gptq pass will store it: GPTQ's codes where they lower the layer loss."""
        spec = dataclasses.replace(e.plan.quant, bits=o.bits, clip="std", clip_value=o.clip_k, group=o.group)
        scales = quant.choose_scales(w2, spec)
        step = quant.expand_scales(scales, spec.group, cols).expand(rows, cols)
        codes = gptq.gptq_codes(w2, step, spec.qmax, hessian, gptq_config)
        rtn_error = errors[(o.bits, o.clip_k, o.group)]
        error = w2 - codes.float() * step
        if output_loss(error) >= output_loss(rtn_error):
            codes, error = quant.codes_for(w2, scales, spec), rtn_error
        errors[(o.bits, o.clip_k, o.group)] = error
        counts = np.bincount(codes.numpy().ravel().astype(np.int64) + 128, minlength=256)
        size = rans.entropy_bits(counts) / 8 + scales.numel() * scales.element_size()
        return dataclasses.replace(o, bytes=size, loss=output_loss(error))

    def output_loss(error: torch.Tensor) -> float:  # as predicted_loss() scores the stored codes
        return sensitivity * lowrank.output_error(error, hessian)

    points = [o for bits in config.bits_choices for k in config.clip_k_choices if (o := grid(bits, k, 0))]
    if not points:
        raise SqueezeError(f"{e.name}: no candidate grid quantizes it within the calibrated error range")
    for o in lower_hull(points):
        points += [p for g in config.group_choices if 0 < g < cols and (p := grid(o.bits, o.clip_k, g))]
    hull = lower_hull(points)
    if gptq_config is not None and hessian is not None and float(torch.trace(hessian)) > 0:
        hull = lower_hull([with_gptq(o) for o in hull])
        points = list(hull)
    ranks = [r for r in config.lowrank_ranks if r < min(rows, cols)]
    for o in hull if ranks else ():
        energy = lowrank.weighted_svd(errors[(o.bits, o.clip_k, o.group)], s)[1].square()
        left = energy.flip(0).cumsum(0).flip(0)  # left[r]: weighted error energy beyond the top r directions
        # the share of the error a rank-r correction leaves, applied to the option's own loss
        points += [dataclasses.replace(o, bytes=o.bytes + 2 * r * (rows + cols),
                                       loss=o.loss * float(left[r] / left[0]), rank=r) for r in ranks]
    half = e.tensor.detach().to(torch.float16)
    if config.float_option and torch.isfinite(half).all():
        planes = half.reshape(-1).view(torch.uint8).reshape(-1, 2).numpy()
        size = sum(rans.entropy_bits(np.bincount(planes[:, i], minlength=256)) for i in (0, 1)) / 8
        points.append(Option(16, 0.0, size, predicted(w2 - quant.as_matrix(half)), keep_float=True))
    return lower_hull(points)


def lower_hull(points: list) -> list:
    """The points no mix of two others beats: sorted by bytes, loss strictly falling, slopes flattening."""
    hull = []
    for p in sorted(points, key=lambda o: (o.bytes, o.loss, o.bits, o.clip_k, o.group, o.rank)):
        if hull and p.loss >= hull[-1].loss:
            continue
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            # b is under the segment a-p only if it saves more loss per byte from a than p does
            if (a.loss - b.loss) * (p.bytes - a.bytes) <= (a.loss - p.loss) * (b.bytes - a.bytes):
                hull.pop()
            else:
                break
        hull.append(p)
    return hull


def allocate(options: dict, pool_bytes: float) -> dict:
    """{name: chosen Option} minimising Σ loss with Σ bytes ≤ pool (greedy by loss saved per byte; ties by name)."""
    choice = {name: 0 for name in options}
    used = sum(opts[0].bytes for opts in options.values())
    if used > pool_bytes:
        raise SqueezeError(f"budget too small: the allocated tensors need at least {used:,.0f} bytes, the budget "
                           f"leaves {pool_bytes:,.0f} for them")
    heap = []

    def push(name):
        i, opts = choice[name], options[name]
        if i + 1 < len(opts):
            gain, cost = opts[i].loss - opts[i + 1].loss, max(opts[i + 1].bytes - opts[i].bytes, 1e-9)
            heapq.heappush(heap, (-gain / cost, name, i))

    for name in sorted(options):
        push(name)
    while heap:
        _, name, i = heapq.heappop(heap)
        opts = options[name]
        extra = opts[i + 1].bytes - opts[i].bytes
        if used + extra > pool_bytes:
            continue  # this step does not fit; a cheaper one elsewhere might
        choice[name], used = i + 1, used + extra
        push(name)
    return {name: options[name][i] for name, i in choice.items()}


def predicted_loss(state: State) -> float:
    """The loss increase the allocated tensors' final codes predict: sensitivity × the output-weighted error
    tr(E H Eᵀ) / (R·tr H) of what is actually stored (GPTQ's codes, low-rank corrections and all), which scores white
    noise at its variance as the sensitivity probe does; the plain mean squared error without a Hessian. The options
    were predicted from round-to-nearest errors, which GPTQ then improves on, so this is the figure to compare with
    what verify measures."""
    total = 0.0
    for e in state.entries:
        if e.plan is None or not e.plan.reason.startswith("budget") or e.name not in state.sensitivities:
            continue
        w = quant.as_matrix(e.tensor)
        if e.plan.scheme == "float":
            w_hat = quant.as_matrix(e.tensor.to(torch_dtype(e.plan.store)))
        else:
            w_hat = quant.dequantize(e.codes, e.scales, e.plan.quant.group, torch.float32, w.shape, e.lowrank)
        total += state.sensitivities[e.name] * lowrank.output_error(w - w_hat, state.hessian_of(e)[0])
    return total


def gptq_config_for(state: State, e) -> gptq.GPTQConfig | None:
    """How the gptq pass will refine this tensor's codes; None where it keeps round-to-nearest."""
    if e.plan.method != "gptq" or state.hessian_of(e)[0] is None:
        return None
    return gptq.GPTQConfig.from_recipe(state.recipe, state.device)


def allocatable(state: State) -> list:
    """Entries the budget decides: quantized by the recipe's defaults (no [[rules]] entry matched them)."""
    return [e for e in state.entries
            if e.plan is not None and e.plan.scheme == "int" and e.plan.reason == "defaults"]


def check_sensitivities(state: State):
    """Every tensor the budget decides needs a measured sensitivity; the error says what is missing and why."""
    missing = [e.name for e in allocatable(state) if e.name not in state.sensitivities]
    if not missing:
        return
    if not state.sensitivities:
        raise SqueezeError(f"{missing[0]}: no sensitivity measured; a budget needs calibration (--calib or "
                           f"--calib-self)")
    raise SqueezeError(f"{missing[0]}: calibration measured no sensitivity for it ({len(missing)} of the "
                       f"{len(allocatable(state))} tensors the budget decides lack one; it probed "
                       f"{len(state.sensitivities)}: squeeze.calibrate.matrix_names lists what a budget needs)")


def plan_of(plan: Plan, o: Option) -> Plan:
    """The tensor's plan with the chosen candidate."""
    reason = f"budget: ~{o.bytes:,.0f} B, predicted ΔL {o.loss:.2e}"
    if o.keep_float:
        return Plan(scheme="float", store="f16", codec=plan.codec, reason=reason)
    spec = dataclasses.replace(plan.quant, bits=o.bits, clip="std", clip_value=o.clip_k, group=o.group)
    return dataclasses.replace(plan, quant=spec, lowrank_rank=o.rank, reason=reason)


def run(state: State, config: AllocateConfig = AllocateConfig()) -> State:
    """Off unless the state carries a byte pool (state.allocation_pool, set by compile_to_budget)."""
    if state.allocation_pool is None:
        return state
    entries = allocatable(state)
    check_sensitivities(state)
    options = {e.name: state.allocation_options.get(e.name) or
               options_for(e, state.sensitivities[e.name], config, state.hessian_of(e)[0],
                           gptq_config_for(state, e)) for e in entries}
    chosen = allocate(options, state.allocation_pool)
    out = []
    for e in state.entries:
        if e.name in chosen:
            e = dataclasses.replace(e, plan=plan_of(e.plan, chosen[e.name]))
        out.append(e)
    return dataclasses.replace(state, entries=tuple(out), allocated_bytes=sum(o.bytes for o in chosen.values()))
