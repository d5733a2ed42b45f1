"""compile: state dict + recipe -> artifact bytes (the library's `squeeze.compile`)."""
import dataclasses

import torch

from . import codecs, format, pipeline
from .dtypes import code_of, not_finite, out_of_range
from .errors import CheckpointError
from .recipe import Recipe
from .state import State, TensorEntry

__version__ = "0.1.0"


@dataclasses.dataclass(frozen=True)
class CompileResult:
    blob: bytes
    state: State            # the final compiler state: plans, codes, sections, the pass log
    measured: tuple = ()    # a budget's grids priced on their measured loss: {name, grid, predicted, measured}
    warnings: tuple = ()    # one line each: what the compile could not do as asked (a budget's unmeasured grids)


def entries_from_state_dict(state_dict: dict) -> tuple:
    entries = []
    for name, t in state_dict.items():
        if not (isinstance(name, str) and name and name.isprintable()):  # what format.read accepts
            raise CheckpointError(f"{name!r}: a tensor name must be a non-empty printable string")
        if not isinstance(t, torch.Tensor):
            raise CheckpointError(f"{name}: not a tensor ({type(t).__name__})")
        try:
            dtype = code_of(t.dtype)
        except KeyError:
            raise CheckpointError(f"{name}: dtype {t.dtype} is not supported") from None
        if t.is_floating_point() and t.numel() and not_finite(t).any():
            bad = not_finite(t).sum().item()
            raise CheckpointError(f"{name}: {bad} NaN/Inf value(s); squeeze refuses to compile non-finite weights")
        entries.append(TensorEntry(name=name, dtype=dtype, shape=tuple(t.shape), tensor=t.detach().cpu()))
    return tuple(entries)


def check_float_range(state: State):
    """A tensor kept float in a narrower dtype must fit it: a cast to fp16 turns 1e5 into inf without a word, one to
    fp8 e4m3 into 448."""
    for e in state.stored_entries():
        if e.plan.scheme != "float" or e.plan.store == e.dtype or not e.tensor.numel():
            continue
        overflow = out_of_range(e.tensor, e.plan.store)
        if overflow.any():
            largest = e.tensor[overflow].float().abs().max().item()
            raise CheckpointError(
                f"{e.name}: {int(overflow.sum())} value(s) exceed the range of {e.plan.store} (largest magnitude "
                f"{largest:.6g}); keep it fp32 with a recipe rule: match = \"{e.name}\", scheme = \"float\", "
                f"float_dtype = \"fp32\"")


def header_of(state: State) -> dict:
    """The header object (docs/FORMAT.md, "Header") for a fully encoded state."""
    where = {}  # (tensor, kind) -> [section, offset, length]
    for i, s in enumerate(state.sections):
        for tensor, kind, off, n in s.members:
            where[(tensor, kind)] = [i, off, n]
    tensors = []
    for i, e in enumerate(state.entries):
        tensors.append(_tensor_object(e, where))
        following = state.entries[i + 1] if i + 1 < len(state.entries) else None
        if e.stack_of is not None and (following is None or following.stack_of != e.stack_of):
            # the slices are written first, then the object that stacks them under the checkpoint's name (1.3)
            slices = [s.name for s in state.entries if s.stack_of == e.stack_of]
            tensors.append({"name": e.stack_of, "shape": list(e.stack_shape), "dtype": e.dtype, "role": e.role,
                            "stack": slices})
    sections = [{"name": s.name, "codec": s.codec, "size": len(s.stored), "raw": s.raw_size,
                 "crc": format.crc32(s.stored), "shuffle": s.shuffle} for s in state.sections]
    meta = {"producer": f"squeeze {__version__}", "recipe": state.recipe.name}
    if state.predicted_loss is not None:  # what the budget allocator expects verify to measure (inspect shows both)
        meta["predicted_loss_increase"] = f"{state.predicted_loss:.4g}"
    return {"sections": sections, "tensors": tensors, "meta": meta}


