"""The quantizer: symmetric int-N codes with per-row or per-group scales (docs/FORMAT.md, "Quantized").

One implementation, several callers: the `quantize` pass, the loader's reconstruction and squeeze.qat's fake-quant
all call these functions, so what is trained, what is exported and what is decoded cannot drift apart.
"""
from dataclasses import dataclass

import torch

from .dtypes import torch_dtype

CLIP_METHODS = ("absmax", "percentile", "std", "mse")
_QUANTILE_MAX_ELEMENTS = 1 << 24  # torch.quantile refuses larger inputs


@dataclass(frozen=True)
class QuantSpec:
    """How one tensor is quantized. `clip_value` is the percentile (0–100] for "percentile" and k for "std"."""
    bits: int = 8
    group: int = 0            # 0: one scale per row; G > 0: one scale per G consecutive elements of a row
    clip: str = "absmax"
    clip_value: float = 0.0
    mse_grid: int = 32        # candidate clips tried by "mse", from absmax down to mse_min_ratio·absmax
    mse_min_ratio: float = 0.3
    scale_dtype: str = "f16"
    scale_min: float = 0.0    # floor on scales (the challenge baseline floors int8 scales at 1/127)

    @property
    def qmax(self) -> int:
        return (1 << (self.bits - 1)) - 1

    def describe_clip(self) -> str:
        if self.clip in ("percentile", "std"):
            return f"{self.clip}:{self.clip_value:g}"
        return self.clip


def numel(shape) -> int:
    """Elements of a tensor of this shape (a list, tuple or torch.Size; 1 for a 0-D shape)."""
    n = 1
    for s in shape:  # a plain loop, not math.prod over a generator: torch.compile traces the fake-quant through it
        n *= int(s)
    return n


