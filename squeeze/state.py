"""The compiler's one data structure: an ordered list of TensorEntry plus what the passes have produced.

Passes never mutate a State; they return a new one (dataclasses.replace), so each pass is a pure function
State -> State and the pipeline can record what each one did.
"""
from dataclasses import dataclass, field

import torch

from . import quant
from .factors import FactorSpec
from .recipe import Recipe


@dataclass(frozen=True)
class Plan:
    """How one stored tensor will be written (set by the `plan` pass)."""
    scheme: str                 # "int" (quantized), "float" (cast to store dtype), "raw" (bytes as they are)
    store: str = ""             # dtype code for "float"/"raw"
    quant: object = None        # QuantSpec for "int"
    pack: str = "byte"          # "byte" | "dense" (int only)
    codec: str = "auto"
    method: str = "rtn"         # "rtn" | "gptq" (int only): how codes are chosen on the grid the scales define
    lowrank_rank: int = 0       # int only: rank of the correction the lowrank pass adds (0: none)
    lowrank_spec: FactorSpec = FactorSpec()  # int only: how its factors are stored (f16 or quantized)
    reason: str = ""            # which rule or routing chose this, for inspect


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: str                              # original dtype code
    shape: tuple
    tensor: torch.Tensor | None = None      # the original values (None for aliases)
    role: str = "other"
    alias_of: str | None = None             # set by `tie`
    transposed: bool = False
    plan: Plan | None = None
    codes: torch.Tensor | None = None       # int8 [R, C], set by `quantize`
    scales: torch.Tensor | None = None
    lowrank: object = None                  # factors.F16Factors | QuantizedFactors, set by `lowrank`
    note: str = ""                          # what a refining pass did (e.g. gptq's calibration-loss gain)
    method_used: str = ""                   # int only, set by `gptq` when calibrated: "gptq" | "rtn" (note: why)
    parts: tuple = ()                       # ((kind, bytes), ...), set by `pack`; kind: data|codes|scales|lowrank
    stack_of: str | None = None             # set by `stack`: this entry is slice `name` of that N-D tensor
    stack_shape: tuple = ()                 # the N-D tensor's shape (slices are its last two dims)

    @property
    def numel(self) -> int:
        return quant.numel(self.shape)


@dataclass(frozen=True)
class Section:
    """One compressed section of the artifact (set by `encode`)."""
    name: str
    codec: str
    shuffle: int
    raw_size: int
    stored: bytes
    members: tuple              # ((tensor name, kind, offset, length), ...) in the decoded section


@dataclass(frozen=True)
class PassRecord:
    name: str
    seconds: float
    bytes_in: int
    bytes_out: int
    note: str = ""


@dataclass(frozen=True)
class State:
    entries: tuple
    recipe: Recipe = field(default_factory=Recipe)
    hessians: dict = field(default_factory=dict)   # parameter name -> [C, C] input Hessian (squeeze/calibrate.py)
    sensitivities: dict = field(default_factory=dict)  # parameter name -> loss increase per unit noise variance
    calibration_skips: dict = field(default_factory=dict)  # parameter name -> why calibration found no Hessian
    strict_calib: bool = False          # a quantized matrix without a usable Hessian is an error, not RTN
    predicted_loss: float | None = None  # predicted loss increase of a budget compile (allocate.predicted_loss)
    device: str = "cpu"                 # where passes that can use an accelerator compute (GPTQ)
    sections: tuple = ()
    log: tuple = ()

    def stored_entries(self):
        return [e for e in self.entries if e.alias_of is None]

    def nbytes(self) -> int:
        """Bytes the current representation would take: what each pass's 'bytes out' reports."""
        if self.sections:
            return sum(len(s.stored) for s in self.sections)
        total = 0
        for e in self.stored_entries():
            if e.parts:
                total += sum(len(b) for _, b in e.parts)
            elif e.codes is not None:
                total += e.codes.numel() + e.scales.numel() * e.scales.element_size()
                total += e.lowrank.nbytes if e.lowrank is not None else 0
            elif e.tensor is not None:
                total += e.tensor.numel() * e.tensor.element_size()
        return total

    def hessian_of(self, e: TensorEntry) -> tuple:
        """(e's input Hessian [C, C] for GPTQ, the allocator and the low-rank pass, or None and why there is none)."""
        h = self.hessians.get(e.name)
        cols = e.numel // int(e.shape[0]) if len(e.shape) >= 2 and e.shape[0] else e.numel
        if h is None:
            why = next((self.calibration_skips[n] for n in (e.name, e.stack_of) if n in self.calibration_skips),
                       "never multiplied by in the calibration forward")
            return None, f"no Hessian: {why}"
        if tuple(h.shape) != (cols, cols):
            return None, f"no Hessian: calibration's is {list(h.shape)}, the matrix has {cols} columns"
        return h, ""

    def entry(self, name: str) -> TensorEntry:
        return next(e for e in self.entries if e.name == name)