def _tensor_object(e: TensorEntry, where: dict) -> dict:
    """One entry's header object (an alias, a float-stored or a quantized tensor)."""
    t = {"name": e.name, "shape": list(e.shape), "dtype": e.dtype, "role": e.role}
    if e.alias_of is not None:
        t.update({"alias": e.alias_of, "t": int(e.transposed)})
    elif e.plan.scheme == "int":
        q = e.plan.quant
        t["q"] = {"bits": q.bits, "group": q.group, "pack": e.plan.pack, "sdtype": q.scale_dtype,
                  "clip": q.describe_clip()}
        if e.method_used == "gptq":  # informational, like clip
            t["q"]["method"] = "gptq"
        if e.lowrank is not None:
            t["q"].update(e.lowrank.header())
        t["codes"], t["scales"] = where[(e.name, "codes")], where[(e.name, "scales")]
        if e.lowrank is not None:
            t["lowrank"] = where[(e.name, "lowrank")]
    else:
        t.update({"store": e.plan.store, "data": where[(e.name, "data")]})
    return t


def write(state: State) -> bytes:
    """Write with the header codec that gives the smallest file among those the sections already use (plus zlib,
    which every decoder has for CRC-32), so the tiny decoder needs no extra codec for the header. Layout-aware codecs
    (rans) code sections only. Every compile path ends here, so this is where values a float dtype cannot hold are
    refused."""
    check_float_range(state)
    header = header_of(state)
    used = ["zlib"] + [s.codec for s in state.sections if not codecs.uses_layout(s.codec)]
    blobs = [format.write(header, [s.stored for s in state.sections], c, state.recipe.encode.params)
             for c in dict.fromkeys(used)]
    return min(blobs, key=len)


def compile_state_dict(state_dict: dict, recipe: Recipe | None = None, log=None, hessians: dict | None = None,
                       device: str = "cpu", calibration_skips: dict | None = None,
                       strict_calib: bool = False) -> CompileResult:
    """`hessians`: {weight name: input Hessian} from squeeze.calibrate, which turns on GPTQ where the recipe allows;
    `calibration_skips`: {name: why calibration found no Hessian} (Calibration.skipped), for the report;
    `strict_calib`: a quantized matrix that would get no GPTQ for want of a usable Hessian is an error.
    `device`: where GPTQ computes ("cuda" is much faster; its float64 rounding may differ from the CPU's in rare ties,
    so bytes are reproducible per device)."""
    state = State(entries=entries_from_state_dict(state_dict), recipe=recipe or Recipe(), hessians=hessians or {},
                  device=device, calibration_skips=calibration_skips or {}, strict_calib=strict_calib)
    state = pipeline.run(state, log=log)
    return CompileResult(blob=write(state), state=state)


def methods_of(state: State) -> list:
    """[{name, role, shape, method, why}] for every quantized matrix: "gptq", or "rtn" (round-to-nearest) with the
    reason when the recipe asked for GPTQ (a missing or unusable Hessian, GPTQ not better on the layer loss), so no
    tensor falls back silently."""
    rows = []
    for e in state.stored_entries():
        if e.plan is None or e.plan.scheme != "int":
            continue
        method = e.method_used or "rtn"
        why = e.note.split("; ")[0].removeprefix("round-to-nearest: ")  # the gptq pass's note, not lowrank's
        if method == "gptq" or not e.method_used:
            why = "" if method == "gptq" else f"recipe: method = \"{e.plan.method}\""
        rows.append({"name": e.name, "role": e.role, "shape": list(e.shape), "method": method, "why": why})
    return rows


def compile(state_dict: dict, recipe: Recipe | None = None, hessians: dict | None = None) -> bytes:
    """Compile a state dict (name -> tensor) with a recipe (default: Recipe()) into artifact bytes; with `hessians`
    (squeeze.calibrate.calibrate(...).hessians) quantized matrices get GPTQ codes."""
    return compile_state_dict(state_dict, recipe, hessians=hessians).blob
