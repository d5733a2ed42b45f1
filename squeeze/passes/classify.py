"""classify: give each tensor a role (embedding, attention, mlp, control, other) from its name and shape.

Roles choose default routing (control tensors stay float), group tensors into sections (codes of one role share
statistics, so they compress better together), and label inspect's report.
"""
import dataclasses
import re
from dataclasses import dataclass

from ..quant import numel
from ..recipe import CONTROL_PATTERNS, Recipe
from ..state import State

_EMBEDDING = re.compile(r"emb|wte|wpe|lm_head|(^|\.)output\.weight$")
# parameter banks of the records: qo_bank (query and output projections), kv_bank (key and value)
_ATTENTION = re.compile(r"attn|attention|(^|\.)(c_q|c_k|c_v|q_proj|k_proj|v_proj|o_proj|qkv|wq|wk|wv|wo)(\.|$)|"
                        r"(^|[._])(qo|kv|qkv|q|k|v|o)_bank")
_MLP = re.compile(r"mlp|ffn|feed_forward|(^|\.)(fc\d?|c_fc|c_proj|up_proj|down_proj|gate_proj|w[123])(\.|$)")


@dataclass(frozen=True)
class ClassifyConfig:
    control_patterns: tuple = CONTROL_PATTERNS
    recipe: Recipe | None = None    # its [roles] table comes first


def role_of(name: str, shape, config: ClassifyConfig = ClassifyConfig()) -> str:
    given = config.recipe.role_for(name) if config.recipe is not None else None
    if given is not None:
        return given
    if any(p in name for p in config.control_patterns) or numel(shape) == 1:
        return "control"
    for role, pattern in (("embedding", _EMBEDDING), ("attention", _ATTENTION), ("mlp", _MLP)):
        if pattern.search(name):
            return role
    return "other"


def run(state: State, config: ClassifyConfig = ClassifyConfig()) -> State:
    # a slice is classified by its stack (squeeze/passes/stack.py), so every run gives all slices one role
    entries = tuple(dataclasses.replace(e, role=role_of(e.stack_of or e.name, e.stack_shape or e.shape, config))
                    for e in state.entries)
    return dataclasses.replace(state, entries=entries)