def matrix_shape(shape) -> tuple[int, int]:
    """The [R, C] matrix view of a tensor: rows are the first dim; 0-D and 1-D tensors are one row."""
    n = numel(shape)
    if len(shape) < 2:
        return 1, n
    rows = int(shape[0])
    return rows, (n // rows if rows else 0)


def n_groups(cols: int, group: int) -> int:
    return 1 if group == 0 else -(-cols // group)


def _grouped(w: torch.Tensor, group: int) -> list[torch.Tensor]:
    """Split a [R, C] matrix into [R, g, G]-shaped blocks whose last dim is one scale group."""
    if group == 0 or group >= w.shape[1]:
        return [w[:, None, :]]
    full = (w.shape[1] // group) * group
    blocks = [w[:, :full].reshape(w.shape[0], -1, group)] if full else []
    if full < w.shape[1]:
        blocks.append(w[:, None, full:])  # the shorter last group of each row
    return blocks


def _per_group(w: torch.Tensor, group: int, stat) -> torch.Tensor:
    """A statistic over each scale group: [R, n_groups]."""
    return torch.cat([stat(b) for b in _grouped(w, group)], dim=1)


def _quantile(b: torch.Tensor, q: float) -> torch.Tensor:
    flat = b.abs().reshape(-1, b.shape[-1])
    step = max(1, _QUANTILE_MAX_ELEMENTS // max(1, flat.shape[1]))
    parts = [torch.quantile(flat[i:i + step], q, dim=1) for i in range(0, flat.shape[0], step)]
    return torch.cat(parts).reshape(b.shape[:-1])


def _expand(per_group: torch.Tensor, group: int, cols: int) -> torch.Tensor:
    """Broadcast [R, n_groups] values to [R, C]."""
    if group == 0:
        return per_group[:, :1]
    return per_group.repeat_interleave(group, dim=1)[:, :cols]


def store_scales(scale: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Scales in their stored dtype; a zero scale (all-zero group) becomes 1 so that codes are 0, not NaN.

    A scale beyond the stored dtype's range becomes inf here; `check_scales` reports it (kept apart so that the
    fake-quant, which runs inside torch.compile'd forwards, has no data-dependent branch)."""
    sdt = torch_dtype(spec.scale_dtype)
    scale = scale.clamp(min=spec.scale_min)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    if spec.scale_dtype != "f32":
        tiny = torch.finfo(sdt).tiny if spec.scale_dtype == "bf16" else 2.0 ** -24  # smallest positive value
        scale = scale.clamp(min=tiny)
    return scale.to(sdt)


def check_scales(stored: torch.Tensor, spec: QuantSpec, name: str) -> None:
    if not torch.isfinite(stored).all():
        raise ValueError(f"{name}: a scale exceeds the range of {spec.scale_dtype}; use scale_dtype = \"f32\"")


def expand_scales(scales: torch.Tensor, group: int, cols: int) -> torch.Tensor:
    """Scales [R, n_groups] as float32, broadcastable to the [R, C] matrix (each element's scale)."""
    return _expand(scales.to(torch.float32), group, cols)


def _codes(w: torch.Tensor, scale_full: torch.Tensor, qmax: int) -> torch.Tensor:
    return torch.clamp(torch.round(w / scale_full), -qmax, qmax)


def codes_for(w2: torch.Tensor, scales: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Round-to-nearest codes of a float32 [R, C] matrix against stored scales [R, n_groups], as float32 values
    in [-qmax, qmax] (`quantize` casts them to int8)."""
    return _codes(w2, expand_scales(scales, spec.group, w2.shape[1]), spec.qmax)


def group_std(w: torch.Tensor, group: int) -> torch.Tensor:
    """Each scale group's standard deviation [R, n_groups]: what the "std" clip multiplies by k."""
    return _per_group(w, group, lambda b: b.std(dim=-1, correction=0))


def choose_clip(w: torch.Tensor, spec: QuantSpec, std: torch.Tensor | None = None) -> torch.Tensor:
    """Per-group clip value [R, n_groups] by the spec's method (the "mse" search is done in `choose_scales`).
    `std`: group_std(w, spec.group) when the caller has it (the budget's pricing tries many k on one matrix)."""
    if spec.clip == "percentile":
        return _per_group(w, spec.group, lambda b: _quantile(b, spec.clip_value / 100.0))
    if spec.clip == "std":
        return spec.clip_value * (group_std(w, spec.group) if std is None else std)
    return _per_group(w, spec.group, lambda b: b.abs().amax(dim=-1))


def as_matrix(w: torch.Tensor) -> torch.Tensor:
    """The float32 [R, C] view that scales and codes are computed on (see `matrix_shape`)."""
    rows, cols = matrix_shape(w.shape)
    return w.reshape(rows, cols).to(torch.float32)


def choose_scales(w2: torch.Tensor, spec: QuantSpec, std: torch.Tensor | None = None) -> torch.Tensor:
    """Stored scales [R, n_groups] of a float32 [R, C] matrix by the spec's clip method (unchecked: see
    `check_scales`). The "mse" method keeps, per group, the candidate clip whose reconstruction error is smallest.
    `std`: see choose_clip."""
    cols = w2.shape[1]
    if spec.clip != "mse":
        return store_scales(choose_clip(w2, spec, std) / spec.qmax, spec)
    absmax = _per_group(w2, spec.group, lambda b: b.abs().amax(dim=-1))
    best_err = best_scales = None
    # candidates as 0-d float32 tensors, not .tolist() floats: the same products, and torch.compile traces them
    for ratio in torch.linspace(1.0, spec.mse_min_ratio, spec.mse_grid):
        scales = store_scales(absmax * ratio / spec.qmax, spec)
        s_full = _expand(scales.float(), spec.group, cols)
        err = (_codes(w2, s_full, spec.qmax) * s_full - w2).square()
        err = _per_group(err, spec.group, lambda b: b.sum(dim=-1))
        if best_err is None:
            best_err, best_scales = err, scales
        else:
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_scales = torch.where(better, scales, best_scales)
    return best_scales


def quantize(w: torch.Tensor, spec: QuantSpec, name: str = "tensor",
             std: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a float tensor. Returns (codes int8 [R, C], scales [R, n_groups] in spec.scale_dtype).

    Codes are computed against the *stored* (rounded) scales, so decoding reproduces exactly what was chosen here.
    squeeze.qat's fake-quant calls the same `choose_scales`, `codes_for` and `dequantize`. `std`: see choose_clip.
    """
    w2 = as_matrix(w.detach())
    scales = choose_scales(w2, spec, std)
    check_scales(scales, spec, name)
    return codes_for(w2, scales, spec).to(torch.int8), scales


def fake_quantize(w: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """What decoding the quantized `w` gives, in w's dtype and shape, without a gradient: `quantize` then
    `dequantize`, less the scale-range check (done once up front by the caller)."""
    w2 = as_matrix(w.detach())
    scales = choose_scales(w2, spec)
    codes = codes_for(w2, scales, spec).to(torch.int8)  # through int8 as the artifact: -0.0 codes become 0
    return dequantize(codes, scales, spec.group, w.dtype, w.shape)


def dequantize(codes: torch.Tensor, scales: torch.Tensor, group: int, dtype: torch.dtype, shape,
               lowrank: tuple | None = None) -> torch.Tensor:
    """w = float32(q) * float32(scale), plus the low-rank correction (factors) if any, cast to dtype, reshaped
    (docs/FORMAT.md reconstruction rule)."""
    cols = codes.shape[1]
    w = codes.to(torch.float32) * _expand(scales.to(torch.float32).reshape(codes.shape[0], -1), group, cols)
    if lowrank is not None:  # squeeze/factors.py: F16Factors or QuantizedFactors
        w = add_lowrank(w, *lowrank.matrices())
    return w.to(dtype).reshape(tuple(shape))


def add_lowrank(w: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """w [R, C] float32 + Σ_k U[:, k] ⊗ V[k, :], one outer product at a time in k order, each element one float32
    multiply and one float32 add: unlike a matmul (whose summation order is the library's), every decoder gets the
    same bits (docs/FORMAT.md)."""
    u, v = u.to(torch.float32), v.to(torch.float32)
    for k in range(u.shape[1]):
        w = w + u[:, k:k + 1] * v[k:k + 1, :]
    return w
