"""tie: store tensors that share storage, are bit-identical, or are a transposed copy of another, only once.

A tied LM head (`lm_head.weight is tok_emb.weight`) arrives from torch.save as two names on one storage, and from
safetensors as two identical copies; both become one stored tensor plus an alias in the header.
"""
import dataclasses
import hashlib
from dataclasses import dataclass

from ..dtypes import tensor_to_bytes
from ..state import State


@dataclass(frozen=True)
class TieConfig:
    identical: bool = True      # alias bit-identical copies, not only shared storage
    transposed: bool = True     # alias a 2-D tensor equal to another's transpose


def _key(dtype: str, shape, data: bytes):
    return dtype, tuple(shape), hashlib.sha256(data).digest()


def run(state: State, config: TieConfig = TieConfig()) -> State:
    by_storage = {}     # (data_ptr, offset, shape, stride, dtype) -> name
    # (dtype, shape, digest) -> (name, tensor): the bytes are re-made on a digest hit (rare) rather than kept for every
    # tensor, which would hold a second copy of the checkpoint for the whole compile
    by_bytes = {}
    out = []
    for e in state.entries:
        if e.alias_of is not None:  # tied by an earlier run (the budget loop ties once, then runs the rest)
            out.append(e)
            continue
        t = e.tensor
        storage_key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
        target, transposed = by_storage.get(storage_key) if t.numel() else None, False
        data = None
        if target is None and config.identical:
            data = tensor_to_bytes(t)
            hit = by_bytes.get(_key(e.dtype, e.shape, data))
            if hit is not None and tensor_to_bytes(hit[1]) == data:
                target = hit[0]
            elif config.transposed and t.dim() == 2:
                t_data = tensor_to_bytes(t.t())
                hit = by_bytes.get(_key(e.dtype, (e.shape[1], e.shape[0]), t_data))
                if hit is not None and tensor_to_bytes(hit[1]) == t_data:
                    target, transposed = hit[0], True
        if target is not None:
            out.append(dataclasses.replace(e, tensor=None, alias_of=target, transposed=transposed))
            continue
        if t.numel():
            by_storage[storage_key] = e.name
        if config.identical:
            by_bytes.setdefault(_key(e.dtype, e.shape, data), (e.name, t))
        out.append(e)
    # calibration keys a tied weight by the name the model uses it under, which may be the alias
    hessians = dict(state.hessians)
    for e in out:
        if e.alias_of is not None and not e.transposed and e.name in hessians and e.alias_of not in hessians:
            hessians[e.alias_of] = hessians.pop(e.name)
    return dataclasses.replace(state, entries=tuple(out), hessians=hessians)
