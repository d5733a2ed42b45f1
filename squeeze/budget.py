"""budget: compile to a byte budget (`squeeze compile --budget`, `squeeze.compile_to_budget`).

The loop in one room:
1. plan: the passes up to "plan" run once; the tensors the recipe's [defaults] govern are left to the budget.
2. price: each of those gets its hull of (bytes, predicted loss) candidates once, on round-to-nearest codes
   (passes/allocate.py: `screen`, run round-robin across ranks under torchrun).
3. rounds: `allocate` spends a byte pool on the hulls; the pipeline from "allocate" on writes the artifact with
   that choice (the allocate pass gets it as its config, the gptq pass GPTQ's results as its memo, so no grid is
   refined twice). Round 1 (the trial) takes the cheapest grid everywhere, which tells what the rest of the
   artifact costs; each later round lowers the pool by what the last one overshot (plus a margin that grows).

Where the gptq pass will refine a tensor, its grids must be priced on GPTQ's codes (GPTQ lowers the output error
by a factor that differs from tensor to tensor and raises the entropy of coarse grids), but GPTQ on every grid of
every hull is most of a budget compile's time, and a budget only ever lands near one point of each hull. So
`choose` re-prices with GPTQ the grids around where an allocation lands, allocates again, and repeats until every
chosen grid and its hull neighbours are GPTQ-priced: the choice the all-GPTQ pricing would make there, for about a
quarter of its GPTQ runs.

The rounds approach the target from below until within 0.1% (TOLERANCE), aiming at the middle of that band and
bisecting between a pool that fitted and one that overshot. Each round writes the real artifact, with two savings:
the sections of codes, where nearly all the bytes are and which every round changes, are coded with rans alone when
rans is among their candidates (its sizes are exact and it is fast, and the final compile, which picks the
smallest candidate per section, can only be smaller); and the byte compressors' outputs are memoised by the
section's bytes (EncodeConfig.memo), so scale and float sections that come back unchanged are coded once. When the
recipe's codes candidates include more than rans (the built-in default has rans alone there, so its rounds are its
final compile), only the fitting allocation pays for them (brotli-11), and what they saved is spent once more (rans
rounds aiming at the target scaled by what the full coder kept of rans's bytes, then the full coder again, kept
only if it fits).
The result is never over the budget; SqueezeError when even the narrowest grids do not fit.
"""
import dataclasses
import math

import torch

from . import compiler, parallel, pipeline, quant
from .errors import SqueezeError
from .passes import allocate, encode, gptq
from .recipe import Recipe
from .state import State


@dataclasses.dataclass
class BudgetState:
    """What one budget compile carries across its rounds (the core State knows nothing of budgets)."""
    planned: State          # after the "plan" pass
    target: int             # bytes the artifact may take: budget less code
    config: allocate.AllocateConfig
    screened: dict          # tensor name -> its hull (allocate.Option, cheapest first) as priced so far
    refined: dict           # tensor name -> {grid: Option priced on GPTQ's codes}, for tensors GPTQ will refine
    corrections: dict = dataclasses.field(default_factory=dict)  # name -> [low-rank Options on refined grids]
    gptq_memo: dict = dataclasses.field(default_factory=dict)  # gptq.memo_key -> (codes, method, note)
    loss_memo: dict = dataclasses.field(default_factory=dict)  # allocate.predicted_loss's, across rounds
    encode_memo: dict = dataclasses.field(default_factory=dict)  # byte compressors' outputs (EncodeConfig.memo)
    even_loss: object = None  # measured.EvenLoss: measures coarse grids (None: they keep the quadratic price)
    measured: dict = dataclasses.field(default_factory=dict)  # name -> {option_key: (predicted, measured ΔL)}
    report: object = lambda line: None  # takes one line (compile_to_budget's `progress`)

    def options(self) -> dict:
        """Each tensor's hull: its screened candidates, those GPTQ has re-priced replaced by their GPTQ prices, and
        those priced on a measurement (`measured_prices`)."""
        out = {}
        for name, hull in self.screened.items():
            points = self.modelled(name)
            if name in self.measured:
                points = measured_prices(points, self.measured[name], self.config.measure_bits)
            out[name] = allocate.lower_hull(points) if points is not hull else hull
        return out

    def modelled(self, name: str) -> list:
        """The tensor's candidates priced by the quadratic model alone: screened, or re-priced on GPTQ's codes."""
        hull = self.screened[name]
        if name not in self.refined:
            return hull
        return [self.refined[name].get(allocate.grid_of(o), o) for o in hull] + self.corrections.get(name, [])


