"""quantize: round-to-nearest symmetric int-N codes and scales for every tensor planned as "int"."""
import dataclasses

from .. import quant
from ..errors import CheckpointError
from ..state import State


def run(state: State, config=None) -> State:
    """No config: the per-tensor QuantSpec lives in each entry's plan."""
    out = []
    for e in state.entries:
        if e.plan is not None and e.plan.scheme == "int":
            try:
                codes, scales = quant.quantize(e.tensor, e.plan.quant, e.name)
            except ValueError as err:
                raise CheckpointError(str(err)) from None
            e = dataclasses.replace(e, codes=codes, scales=scales)
        out.append(e)
    return dataclasses.replace(state, entries=tuple(out))
