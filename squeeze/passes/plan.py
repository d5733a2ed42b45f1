"""plan: turn the recipe's rules into a storage plan per tensor (scheme, bits, clip, float dtype, pack, codec)."""
import dataclasses
from dataclasses import dataclass

from ..dtypes import FLOAT_CODES
from ..recipe import Recipe
from ..state import Plan, State


@dataclass(frozen=True)
class PlanConfig:
    recipe: Recipe = Recipe()


def plan_for(name: str, dtype: str, role: str, numel: int, recipe: Recipe, calibrated: bool = False) -> Plan:
    """`calibrated`: compile has an input Hessian for this tensor, so "auto" means GPTQ."""
    if dtype not in FLOAT_CODES:
        return Plan(scheme="raw", store=dtype, codec=recipe.defaults.codec, reason="integer: stored as is")
    s, why = recipe.settings_for(name, role, numel)
    if s.scheme == "float" or numel == 0:
        store = dtype if s.float_dtype == "keep" else s.float_dtype
        return Plan(scheme="float", store=store, codec=s.codec, reason=why)
    pack = s.pack if s.pack != "auto" else ("dense" if s.codec == "raw" else "byte")
    method = s.method if s.method != "auto" else ("gptq" if calibrated else "rtn")
    return Plan(scheme="int", quant=s.quant_spec(), pack=pack, codec=s.codec, method=method,
                lowrank_rank=s.lowrank_rank, reason=why)


def run(state: State, config: PlanConfig) -> State:
    entries = tuple(
        e if e.alias_of else dataclasses.replace(
            e, plan=plan_for(e.name, e.dtype, e.role, e.numel, config.recipe, e.name in state.hessians))
        for e in state.entries)
    return dataclasses.replace(state, entries=entries)
