"""pack: every stored tensor becomes byte parts: `data` (float/raw), or `codes` + `scales` (+ `lowrank`) (quantized).

Codes are written unsigned (u = q + 2^(N-1) - 1), one per byte or as dense N-bit fields (squeeze/packing.py).
"""
import dataclasses

from .. import packing
from ..dtypes import tensor_to_bytes, torch_dtype
from ..state import State


def parts_of(e) -> tuple:
    p = e.plan
    if p.scheme == "int":
        u = (e.codes.to("cpu").numpy().astype("int16") + packing.offset(p.quant.bits)).astype("uint8")
        parts = (("codes", packing.pack(u, p.quant.bits, p.pack)), ("scales", tensor_to_bytes(e.scales)))
        if e.lowrank is not None:  # U then V, row-major (docs/FORMAT.md)
            parts += (("lowrank", b"".join(tensor_to_bytes(f.contiguous()) for f in e.lowrank)),)
        return parts
    return (("data", tensor_to_bytes(e.tensor.to(torch_dtype(p.store)))),)


def run(state: State, config=None) -> State:
    """No config: the layout is per tensor (plan.pack)."""
    entries = tuple(e if e.alias_of else dataclasses.replace(e, parts=parts_of(e)) for e in state.entries)
    return dataclasses.replace(state, entries=entries)
