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

from . import compiler, parallel, pipeline
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

    def options(self) -> dict:
        """Each tensor's hull: its screened candidates, those GPTQ has re-priced replaced by their GPTQ prices."""
        return {name: allocate.lower_hull([self.refined[name].get(allocate.grid_of(o), o) for o in hull]
                                          + self.corrections.get(name, []))
                if name in self.refined else hull for name, hull in self.screened.items()}


def compile_to_budget(state_dict: dict, recipe: Recipe, budget_bytes: int, *, sensitivities: dict,
                      hessians: dict | None = None, code_bytes: int = 0, log=None, max_rounds: int = 8,
                      device: str = "cpu", allocate_config: allocate.AllocateConfig | None = None,
                      calibration_skips: dict | None = None, strict_calib: bool = False,
                      progress=None) -> compiler.CompileResult:
    """The artifact with the lowest predicted loss whose size plus `code_bytes` (the user's code and decoder) is at
    most `budget_bytes`. `allocate_config`: the candidates (default: the recipe's [budget] table); `progress`: a
    callable taking one line per round."""
    planned = State(entries=compiler.entries_from_state_dict(state_dict), recipe=recipe, hessians=hessians or {},
                    sensitivities=sensitivities, device=device, calibration_skips=calibration_skips or {},
                    strict_calib=strict_calib)
    for _, fn, config in pipeline.passes_for(recipe, until="plan"):
        planned = fn(planned, config)
    budget = price(planned, allocate_config or allocate.AllocateConfig.from_recipe(recipe),
                   budget_bytes - code_bytes)
    fast = _rounds_recipe(recipe, planned)

    def report(line: str):
        if progress is not None:
            progress(line)

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
    fitted = rounds.fit(budget.target - (len(blob) - spent), budget.target)
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
    return compiler.CompileResult(blob=blob, state=state)


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
        while self.left > 0:
            self.left -= 1
            state, blob, _ = attempt(self.budget, pool, self.recipe, predict=True, log=self.log)
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
    what the rest of the artifact costs."""
    if trial:
        options = budget.options()
        chosen = {name: hull[0] for name, hull in options.items()}
    else:
        chosen = choose(budget, pool)
    gptq_config = gptq.GPTQConfig.from_recipe(recipe, budget.planned.device)
    configs = {"allocate": allocate.Allocation(chosen, round_to_nearest=trial,
                                               lowrank_spec=budget.config.lowrank_spec),
               "gptq": dataclasses.replace(gptq_config, memo=budget.gptq_memo),
               "encode": dataclasses.replace(encode.EncodeConfig.from_recipe(recipe), memo=budget.encode_memo)}
    state = pipeline.run(dataclasses.replace(budget.planned, recipe=recipe), log=log, after="plan", configs=configs)
    if predict:  # the prediction is header meta, so it is in the bytes the budget counts
        state = dataclasses.replace(state, predicted_loss=allocate.predicted_loss(state, budget.loss_memo))
    return state, compiler.write(state), sum(o.bytes for o in chosen.values())


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
