"""The pass pipeline: runs tie -> classify -> stack -> plan -> allocate -> quantize -> gptq -> lowrank -> pack ->
encode and records what each did."""
import dataclasses
import time

from .passes import allocate, classify, encode, gptq, lowrank, pack, plan, quantize, stack, tie
from .recipe import Recipe
from .state import PassRecord, State


def passes_for(recipe: Recipe, device: str = "cpu", until: str | None = None) -> list:
    """(name, run, config) for each pass, configs derived from the recipe; `device` is where GPTQ computes; `until`:
    stop after the pass of that name (the budget loop runs the passes up to "plan" once). The allocate pass has no
    config here: only the budget loop (squeeze/budget.py) gives it one, an allocation."""
    passes = [
        ("tie", tie.run, tie.TieConfig()),
        ("classify", classify.run, classify.ClassifyConfig(control_patterns=recipe.keep_float.control_patterns,
                                                           recipe=recipe)),
        ("stack", stack.run, stack.StackConfig(max_float_numel=recipe.keep_float.max_numel)),
        ("plan", plan.run, plan.PlanConfig(recipe=recipe)),
        ("allocate", allocate.run, None),
        ("quantize", quantize.run, None),
        ("gptq", gptq.run, gptq.GPTQConfig.from_recipe(recipe, device)),
        ("lowrank", lowrank.run, lowrank.LowRankConfig()),
        ("pack", pack.run, None),
        ("encode", encode.run, encode.EncodeConfig.from_recipe(recipe)),
    ]
    if until is not None:
        names = [name for name, _, _ in passes]
        passes = passes[: names.index(until) + 1]
    return passes


def run(state: State, log=None, after: str | None = None, configs: dict | None = None,
        until: str | None = None) -> State:
    """Run every pass (those after the one named `after`, when given, and up to the one named `until`); `configs`
    ({pass name: config}) replaces the recipe's configs of those passes (the budget loop's allocation and GPTQ memo);
    `log` (a callable taking a PassRecord) sees each pass as it finishes (the CLI's --verbose)."""
    passes = passes_for(state.recipe, state.device, until=until)
    if after is not None:
        passes = passes[[name for name, _, _ in passes].index(after) + 1:]
    for name, fn, config in passes:
        config = (configs or {}).get(name, config)
        before, t0 = state.nbytes(), time.perf_counter()
        state = fn(state, config)
        record = PassRecord(name=name, seconds=time.perf_counter() - t0, bytes_in=before, bytes_out=state.nbytes())
        state = dataclasses.replace(state, log=state.log + (record,))
        if log is not None:
            log(record)
    return state