def option_key(o: allocate.Option) -> tuple:
    """What identifies a stored candidate of one tensor: its grid and correction rank."""
    return o.bits, o.clip_k, o.group, o.rank


def measured_prices(points: list, measured: dict, coarse_bits: int) -> list:
    """`points` (one tensor's Options) with the measurements `measured` ({option_key: (predicted, measured ΔL)})
    folded in. A measured candidate costs the larger of the two: prices are only raised, never lowered, because one
    calibration batch's figure is noisy and a grid priced below its model would be chosen on that noise alone. A
    coarse candidate (`coarse_bits` or fewer) not yet measured takes the ratio measured at the tensor's candidate
    nearest to it in predicted loss, when that ratio is above 1: the same grid with another correction rank, or the
    next clip, fails the quadratic model by about as much (measured on the benchmark checkpoints), so the loop does
    not visit each of them in turn before it learns that. Finer grids keep the model's price."""
    ratios = sorted((predicted, even / predicted) for predicted, even in measured.values() if predicted > 0)
    out = []
    for o in points:
        if o.keep_float or o.bits > coarse_bits:
            out.append(o)
        elif option_key(o) in measured:
            predicted, even = measured[option_key(o)]
            out.append(dataclasses.replace(o, loss=max(o.loss, even), measured=even))
        elif ratios and o.loss > 0:
            _, ratio = min(ratios, key=lambda pr: (abs(math.log(pr[0] / o.loss)), pr[0]))
            out.append(dataclasses.replace(o, loss=o.loss * ratio) if ratio > 1 else o)
        else:
            out.append(o)
    return out


def compile_to_budget(state_dict: dict, recipe: Recipe, budget_bytes: int, *, sensitivities: dict,
                      hessians: dict | None = None, code_bytes: int = 0, log=None, max_rounds: int = 8,
                      device: str = "cpu", allocate_config: allocate.AllocateConfig | None = None,
                      calibration_skips: dict | None = None, strict_calib: bool = False,
                      progress=None, even_loss=None) -> compiler.CompileResult:
    """The artifact with the lowest predicted loss whose size plus `code_bytes` (the user's code and decoder) is at
    most `budget_bytes`. `allocate_config`: the candidates (default: the recipe's [budget] table); `progress`: a
    callable taking one line per round; `even_loss` (a measured.EvenLoss, `Calibration.even_loss`): grids of
    `measure_bits` or fewer are priced on their loss measured with it; without one they keep the quadratic model's
    price, and a line says so when the allocation ends up with one."""
    planned = State(entries=compiler.entries_from_state_dict(state_dict), recipe=recipe, hessians=hessians or {},
                    sensitivities=sensitivities, device=device, calibration_skips=calibration_skips or {},
                    strict_calib=strict_calib)
    for _, fn, config in pipeline.passes_for(recipe, until="plan"):
        planned = fn(planned, config)
    budget = price(planned, allocate_config or allocate.AllocateConfig.from_recipe(recipe),
                   budget_bytes - code_bytes)
    budget.even_loss = even_loss
    fast = _rounds_recipe(recipe, planned)

    def report(line: str):
        if progress is not None:
            progress(line)
    budget.report = report

    # the trial: the cheapest candidate everywhere tells what the rest of the artifact costs
    state, blob, spent = attempt(budget, 0.0, fast or recipe, predict=False, log=log, trial=True)
    if len(blob) > budget.target and fast:  # the full coder may still fit it, so the rounds need it too
        fast = None
        state, blob, spent = attempt(budget, 0.0, recipe, predict=False, log=log, trial=True)
    if len(blob) > budget.target:
        raise SqueezeError(f"budget {budget_bytes:,} bytes is too small: the smallest artifact this recipe "
                           f"allows is {len(blob):,} bytes (+{code_bytes:,} of code)")
    rounds = Rounds(budget, fast or recipe, log, code_bytes, budget_bytes, report, max_rounds - 1,
                    estimate=fast is not None, quick="rans" in _coders(recipe, planned, codes_only=True))
    try:
        fitted = rounds.fit(budget.target - (len(blob) - spent), budget.target)
    except allocate.PoolTooSmall as e:  # GPTQ's codes of the narrowest grids cost more than the trial's rounding
        raise SqueezeError(f"budget {budget_bytes:,} bytes is too small: with GPTQ's codes the smallest artifact this "
                           f"recipe allows is about {len(blob) - spent + e.needed:,.0f} bytes (+{code_bytes:,} of "
                           f"code)") from None
    if fitted is None:
        raise SqueezeError(f"budget {budget_bytes:,}: no allocation fitted after {max_rounds} rounds")
    state, blob, pool = fitted
    if fast:  # the recipe's own coders: per section never larger than rans alone, so it fits
        final, final_blob, _ = attempt(budget, pool, recipe, predict=True, log=log)
        report(f"final coder: {len(final_blob) + code_bytes:,} B")
        if len(final_blob) <= len(blob):
            state, blob = final, final_blob
        ratio = len(final_blob) / rounds.sizes[pool]  # what the better coder keeps of rans's bytes
        if budget.target - len(blob) > TOLERANCE * budget.target and rounds.left:
            # spend what it saved: the rans rounds aim at target / ratio, the full coder then runs once more
            more_fit = rounds.fit(pool + (budget.target - len(blob)), budget.target / ratio)
            if more_fit is not None and more_fit[2] != pool:
                more, more_blob, _ = attempt(budget, more_fit[2], recipe, predict=True, log=log)
                report(f"final coder: {len(more_blob) + code_bytes:,} B")
                if len(blob) < len(more_blob) <= budget.target:
                    state, blob = more, more_blob
    measured, warnings = measurements(budget, state)
    return compiler.CompileResult(blob=blob, state=state, measured=tuple(measured), warnings=tuple(warnings))


