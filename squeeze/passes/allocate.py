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
f16 (bytes: the order-0 entropy of its two byte planes; ΔL: that of the f16 rounding); and, when the config offers
ranks, rank-r corrections of a grid's error (passes/lowrank.py), made as the lowrank pass will store them (int4
factors by default, format 1.4) and priced on their codes' entropy and on the part of the measure they remove.
Where the gptq pass will refine a tensor, the grids on its round-to-nearest hull are then re-scored on GPTQ's codes
(their entropy, and ΔL = sensitivity × tr(E H Eᵀ)/(R·tr H), which is v for white noise of variance v): all of them
in `price`, only those around where its allocations land in the budget loop (`screen`, then `refine`).
Only each tensor's lower convex hull of (bytes, ΔL) can be optimal. Starting from its cheapest point everywhere,
`allocate` repeatedly moves the tensor whose next hull point buys the most loss per byte while the pool lasts
(marginal analysis: the greedy form of reverse water-filling). The budget loop (squeeze/budget.py) prices every
tensor once, sets the pool each round and checks the real size; the pass itself only writes the chosen grids into
the plans (its config, `Allocation`, carries them; without one it does nothing).

One loss measure throughout: sensitivity × the output-weighted error tr(E H Eᵀ)/(R·tr H). Round-to-nearest grids
are screened with its diagonal form Σ_j H_jj Σ_i E_ij² / (R·tr H), exact in expectation for errors uncorrelated
across columns (as rounding's are) and R·C times cheaper than the full product; GPTQ's errors are correlated by
design, so the grids it refines are scored with the full H.
"""
import dataclasses
import heapq
from dataclasses import dataclass, field

import numpy as np
import torch

from .. import quant
from ..dtypes import torch_dtype
from ..codecs import rans
from ..errors import SqueezeError
from ..factors import F16Factors, FactorSpec
from ..recipe import BudgetSettings
from ..state import Plan, State
from . import gptq, lowrank

# Grids are offered up to an rms error of MAX_NOISE × the weights' std: int2 at its better clips (a Gaussian row at
# k = 1.5 / 2 / 2.5 loses 0.46 / 0.58 / 0.70 of its std); past that a tensor is mostly erased. Their loss is the same
# quadratic model as every grid's (sensitivity × weighted mse), extrapolated past the noise the probe measures at
# (calibrate.PROBE_NOISE = 0.25). Measured on the fixture (BENCHMARKS.md, issue 15): offering them took the drift at
# 2.5 bits/param from +0.286 to +0.059 bpb and made 2.25 bits/param reachable, at +0.12.
MAX_NOISE = 0.8
GPTQ_BATCH_ELEMENTS = 1 << 23  # grids of one tensor refined together, at most this many weights per GPTQ call


@dataclass(frozen=True)
class AllocateConfig:
    """The candidates the allocator prices: a recipe's [budget] table, whose defaults (squeeze/recipe.py:
    BudgetSettings) are these. Clips k 1.5 and 2 are where int2 and int3 are best. Low-rank corrections of ranks 1-8
    with int4 factors (format 1.4) are offered, priced on GPTQ's error of each grid: at the record export's bytes
    they cut the predicted loss by ~30% on every benchmark checkpoint (BENCHMARKS.md, bench/record_bytes_seeds.py);
    f16 factors (lowrank_bits_u = 0) cost four times the bytes and lost to finer grids."""
    bits_choices: tuple = BudgetSettings.bits_choices
    clip_k_choices: tuple = BudgetSettings.clip_k_choices
    lowrank_ranks: tuple = BudgetSettings.lowrank_ranks
    group_choices: tuple = BudgetSettings.group_choices     # scale groups tried besides one scale per row
    float_option: bool = BudgetSettings.float_option        # may a tensor stay f16
    lowrank_bits_u: int = BudgetSettings.lowrank_bits_u     # how the corrections' factors are stored
    lowrank_bits_v: int = BudgetSettings.lowrank_bits_v
    lowrank_group: int = BudgetSettings.lowrank_group
    measure_bits: int = BudgetSettings.measure_bits         # grids this narrow are priced on a measurement

    @property
    def lowrank_spec(self) -> FactorSpec:
        return FactorSpec.from_keys(self.lowrank_bits_u, self.lowrank_bits_v, self.lowrank_group)

    @staticmethod
    def from_recipe(recipe) -> "AllocateConfig":
        return AllocateConfig(**dataclasses.asdict(recipe.budget))


@dataclass(frozen=True)
class Option:
    bits: int
    clip_k: float
    bytes: float
    loss: float
    rank: int = 0           # of the low-rank correction (0: none)
    group: int = 0          # scale group (0: one scale per row)
    keep_float: bool = False  # stored f16, not quantized (bits, clip_k, rank, group unused)
    measured: float | None = None  # ΔL_even measured on calibration text (squeeze/measured.py), when `loss` is
    #                                priced from a measurement (budget.BudgetState.options)


@dataclass(frozen=True)
class Priced:
    """One tensor's hull, cheapest first, and GPTQ's result on each grid it refined while pricing
    ({gptq.memo_key: (codes, method, note)}), which the gptq pass then takes instead of recomputing."""
    hull: list
    gptq_results: dict = field(default_factory=dict)
    corrections: list = field(default_factory=list)  # `refine`'s low-rank candidates on the grids it re-priced


@dataclass(frozen=True)
class Allocation:
    """The allocate pass's config: {tensor name: chosen Option}, from `allocate` (squeeze/budget.py).
    `round_to_nearest`: the chosen tensors keep round-to-nearest codes (the budget's trial round, which only
    measures what the rest of the artifact costs)."""
    chosen: dict
    round_to_nearest: bool = False
    lowrank_spec: FactorSpec = FactorSpec()  # how a chosen correction's factors are stored (AllocateConfig's)


def coded_bytes(codes: torch.Tensor, scales: torch.Tensor) -> float:
    """What a grid's codes and scales cost: the codes' order-0 entropy (rans codes them within 0.5% of it) plus the
    scales as stored."""
    # the codes' bytes as uint8 (-1 counts as 255): a permutation of the symbols, which the entropy does not see
    counts = torch.bincount(codes.reshape(-1).view(torch.uint8), minlength=256).numpy()
    return rans.entropy_bits(counts) / 8 + scales.numel() * scales.element_size()


def factor_bytes(f) -> float:
    """What a correction's factors cost: quantized ones as a grid's codes and scales (`coded_bytes`), f16 ones as
    stored."""
    if isinstance(f, F16Factors):
        return f.nbytes
    return coded_bytes(f.u_codes, f.u_scales) + coded_bytes(f.v_codes, f.v_scales)


class Pricing:
    """The candidates of one tensor `e` (a planned entry): each grid quantized, sized and scored."""

    def __init__(self, e, sensitivity: float, hessian: torch.Tensor | None, keep_errors: bool = False):
        self.e, self.sensitivity, self.hessian, self.keep_errors = e, sensitivity, hessian, keep_errors
        self.w2 = quant.as_matrix(e.tensor)
        self.rows, self.cols = self.w2.shape
        self.max_mse = (MAX_NOISE ** 2) * float(self.w2.double().var())
        self.s = lowrank.column_scale(hessian, self.cols)  # sqrt(diag H): the diagonal form's column weights
        self.diagonal_norm = self.rows * float(self.s.square().sum())
        self.s2 = self.s.square().float()  # the column weights of squared errors, for float32 products
        self.errors = {}  # (bits, clip_k, group) -> error of the grid as priced, for low-rank candidates only
        self.stds = {}    # group -> quant.group_std: the same for every width and clip k

    def spec(self, bits: int, clip_k: float, group: int):
        return dataclasses.replace(self.e.plan.quant, bits=bits, clip="std", clip_value=clip_k, group=group)

    def quantized(self, spec) -> tuple:
        """quant.quantize's (codes, scales) for the grid, each group's std computed once for all grids."""
        if spec.group not in self.stds:
            self.stds[spec.group] = quant.group_std(self.w2, spec.group)
        return quant.quantize(self.e.tensor, spec, self.e.name, std=self.stds[spec.group])

    def screening_loss(self, error: torch.Tensor, squared: torch.Tensor | None = None) -> float:
        """The measure's diagonal form, for errors uncorrelated across columns (round-to-nearest, f16). `squared`:
        error² when already made. Products in float32 (~1e-7 relative each), summed in float64."""
        squared = error.float().square() if squared is None else squared
        return self.sensitivity * float((squared * self.s2).sum(dtype=torch.float64)) / self.diagonal_norm

    def output_loss(self, layer_loss: float) -> float:
        """The measure itself, from the layer loss tr(E H Eᵀ) of the stored codes (gptq.layer_loss), normalised as
        lowrank.output_error normalises it (what predicted_loss scores the stored codes with)."""
        return self.sensitivity * (layer_loss / (self.rows * float(torch.trace(self.hessian.double()))))

    def grid(self, bits: int, clip_k: float, group: int) -> Option | None:
        """The grid with round-to-nearest codes; None where its error exceeds what the sensitivity was measured for."""
        spec = self.spec(bits, clip_k, group)
        codes, scales = self.quantized(spec)
        error = self.w2 - quant.dequantize(codes, scales, group, torch.float32, self.w2.shape)
        squared = error.square()
        if float(squared.sum(dtype=torch.float64)) / squared.numel() > self.max_mse:
            return None
        if self.keep_errors:
            self.errors[(bits, clip_k, group)] = error
        return Option(bits, clip_k, coded_bytes(codes, scales), self.screening_loss(error, squared), group=group)

    def screened(self, config: AllocateConfig) -> list:
        """The lower hull of the round-to-nearest grids (width × clip) and, on it, per-group scales."""
        points = [o for bits in config.bits_choices for k in config.clip_k_choices if (o := self.grid(bits, k, 0))]
        if not points:
            raise SqueezeError(f"{self.e.name}: no candidate grid quantizes it with an rms error within "
                               f"{MAX_NOISE:g} of its std (add smaller [budget] clip_k_choices or wider bits_choices)")
        for o in lower_hull(points):
            points += [g for group in config.group_choices if 0 < group < self.cols
                       and (g := self.grid(o.bits, o.clip_k, group))]
        return lower_hull(points)

    def refined(self, hull: list, config: gptq.GPTQConfig) -> tuple[list, dict]:
        """The grids re-scored as the gptq pass will store them (GPTQ's codes where they lower the layer loss), and
        those results. GPTQ lowers the output error by a factor that differs from tensor to tensor (0.16-0.66x on
        the 6.6M checkpoint) and raises the entropy of coarse grids, so scoring round-to-nearest would misprice
        both. Several grids go through one GPTQ call as stacked rows (gptq.gptq_codes)."""
        per_call = max(1, GPTQ_BATCH_ELEMENTS // max(1, self.w2.numel()))
        out, results = [], {}
        for chunk in (hull[i:i + per_call] for i in range(0, len(hull), per_call)):
            specs = [self.spec(o.bits, o.clip_k, o.group) for o in chunk]
            rtn = [self.quantized(spec) for spec in specs]
            steps = [quant.expand_scales(scales.reshape(self.rows, -1), spec.group, self.cols).expand(
                self.rows, self.cols) for spec, (_, scales) in zip(specs, rtn)]
            qmax = torch.cat([torch.full((self.rows,), float(spec.qmax)) for spec in specs])
            stacked = gptq.gptq_codes(self.w2.repeat(len(chunk), 1), torch.cat(steps), qmax, self.hessian, config)
            for o, spec, (codes, scales), step, g in zip(chunk, specs, rtn, steps, stacked.split(self.rows)):
                *result, layer = gptq.refined_with_loss(self.e.tensor, spec, codes, scales, self.hessian, config, g)
                results[gptq.memo_key(self.e.name, spec, config)] = tuple(result)
                if self.keep_errors:
                    self.errors[(o.bits, o.clip_k, o.group)] = self.w2 - result[0].float() * step
                out.append(dataclasses.replace(o, bytes=coded_bytes(result[0], scales), loss=self.output_loss(layer)))
        return out, results

    def with_lowrank(self, grids: list, ranks, spec: FactorSpec, gptq_config: gptq.GPTQConfig | None) -> list:
        """Rank-r corrections of each grid's error (its GPTQ error where GPTQ priced it), made as the lowrank pass
        will make them (squeeze/factors.py's storage, quantized factors fitted and rounded; all grids of the tensor
        at once) and priced on what each removes from the measure (lowrank.Residual, with the full H) and on the
        factors' bytes (codes at their order-0 entropy, as for a grid; f16 factors as stored)."""
        errors = [self.errors[grid_of(o)] for o in grids]
        made = lowrank.corrections(errors, self.hessian, ranks, spec, gptq_config or gptq.GPTQConfig())
        out = []
        for o, error, per in zip(grids, errors, made):
            residual = lowrank.Residual(error, self.hessian)
            for r, f in per.items():
                removed = self.sensitivity * residual.removed(f)
                if not 0 < removed < o.loss:
                    continue
                out.append(dataclasses.replace(o, bytes=o.bytes + factor_bytes(f), loss=o.loss - removed, rank=r))
        return out

    def as_float(self) -> Option | None:
        """Kept f16: bytes the order-0 entropy of its two byte planes, loss that of the f16 rounding."""
        half = self.e.tensor.detach().to(torch.float16)
        if not torch.isfinite(half).all():
            return None
        planes = half.reshape(-1).view(torch.uint8).reshape(-1, 2).numpy()
        size = sum(rans.entropy_bits(np.bincount(planes[:, i], minlength=256)) for i in (0, 1)) / 8
        return Option(16, 0.0, size, self.screening_loss(self.w2 - quant.as_matrix(half)), keep_float=True)


def price(e, sensitivity: float, config: AllocateConfig, hessian: torch.Tensor | None = None,
          gptq_config: gptq.GPTQConfig | None = None) -> Priced:
    """The tensor's lower convex hull of (estimated bytes, predicted loss increase) over the candidate grids and their
    refinements, cheapest first: round-to-nearest grids (width × clip), per-group scales on that hull, GPTQ's codes
    on it when `gptq_config` says the gptq pass will refine the tensor (and it has a Hessian), low-rank corrections
    when the config offers ranks, and f16."""
    ranks = ranks_for(e, config)
    p = Pricing(e, sensitivity, hessian, keep_errors=bool(ranks))
    hull, results = p.screened(config), {}
    if refinable(hessian, gptq_config):
        hull, results = p.refined(hull, gptq_config)
        hull = lower_hull(hull)
    points = list(hull)
    if ranks:
        points += p.with_lowrank(hull, ranks, config.lowrank_spec, gptq_config)
    if config.float_option and (f := p.as_float()) is not None:
        points.append(f)
    hull = lower_hull(points)
    kept = {(o.bits, o.clip_k, o.group) for o in hull if not o.keep_float}  # only what may be chosen is kept
    return Priced(hull, {k: r for k, r in results.items()
                         if (k[1].bits, k[1].clip_value, k[1].group) in kept})


def options_for(e, sensitivity: float, config: AllocateConfig, hessian: torch.Tensor | None = None,
                gptq_config: gptq.GPTQConfig | None = None) -> list:
    """The tensor's hull (`price` without GPTQ's results)."""
    return price(e, sensitivity, config, hessian, gptq_config).hull


def refinable(hessian: torch.Tensor | None, gptq_config: gptq.GPTQConfig | None) -> bool:
    """Whether the gptq pass will refine the tensor's codes, so its grids must be priced on GPTQ's."""
    return gptq_config is not None and hessian is not None and float(torch.trace(hessian)) > 0


def ranks_for(e, config: AllocateConfig) -> list:
    """The correction ranks the config offers that fit the tensor (below its smaller side)."""
    return [r for r in config.lowrank_ranks if r < min(quant.matrix_shape(e.shape))]


def screen(e, sensitivity: float, config: AllocateConfig, hessian: torch.Tensor | None = None,
           refined_later: bool = False) -> list:
    """The round-to-nearest hull with f16 (when offered): `price` before GPTQ, which the budget loop then refines
    only where its allocations land (squeeze/budget.py). Low-rank corrections, when offered, join here only for a
    tensor GPTQ will not refine (`refined_later` false): the others get theirs from `refine`, on GPTQ's error."""
    ranks = [] if refined_later else ranks_for(e, config)
    p = Pricing(e, sensitivity, hessian, keep_errors=bool(ranks))
    points = p.screened(config)
    if ranks:
        points += p.with_lowrank(lower_hull(points), ranks, config.lowrank_spec, None)
    if config.float_option and (f := p.as_float()) is not None:
        points.append(f)
    return lower_hull(points)


def refine(e, sensitivity: float, hessian: torch.Tensor, gptq_config: gptq.GPTQConfig, grids: list,
           config: AllocateConfig = AllocateConfig()) -> Priced:
    """`grids` (round-to-nearest Options of `screen`) re-priced on GPTQ's codes, in the same order, with GPTQ's
    results for the gptq pass; then, when the config offers ranks, the corrections of those grids' GPTQ errors
    (`corrections`, one per grid and rank that lowers the loss)."""
    ranks = ranks_for(e, config)
    p = Pricing(e, sensitivity, hessian, keep_errors=bool(ranks))
    hull, results = p.refined(grids, gptq_config)
    corrections = p.with_lowrank(hull, ranks, config.lowrank_spec, gptq_config) if ranks else []
    return Priced(hull, results, corrections)


def grid_of(o: Option) -> tuple:
    return o.bits, o.clip_k, o.group


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


class PoolTooSmall(SqueezeError):
    """The narrowest candidates of the allocated tensors take more than the pool (`needed` > `pool` bytes)."""

    def __init__(self, needed: float, pool: float, message: str):
        super().__init__(message)
        self.needed, self.pool = needed, pool


def allocate(options: dict, pool_bytes: float) -> dict:
    """{name: chosen Option} minimising Σ loss with Σ bytes ≤ pool (greedy by loss saved per byte; ties by name)."""
    choice = {name: 0 for name in options}
    used = sum(opts[0].bytes for opts in options.values())
    if used > pool_bytes:
        raise PoolTooSmall(used, pool_bytes, f"budget too small: the allocated tensors need at least {used:,.0f} "
                           f"bytes, the budget leaves {pool_bytes:,.0f} for them")
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


def predicted_loss(state: State, memo: dict | None = None, measured: dict | None = None) -> float:
    """The loss increase the allocated tensors' final codes predict: sensitivity × the output-weighted error
    tr(E H Eᵀ) / (R·tr H) of what is actually stored (GPTQ's codes, low-rank corrections and all), which scores white
    noise at its variance as the sensitivity probe does; the plain mean squared error without a Hessian. The options
    were predicted from round-to-nearest errors, which GPTQ then improves on, so this is the figure to compare with
    what verify measures. `memo`: each tensor's loss by how it was stored, for calls on states of one budget compile
    (the same tensor, Hessian and GPTQ results, so the same storage gives the same codes). `measured`: {name: ΔL
    measured on calibration text} of tensors whose stored grid was measured (squeeze/budget.py); each counts the
    larger of the two figures, as the allocator priced it."""
    total, memo, measured = 0.0, {} if memo is None else memo, measured or {}
    for e in state.entries:
        if e.plan is None or not e.plan.reason.startswith("budget") or e.name not in state.sensitivities:
            continue
        key = (e.name, e.plan.scheme, e.plan.store, e.plan.quant, e.plan.lowrank_rank, e.method_used)
        if key in memo:
            total += max(memo[key], measured.get(e.name, memo[key]))
            continue
        w = quant.as_matrix(e.tensor)
        if e.plan.scheme == "float":
            w_hat = quant.as_matrix(e.tensor.to(torch_dtype(e.plan.store)))
        else:
            w_hat = quant.dequantize(e.codes, e.scales, e.plan.quant.group, torch.float32, w.shape, e.lowrank)
        memo[key] = state.sensitivities[e.name] * lowrank.output_error(w - w_hat, state.hessian_of(e)[0])
        total += max(memo[key], measured.get(e.name, memo[key]))
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


def plan_of(plan: Plan, o: Option, round_to_nearest: bool = False, lowrank_spec: FactorSpec = FactorSpec()) -> Plan:
    """The tensor's plan with the chosen candidate (`lowrank_spec`: how a correction's factors are stored)."""
    reason = f"budget: ~{o.bytes:,.0f} B, predicted ΔL {o.loss:.2e}" + \
        (f" (measured {o.measured:+.2e})" if o.measured is not None else "")
    if o.keep_float:
        return Plan(scheme="float", store="f16", codec=plan.codec, reason=reason)
    spec = dataclasses.replace(plan.quant, bits=o.bits, clip="std", clip_value=o.clip_k, group=o.group)
    return dataclasses.replace(plan, quant=spec, lowrank_rank=o.rank, lowrank_spec=lowrank_spec, reason=reason,
                               method="rtn" if round_to_nearest else plan.method)


def run(state: State, config: Allocation | None = None) -> State:
    """Write the chosen grids into the plans; without an Allocation (every compile but a budget's) it does nothing."""
    if config is None:
        return state
    return dataclasses.replace(state, entries=tuple(
        dataclasses.replace(e, plan=plan_of(e.plan, config.chosen[e.name], config.round_to_nearest,
                                            config.lowrank_spec))
        if e.name in config.chosen else e
        for e in state.entries))
