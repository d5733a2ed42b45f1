"""load: artifact -> {name: tensor}, exactly as docs/FORMAT.md reconstructs it (the library's `squeeze.load`).

format.read has checked every header field; what is left for here are the checks on decoded bytes (code ranges,
bool bytes), which only decoding can make.
"""
import sys
from pathlib import Path

import numpy as np
import torch

from . import factors, format, memory, packing, quant
from .dtypes import itemsize, tensor_from_bytes, torch_dtype
from .errors import FormatError


def read_artifact(path_or_bytes, max_decoded_bytes: int = format.MAX_DECODED) -> format.Artifact:
    if isinstance(path_or_bytes, (bytes, bytearray, memoryview)):
        return format.read(bytes(path_or_bytes), max_decoded_bytes=max_decoded_bytes)
    path = str(path_or_bytes)
    if Path(path).exists() and not Path(path).is_file():  # a directory, a FIFO, /dev/zero: nothing to read whole
        raise FormatError(f"{path}: cannot read (not a regular file)")
    try:
        blob = Path(path).read_bytes()
    except OSError as e:
        raise FormatError(f"{path}: cannot read ({e.strerror or e})") from None
    return format.read(blob, source=path, max_decoded_bytes=max_decoded_bytes)


def _codes(art: format.Artifact, t: dict, rows: int, cols: int, what: str) -> torch.Tensor:
    """Signed int8 codes [rows, cols]; a stored value outside the symmetric range is damage no CRC saw."""
    q = t["q"]
    u = packing.unpack(art.part(t["codes"]), rows * cols, q["bits"], q["pack"])
    top = 2 * packing.offset(q["bits"])
    if u.size and int(u.max()) > top:
        raise FormatError(f"{what}: a stored code {int(u.max())} is out of range for int{q['bits']} (0..{top})")
    return torch.from_numpy((u.astype(np.int16) - packing.offset(q["bits"])).astype(np.int8)).reshape(rows, cols)


def decode_tensor(art: format.Artifact, t: dict) -> torch.Tensor:
    """One stored (non-alias) tensor."""
    dtype, what = torch_dtype(t["dtype"]), f"{art.source}: tensor {t['name']}"
    if "data" in t:
        data = art.part(t["data"])
        if t["store"] == "bool" and data.translate(None, b"\x00\x01"):
            raise FormatError(f"{what}: bool data holds a byte other than 0 or 1")
        return tensor_from_bytes(data, t["store"], t["shape"]).to(dtype)
    q = t["q"]
    rows, cols = quant.matrix_shape(t["shape"])
    if rows * cols == 0:  # nothing to reconstruct (and no [0, -1] view of the scales to take)
        return torch.empty(tuple(t["shape"]), dtype=dtype)
    codes = _codes(art, t, rows, cols, what)
    # A group wider than a row is one group per row; clamping it keeps the scale broadcast at [rows, cols] however
    # large a group the header declares.
    group = min(q["group"], cols)
    scales = tensor_from_bytes(art.part(t["scales"]), q["sdtype"], (rows, quant.n_groups(cols, group)))
    return quant.dequantize(codes, scales, group, dtype, t["shape"], lowrank_factors(art, t, rows, cols))


def lowrank_factors(art: format.Artifact, t: dict, rows: int, cols: int):
    """The factors of a tensor's low-rank correction (squeeze/factors.py), or None (docs/FORMAT.md, 1.2 and 1.4)."""
    if "lowrank" not in t:
        return None
    return factors.from_part(t["q"], art.part(t["lowrank"]), rows, cols, f"{art.source}: tensor {t['name']}")


def _stored_tensors(art: format.Artifact, by_section: bool = False):
    """(header object, decoded tensor) of every stored tensor (not aliases or stacks), in header order, or grouped by
    the section holding their codes or data (`by_section`: one large section decoded at a time, not all of them).
    Each decoded section is dropped from the artifact's cache once no later tensor reads it."""
    order = [t for t in art.tensors if "stack" not in t and "alias" not in t]
    if by_section:
        order.sort(key=lambda t: (t["codes"] if "codes" in t else t["data"])[0])
    last = {}  # section -> the last tensor in `order` that reads it
    for j, t in enumerate(order):
        for kind in format.PART_KINDS:
            if kind in t:
                last[t[kind][0]] = j
    release = {}
    for i, j in last.items():
        release.setdefault(j, []).append(i)
    for j, t in enumerate(order):
        yield t, decode_tensor(art, t)
        for i in release.get(j, ()):
            art._decoded.pop(i, None)  # format.Artifact's cache of decoded sections
        if j in release:
            memory.trim()


def load(path_or_bytes, max_decoded_bytes: int = format.MAX_DECODED) -> dict:
    """All tensors of an artifact, in the checkpoint's original order; aliases share their target's tensor, a stack
    (format 1.3) is its slices put together. FormatError for anything malformed; artifacts decoding to more than
    `max_decoded_bytes` are refused."""
    art = read_artifact(path_or_bytes, max_decoded_bytes)
    out = {t["name"]: x for t, x in _stored_tensors(art, by_section=True)}
    for t in art.tensors:
        if "stack" in t:
            slices = [out.pop(name).reshape(-1) for name in t["stack"]]
            out[t["name"]] = torch.cat(slices + [torch.empty(0, dtype=torch_dtype(t["dtype"]))]).reshape(t["shape"])
    result = {}
    for t in art.tensors:
        if "alias" in t:
            target = out[t["alias"]]
            result[t["name"]] = target.t().contiguous() if t["t"] else target
        elif t["name"] in out:
            result[t["name"]] = out[t["name"]]
    return result


def check(path_or_bytes, max_decoded_bytes: int | None = None) -> int:
    """Decode every stored tensor of an artifact as `load` does, one at a time, keeping none; the number of tensors
    decoded. What compile does to the file it wrote before that file replaces anything: the same checks as load,
    with memory for one tensor and the decoded sections still to be read instead of the whole model. Without
    `max_decoded_bytes`, no bound on the decoded size (the file is our own output, not an untrusted one)."""
    memory.trim()
    art = read_artifact(path_or_bytes, sys.maxsize if max_decoded_bytes is None else max_decoded_bytes)
    return sum(1 for _ in _stored_tensors(art, by_section=True))