TOLERANCE = 0.001  # rans rounds stop within 0.1% under the target
SLOW_TOLERANCE = 0.005  # rounds with a slow coder (no rans among the candidates) stop within 0.5%


class Rounds:
    """Budget rounds with one coder: allocate a pool, compile, adjust the pool by what the artifact missed."""

    def __init__(self, budget, recipe, log, code_bytes, budget_bytes, report, max_rounds, estimate: bool,
                 quick: bool):
        self.budget, self.recipe, self.log, self.report = budget, recipe, log, report
        self.code_bytes, self.budget_bytes, self.left = code_bytes, budget_bytes, max_rounds
        self.estimate = estimate  # rans alone stands in for the recipe's coders
        self.tolerance = TOLERANCE if quick else SLOW_TOLERANCE  # quick: the rounds code with rans alone
        self.sizes = {}  # pool -> artifact bytes with the rounds' coder

    def fit(self, pool: float, target: float) -> tuple | None:
        """(state, artifact, pool) of the largest artifact at most `target` bytes the rounds found, approached from
        below until within the tolerance or out of rounds (each is a full compile; with rans alone, seconds); None
        when none fitted."""
        best, over = None, None  # the largest fitting (state, blob, pool); the smallest pool that overshot
        margin = self.tolerance * target / 2  # aim at the middle of the band that ends the rounds, not its edge
        pool -= margin
        floor = None  # the narrowest grids' bytes, once a pool below them was asked for
        while self.left > 0:
            self.left -= 1
            try:
                state, blob, _ = attempt(self.budget, pool, self.recipe, predict=True, log=self.log)
            except allocate.PoolTooSmall as e:
                # GPTQ's codes of the narrowest grids can cost more than the trial's rounding said: try them alone
                # once; when even they overshoot, the budget is too small (compile_to_budget says by how much)
                if floor is not None and e.needed <= floor:
                    raise
                pool = floor = e.needed
                continue
            self.sizes[pool] = len(blob)
            self.report(f"budget round: {len(blob) + self.code_bytes:,} B (target {self.budget_bytes:,})"
                        + (" (rans estimate)" if self.estimate else ""))
            if len(blob) <= target:
                if best is None or len(blob) > len(best[1]):
                    best = (state, blob, pool)
                if target - len(blob) <= self.tolerance * target:
                    break
                pool += target - len(blob) - margin
            else:
                over = pool if over is None else min(over, pool)
                pool -= (len(blob) - target) + margin
            if best is not None and over is not None and not best[2] < pool < over:
                pool = (best[2] + over) / 2  # the pool lies between one that fits and one that overshot
        return best


