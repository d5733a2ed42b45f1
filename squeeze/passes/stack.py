"""stack: view each N-D weight as a stack of matrices, one entry per slice.

Recent Parameter Golf records keep their block matrices in 3-D parameter banks (`qo_bank [2L, d, d]`, used as
`F.linear(x, qo_bank[i])`). As one [R, C] matrix with R = shape[0] a bank would get one scale per whole layer matrix
and no Hessian (GPTQ's rows are a slice's rows). Each slice instead becomes an entry of its own, named `name[i]`
(leading dims flattened row-major, the naming calibration uses too: squeeze/operands.py), of shape `shape[-2:]`: it
gets per-row scales, its own Hessian and GPTQ, its own grid under a budget, its own line in inspect. The header keeps
the slices and a `stack` object that puts them back together under the checkpoint's name (docs/FORMAT.md, 1.3).

Only tensors the recipe would quantize are split: control and small tensors stay one float tensor, so a [L, 2, 2]
mixing table does not become L header entries.
"""
import dataclasses
from dataclasses import dataclass

from ..dtypes import FLOAT_CODES
from ..errors import CheckpointError
from ..quant import numel
from ..state import State


@dataclass(frozen=True)
class StackConfig:
    max_float_numel: int = 65536    # tensors this small stay whole (the recipe's [keep_float] max_numel)


def is_stack(shape) -> bool:
    """A tensor of 3+ dims whose last two dims are a matrix (≥ 2 × 2): its leading dims index the slices."""
    return len(shape) >= 3 and int(shape[-2]) >= 2 and int(shape[-1]) >= 2


def n_slices(shape) -> int:
    return numel(shape[:-2])


def slice_names(name: str, shape) -> list:
    return [f"{name}[{i}]" for i in range(n_slices(shape))]


def splits(e, config: StackConfig) -> bool:
    return (e.alias_of is None and e.dtype in FLOAT_CODES and e.role != "control" and is_stack(e.shape)
            and e.numel > config.max_float_numel)


def run(state: State, config: StackConfig = StackConfig()) -> State:
    taken = {e.name for e in state.entries}
    out = []
    for e in state.entries:
        if not splits(e, config):
            out.append(e)
            continue
        rows, cols = int(e.shape[-2]), int(e.shape[-1])
        matrices = e.tensor.reshape(-1, rows, cols)
        for i, name in enumerate(slice_names(e.name, e.shape)):
            if name in taken:
                raise CheckpointError(f"{name}: the checkpoint has a tensor of this name, which is also the name of "
                                      f"slice {i} of {e.name} {list(e.shape)}")
            out.append(dataclasses.replace(e, name=name, shape=(rows, cols), tensor=matrices[i], stack_of=e.name,
                                           stack_shape=tuple(e.shape)))
    return dataclasses.replace(state, entries=tuple(out))
