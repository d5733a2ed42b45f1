"""load: artifact -> {name: tensor}, exactly as docs/FORMAT.md reconstructs it (the library's `squeeze.load`)."""
from pathlib import Path

import numpy as np
import torch

from . import format, packing, quant
from .dtypes import tensor_from_bytes, torch_dtype
from .errors import FormatError


def read_artifact(path_or_bytes) -> format.Artifact:
    if isinstance(path_or_bytes, (bytes, bytearray, memoryview)):
        return format.read(bytes(path_or_bytes))
    path = str(path_or_bytes)
    try:
        blob = Path(path).read_bytes()
    except OSError as e:
        raise FormatError(f"{path}: cannot read ({e.strerror or e})") from None
    return format.read(blob, source=path)


def decode_tensor(art: format.Artifact, t: dict) -> torch.Tensor:
    """One stored (non-alias) tensor."""
    dtype = torch_dtype(t["dtype"])
    if "data" in t:
        return tensor_from_bytes(art.part(t["data"]), t["store"], t["shape"]).to(dtype)
    q = t["q"]
    rows, cols = quant.matrix_shape(t["shape"])
    u = packing.unpack(art.part(t["codes"]), rows * cols, q["bits"], q["pack"])
    codes = torch.from_numpy((u.astype(np.int16) - packing.offset(q["bits"])).astype(np.int8)).reshape(rows, cols)
    scales = tensor_from_bytes(art.part(t["scales"]), q["sdtype"], (rows, quant.n_groups(cols, q["group"])))
    return quant.dequantize(codes, scales, q["group"], dtype, t["shape"])


def load(path_or_bytes) -> dict:
    """All tensors of an artifact, in the checkpoint's original order; aliases share their target's tensor."""
    art = read_artifact(path_or_bytes)
    out = {}
    for t in art.tensors:
        if "alias" not in t:
            out[t["name"]] = decode_tensor(art, t)
    result = {}
    for t in art.tensors:
        if "alias" in t:
            target = out[t["alias"]]
            result[t["name"]] = target.t().contiguous() if t["t"] else target
        else:
            result[t["name"]] = out[t["name"]]
    return result