def price(planned: State, config: allocate.AllocateConfig, target: int) -> BudgetState:
    """Every tensor the budget decides, priced once on round-to-nearest codes (round-robin across ranks under
    torchrun). GPTQ re-prices grids lazily, only around where allocations land (`choose`), and low-rank corrections
    of a GPTQ-refined tensor are priced there too, on GPTQ's error of each grid it re-prices."""
    allocate.check_sensitivities(planned)
    entries = allocate.allocatable(planned)
    refinable = {e.name for e in entries
                 if allocate.refinable(planned.hessian_of(e)[0], allocate.gptq_config_for(planned, e))}
    hulls = parallel.map_items(lambda e: allocate.screen(e, planned.sensitivities[e.name], config,
                                                         planned.hessian_of(e)[0], e.name in refinable), entries)
    return BudgetState(planned=planned, target=target, config=config,
                       screened={e.name: hull for e, hull in zip(entries, hulls)},
                       refined={name: {} for name in refinable})


WINDOW = 2  # grids GPTQ re-prices on either side of a tensor's first allocation


def choose(budget: BudgetState, pool: float) -> dict:
    """{name: Option} for `pool`, every chosen grid of a GPTQ-refined tensor priced on GPTQ's codes, as are its
    neighbours on the hull, so the choice is the one the eager pricing would make around there. Re-prices what is
    missing (across ranks) and allocates again until nothing is; each pass re-prices at least one more of the
    finitely many grids, so it ends."""
    entries = {e.name: e for e in allocate.allocatable(budget.planned)}
    while True:
        options = budget.options()
        chosen = allocate.allocate(options, pool)
        todo = {}
        for name, done in budget.refined.items():
            hull, i = options[name], options[name].index(chosen[name])
            reach = WINDOW if not done else 1  # a first visit takes a wider window: fewer passes
            if not done:
                hull, i = budget.screened[name], budget.screened[name].index(chosen[name])
            near = [o for o in hull[max(0, i - reach):i + reach + 1]
                    if not o.keep_float and allocate.grid_of(o) not in done]
            if near:
                todo[name] = near
        if not todo:
            return chosen
        names = sorted(todo)
        planned = budget.planned
        results = parallel.map_items(
            lambda n: allocate.refine(entries[n], planned.sensitivities[n], planned.hessian_of(entries[n])[0],
                                      allocate.gptq_config_for(planned, entries[n]), todo[n], budget.config), names)
        for name, r in zip(names, results):
            budget.refined[name].update((allocate.grid_of(o), p) for o, p in zip(todo[name], r.hull))
            budget.corrections.setdefault(name, []).extend(r.corrections)
            budget.gptq_memo.update(r.gptq_results)


def attempt(budget: BudgetState, pool: float, recipe: Recipe, predict: bool, log=None, trial: bool = False) -> tuple:
    """(final state, artifact bytes, the allocator's estimate of what the decided tensors take) of one round. The
    trial round (`trial`) takes the cheapest candidate everywhere with round-to-nearest codes: it only measures
    what the rest of the artifact costs. Other rounds measure the coarse grids they chose (`measure_new`) and
    allocate again until every chosen coarse grid is priced on its measurement."""
    gptq_config = gptq.GPTQConfig.from_recipe(recipe, budget.planned.device)
    planned = dataclasses.replace(budget.planned, recipe=recipe)
    while True:
        if trial:
            chosen = {name: hull[0] for name, hull in budget.options().items()}
        else:
            chosen = choose(budget, pool)
        configs = {"allocate": allocate.Allocation(chosen, round_to_nearest=trial,
                                                   lowrank_spec=budget.config.lowrank_spec),
                   "gptq": dataclasses.replace(gptq_config, memo=budget.gptq_memo),
                   "encode": dataclasses.replace(encode.EncodeConfig.from_recipe(recipe), memo=budget.encode_memo)}
        state = pipeline.run(planned, log=log, after="plan", configs=configs, until="lowrank")
        if trial or not measure_new(budget, state, chosen):
            break
    state = pipeline.run(state, log=log, after="lowrank", configs=configs)
    if predict:  # the prediction is header meta, so it is in the bytes the budget counts
        measured = {name: o.measured for name, o in chosen.items() if o.measured is not None}
        state = dataclasses.replace(state, predicted_loss=allocate.predicted_loss(state, budget.loss_memo, measured))
    return state, compiler.write(state), sum(o.bytes for o in chosen.values())


def coarse(budget: BudgetState, o: allocate.Option) -> bool:
    """Whether the budget prices this candidate on a measurement: a grid of `measure_bits` or fewer."""
    return not o.keep_float and o.bits <= budget.config.measure_bits


