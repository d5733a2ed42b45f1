"""pack: every stored tensor becomes byte parts: `data` (float/raw), or `codes` + `scales` (+ `lowrank`) (quantized).

Codes are written unsigned (u = q + 2^(N-1) - 1), one per byte or as dense N-bit fields (squeeze/packing.py).

Parts are laid out section by section, in the order the encode pass groups them (passes/encode.py, `group_key`),
in one buffer per section, and each part is a read-only view of its buffer: encode then codes a section straight
from its buffer instead of joining a copy of every part (a second copy of all the codes at scale).
"""
import dataclasses

from .. import packing
from ..dtypes import tensor_to_bytes, torch_dtype
from ..state import State
from .encode import group_key


def parts_of(e) -> tuple:
    p = e.plan
    if p.scheme == "int":
        u = (e.codes.to("cpu").numpy().astype("int16") + packing.offset(p.quant.bits)).astype("uint8")
        parts = (("codes", packing.pack(u, p.quant.bits, p.pack)), ("scales", tensor_to_bytes(e.scales)))
        if e.lowrank is not None:  # squeeze/factors.py: the part as docs/FORMAT.md lays it out
            parts += (("lowrank", e.lowrank.to_bytes()),)
        return parts
    return (("data", tensor_to_bytes(e.tensor.to(torch_dtype(p.store)))),)


def part_sizes(e) -> tuple:
    """((kind, bytes), ...) of the parts parts_of(e) makes, without making them."""
    p = e.plan
    if p.scheme == "int":
        sizes = (("codes", packing.packed_size(e.codes.numel(), p.quant.bits, p.pack)),
                 ("scales", e.scales.numel() * e.scales.element_size()))
        if e.lowrank is not None:
            sizes += (("lowrank", e.lowrank.nbytes),)
        return sizes
    return (("data", e.tensor.numel() * torch_dtype(p.store).itemsize),)


def run(state: State, config=None) -> State:
    """No config: the layout is per tensor (plan.pack)."""
    group_by = state.recipe.encode.group_by
    spots, sizes = {}, {}  # entry index -> [(kind, section key, offset, size)]; section key -> bytes so far
    for i, e in enumerate(state.entries):
        if e.alias_of:
            continue
        spots[i] = []
        for kind, n in part_sizes(e):
            key = group_key(e, kind, group_by)
            spots[i].append((kind, key, sizes.get(key, 0), n))
            sizes[key] = sizes.get(key, 0) + n
    buffers = {key: bytearray(n) for key, n in sizes.items()}
    for i, places in spots.items():
        for (kind, data), (kind_, key, offset, n) in zip(parts_of(state.entries[i]), places, strict=True):
            if kind != kind_ or len(data) != n:
                raise AssertionError(f"pack: {state.entries[i].name} {kind}: {len(data)} bytes, expected {n}")
            buffers[key][offset: offset + n] = data
    views = {key: memoryview(b).toreadonly() for key, b in buffers.items()}
    entries = tuple(e if i not in spots else dataclasses.replace(
        e, parts=tuple((kind, views[key][offset: offset + n]) for kind, key, offset, n in spots[i]))
        for i, e in enumerate(state.entries))
    return dataclasses.replace(state, entries=entries)
