"""plan: turn the recipe's rules into a storage plan per tensor (scheme, bits, clip, float dtype, pack, codec)."""
import dataclasses
from dataclasses import dataclass

from ..dtypes import FLOAT_CODES, itemsize
from ..recipe import Recipe
from ..state import Plan, State


@dataclass(frozen=True)
class PlanConfig:
    recipe: Recipe = Recipe()


def plan_for(name: str, dtype: str, role: str, numel: int, recipe: Recipe, calibrated: bool = False,
             parent: str | None = None) -> Plan:
    """`calibrated`: compile has calibration data, so "auto" means GPTQ (the gptq pass says which tensors had no
    Hessian and kept round-to-nearest); `parent`: the stack a slice belongs to."""
    if dtype not in FLOAT_CODES:
        return Plan(scheme="raw", store=dtype, codec=recipe.defaults.codec, reason="integer: stored as is")
    s, why = recipe.settings_for(name, role, numel, parent)
    if s.scheme == "float" or numel == 0:
        store = dtype if s.float_dtype == "keep" else s.float_dtype
        if itemsize(store) > itemsize(dtype):  # a wider store holds no more information (fp8/bf16 controls in f32)
            store, why = dtype, f"{why}; kept {dtype}, narrower than {store}"
        return Plan(scheme="float", store=store, codec=s.codec, reason=why)
    pack = s.pack if s.pack != "auto" else ("dense" if s.codec == "raw" else "byte")
    method = s.method if s.method != "auto" else ("gptq" if calibrated else "rtn")
    return Plan(scheme="int", quant=s.quant_spec(), pack=pack, codec=s.codec, method=method,
                lowrank_rank=s.lowrank_rank, lowrank_spec=s.factor_spec(), reason=why)


def run(state: State, config: PlanConfig) -> State:
    entries = tuple(
        e if e.alias_of else dataclasses.replace(
            e, plan=plan_for(e.name, e.dtype, e.role, e.numel, config.recipe, bool(state.hessians), e.stack_of))
        for e in state.entries)
    return dataclasses.replace(state, entries=entries)
