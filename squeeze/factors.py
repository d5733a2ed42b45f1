"""Low-rank correction factors as an artifact stores them (docs/FORMAT.md, "low-rank correction"): one class per
storage, each knowing its header keys, its bytes and the float32 matrices (U [R, r], V [r, C]) the reconstruction
adds one outer product at a time (quant.add_lowrank).

- F16Factors (1.2): U and V in f16, r·(R + C)·2 bytes.
- QuantizedFactors (1.4): integer codes, one per byte (the entropy coder sees their real statistics), with one scale
  per component for U and one per `group` elements of each row of V. At int4/int4 that is about a quarter of the
  f16 bytes for the same rank; LQER (Zhang et al., 2024) and the top Parameter Golf record store theirs so.

`FactorSpec` says which a plan asks for; passes/lowrank.py chooses the values.
"""
from dataclasses import dataclass

import numpy as np
import torch

from . import quant
from .dtypes import code_of, itemsize, tensor_from_bytes, tensor_to_bytes
from .errors import FormatError


@dataclass(frozen=True)
class FactorSpec:
    """How a correction's factors are stored: `ubits` = 0 means f16 factors (1.2), else U's codes take `ubits` and
    V's `vbits` (2..8), V with one scale per `group` elements of a row (0: per row), scales in `scale_dtype`."""
    ubits: int = 0
    vbits: int = 0
    group: int = 64
    scale_dtype: str = "f16"

    @property
    def quantized(self) -> bool:
        return self.ubits > 0

    @staticmethod
    def from_keys(lowrank_bits_u: int, lowrank_bits_v: int, lowrank_group: int) -> "FactorSpec":
        """From a recipe's keys of the same names ([defaults]/[[rules]] or [budget]): U's bits 0 means f16."""
        return FactorSpec(lowrank_bits_u, lowrank_bits_v if lowrank_bits_u else 0, lowrank_group)


@dataclass(frozen=True, eq=False)
class F16Factors:
    u: torch.Tensor  # [R, r] f16
    v: torch.Tensor  # [r, C] f16

    @property
    def rank(self) -> int:
        return self.u.shape[1]

    def matrices(self) -> tuple:
        return self.u.to(torch.float32), self.v.to(torch.float32)

    def header(self) -> dict:
        return {"rank": self.rank, "ldtype": "f16"}

    def to_bytes(self) -> bytes:  # U then V, row-major
        return tensor_to_bytes(self.u) + tensor_to_bytes(self.v)

    @property
    def nbytes(self) -> int:
        return 2 * (self.u.numel() + self.v.numel())


@dataclass(frozen=True, eq=False)
class QuantizedFactors:
    u_codes: torch.Tensor   # [r, R] int8: component k's codes in row k (Uᵀ)
    v_codes: torch.Tensor   # [r, C] int8
    u_scales: torch.Tensor  # [r] in scale_dtype
    v_scales: torch.Tensor  # [r, ceil(C / group)] in scale_dtype
    ubits: int
    vbits: int
    group: int

    @property
    def rank(self) -> int:
        return self.u_codes.shape[0]

    def matrices(self) -> tuple:
        """U [R, r] and V [r, C] in float32: each value one single-precision multiply of its code and its scale."""
        u = (self.u_codes.to(torch.float32) * self.u_scales.to(torch.float32)[:, None]).t()
        v = self.v_codes.to(torch.float32) * quant.expand_scales(self.v_scales, self.group, self.v_codes.shape[1])
        return u, v

    def header(self) -> dict:
        return {"rank": self.rank, "ldtype": "i8", "lbits": [self.ubits, self.vbits], "lgroup": self.group,
                "lsdtype": code_of(self.u_scales.dtype)}

    def to_bytes(self) -> bytes:  # U's codes, V's codes, U's scales, V's scales
        return b"".join([self.u_codes.contiguous().numpy().tobytes(), self.v_codes.contiguous().numpy().tobytes(),
                         tensor_to_bytes(self.u_scales), tensor_to_bytes(self.v_scales)])

    @property
    def nbytes(self) -> int:
        return (self.u_codes.numel() + self.v_codes.numel()
                + (self.u_scales.numel() + self.v_scales.numel()) * self.u_scales.element_size())


def part_size(q: dict, rows: int, cols: int) -> int:
    """Bytes of a tensor's `lowrank` part from its checked `q` (FORMAT.md)."""
    r = q["rank"]
    if q["ldtype"] != "i8":
        return r * (rows + cols) * itemsize(q["ldtype"])
    return r * (rows + cols) + (r + r * quant.n_groups(cols, q["lgroup"])) * itemsize(q["lsdtype"])


def from_part(q: dict, data, rows: int, cols: int, what: str):
    """The factors a `lowrank` part of the size `part_size` gives holds; FormatError for a code out of its range."""
    r = q["rank"]
    if q["ldtype"] != "i8":
        cut = rows * r * itemsize(q["ldtype"])  # bytes of U
        return F16Factors(tensor_from_bytes(data[:cut], q["ldtype"], (rows, r)),
                          tensor_from_bytes(data[cut:], q["ldtype"], (r, cols)))
    (ubits, vbits), group, sdtype = q["lbits"], min(q["lgroup"], cols), q["lsdtype"]
    codes = np.frombuffer(data, np.int8, r * (rows + cols))
    u_codes, v_codes = codes[:r * rows].reshape(r, rows), codes[r * rows:].reshape(r, cols)
    for name, c, bits in (("U", u_codes, ubits), ("V", v_codes, vbits)):
        top = (1 << (bits - 1)) - 1
        if c.size and int(np.abs(c.astype(np.int16)).max()) > top:
            raise FormatError(f"{what}: a low-rank {name} code is outside ±{top} (int{bits})")
    scales = tensor_from_bytes(data[r * (rows + cols):], sdtype, (-1,))
    return QuantizedFactors(torch.from_numpy(u_codes.copy()), torch.from_numpy(v_codes.copy()), scales[:r],
                            scales[r:].reshape(r, -1), ubits, vbits, group)


def quantize_u(u: torch.Tensor, spec: FactorSpec) -> tuple:
    """(codes [r, R] int8, scales [r]) of U [R, r], one scale per component, chosen by the smallest squared error
    (quant's "mse" clip search: a coarse grid such as ternary int2 is best well inside the largest value)."""
    qspec = quant.QuantSpec(bits=spec.ubits, group=0, clip="mse", scale_dtype=spec.scale_dtype)
    codes, scales = quant.quantize(u.t().contiguous().float(), qspec, "low-rank U")
    return codes, scales.reshape(-1)


def v_spec(spec: FactorSpec) -> quant.QuantSpec:
    """V's grid: `vbits` with one scale per `group` elements of a row, chosen by the smallest squared error."""
    return quant.QuantSpec(bits=spec.vbits, group=spec.group, clip="mse", scale_dtype=spec.scale_dtype)