def measure_new(budget: BudgetState, state: State, chosen: dict) -> bool:
    """Measure ΔL_even of the chosen coarse grids not measured yet, on their errors as `state` stores them (GPTQ's
    codes, low-rank corrections and all), and record them in `budget.measured`; whether there were any (then the
    prices changed and the allocation must be made again)."""
    if budget.even_loss is None:
        return False
    todo = {}
    for e in state.stored_entries():
        o = chosen.get(e.name)
        if o is None or not coarse(budget, o) or option_key(o) in budget.measured.get(e.name, {}):
            continue
        w = quant.as_matrix(e.tensor)
        w_hat = quant.dequantize(e.codes, e.scales, e.plan.quant.group, torch.float32, w.shape, e.lowrank)
        copies = [a.name for a in state.entries if a.alias_of == e.name and not a.transposed]
        error = (w_hat - w).reshape(e.tensor.shape)
        todo[e.name] = (o, [(e.name, error)] + [(name, error) for name in copies])
    if not todo:
        return False
    even = budget.even_loss({name: targets for name, (_, targets) in todo.items()})
    for name, (o, _) in sorted(todo.items()):
        predicted = next(p.loss for p in budget.modelled(name) if option_key(p) == option_key(o) and not p.keep_float)
        budget.measured.setdefault(name, {})[option_key(o)] = (predicted, even[name])
        budget.report(f"measured {name} {describe(o)}: ΔL {even[name]:+.2e}, the quadratic model {predicted:.2e} "
                      f"({even[name] / predicted:.1f}x)")
    return True


def describe(o: allocate.Option) -> str:
    """A candidate in a few characters: int2 k1.5 g128 r1."""
    return f"int{o.bits} k{o.clip_k:g}" + (f" g{o.group}" if o.group else "") + (f" r{o.rank}" if o.rank else "")


def measurements(budget: BudgetState, state: State) -> tuple[list, list]:
    """([{name, grid, predicted, measured}] of the stored grids priced on a measurement, [warnings]): a line when
    coarse grids were chosen that nothing could measure (no calibration model), so their price is the quadratic
    model's, which can be several times too low (squeeze/measured.py)."""
    rows, blind = [], []
    for e in state.stored_entries():
        if e.plan is None or e.plan.scheme != "int" or not e.plan.reason.startswith("budget"):
            continue
        q = e.plan.quant
        key = (q.bits, q.clip_value, q.group, e.plan.lowrank_rank)
        if key in budget.measured.get(e.name, {}):
            predicted, even = budget.measured[e.name][key]
            rows.append({"name": e.name, "grid": describe(allocate.Option(*key[:2], 0, 0, rank=key[3],
                                                                          group=key[2])),
                         "predicted": predicted, "measured": even})
        elif q.bits <= budget.config.measure_bits:
            blind.append(e.name)
    warnings = [f"budget: {len(blind)} grid(s) of {budget.config.measure_bits} bits or fewer priced on the quadratic "
                f"model alone (no calibration model to measure them on; it can be several times too low): "
                f"{', '.join(blind)}"] if blind else []
    return rows, warnings


def _coders(recipe: Recipe, planned: State, codes_only: bool = False) -> set:
    """The codecs the planned sections (or only those of quantized codes) may end up with."""
    plans = [e.plan for e in planned.stored_entries() if e.plan is not None and (e.plan.scheme == "int" or
                                                                                 not codes_only)]
    codecs, enc = {p.codec for p in plans}, recipe.encode
    auto = set(enc.codes_candidates or enc.candidates) if codes_only else \
        set(enc.candidates) | set(enc.codes_candidates or ())
    return (codecs - {"auto"}) | (auto if "auto" in codecs else set())


def _rounds_recipe(recipe: Recipe, planned: State) -> Recipe | None:
    """The recipe the rounds code with: rans alone on the sections of codes (nearly all the bytes, and where the
    budget's choices change them every round), when rans is one of several coders those may use; the scale and
    float sections as the recipe says (mostly unchanged from round to round, so the encode memo codes them once).
    None when that is the recipe itself: the rounds' coder is the final one."""
    coders = _coders(recipe, planned, codes_only=True)
    if "rans" not in coders or coders == {"rans"}:
        return None
    return dataclasses.replace(recipe, encode=dataclasses.replace(recipe.encode, codes_candidates=("rans",)))


def budget_names(state_dict: dict, recipe: Recipe) -> list:
    """The tensors (and slices) a budget compile with `recipe` decides, which need measured sensitivities."""
    base = State(entries=compiler.entries_from_state_dict(state_dict), recipe=recipe)
    for _, fn, config in pipeline.passes_for(recipe, until="plan"):
        base = fn(base, config)
    return [e.name for e in allocate.allocatable(base)]
