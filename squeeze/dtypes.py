"""dtype codes used in the artifact header (docs/FORMAT.md, "dtype codes") and their torch/numpy twins."""
import numpy as np
import torch

# code -> (torch dtype, numpy dtype used to read the raw bytes, bytes per element).
# bf16 and fp8 have no numpy dtype: their bytes are read as int16 / uint8 and reinterpreted by torch.
DTYPES = {
    "f32": (torch.float32, np.float32, 4),
    "f16": (torch.float16, np.float16, 2),
    "bf16": (torch.bfloat16, np.int16, 2),
    "f64": (torch.float64, np.float64, 8),
    "f8e4m3": (torch.float8_e4m3fn, np.uint8, 1),   # format 1.3
    "f8e5m2": (torch.float8_e5m2, np.uint8, 1),
    "i8": (torch.int8, np.int8, 1),
    "i16": (torch.int16, np.int16, 2),
    "i32": (torch.int32, np.int32, 4),
    "i64": (torch.int64, np.int64, 8),
    "u8": (torch.uint8, np.uint8, 1),
    "bool": (torch.bool, np.bool_, 1),
}
FLOAT_CODES = ("f32", "f16", "bf16", "f64", "f8e4m3", "f8e5m2")
FP8_CODES = ("f8e4m3", "f8e5m2")
_VIEWED = {code: DTYPES[code][0] for code in ("bf16",) + FP8_CODES}  # read as integers, then viewed
# float8_e4m3fn has no infinity: torch's cast saturates to ±448 what rounds beyond it (docs/FORMAT.md, "dtype codes")
_SATURATING = {"f8e4m3": 464.0}  # the largest magnitude that rounds (to nearest, ties to even) within range
_CODE_OF = {torch_dtype: code for code, (torch_dtype, _, _) in DTYPES.items()}


def code_of(dtype: torch.dtype) -> str:
    """The header code of a torch dtype; KeyError for dtypes the format cannot hold."""
    return _CODE_OF[dtype]


def torch_dtype(code: str) -> torch.dtype:
    return DTYPES[code][0]


def itemsize(code: str) -> int:
    return DTYPES[code][2]


def tensor_to_bytes(t: torch.Tensor) -> bytes:
    """Row-major little-endian bytes of a CPU tensor (bf16 and fp8 through an int16 / uint8 view: numpy has neither)."""
    t = t.detach().contiguous().cpu()
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    elif t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        t = t.view(torch.uint8)
    return t.numpy().tobytes()


def tensor_from_bytes(data: bytes, code: str, shape) -> torch.Tensor:
    """Inverse of tensor_to_bytes."""
    tdt, ndt, _ = DTYPES[code]
    arr = np.frombuffer(data, dtype=ndt).copy()
    t = torch.from_numpy(arr)
    if code in _VIEWED:
        t = t.view(_VIEWED[code])
    return t.reshape(tuple(shape))


def not_finite(t: torch.Tensor) -> torch.Tensor:
    """NaN/Inf mask of a float tensor; fp8 through float32 (torch has no isfinite for float8_e4m3fn)."""
    return ~torch.isfinite(t.to(torch.float32) if code_of(t.dtype) in FP8_CODES else t)


def out_of_range(t: torch.Tensor, code: str) -> torch.Tensor:
    """Mask of the (finite) elements of a float tensor that a cast to float code `code` does not hold: they round to
    nearest-even beyond its largest finite value. For f16, bf16, f32 and fp8 e5m2 the cast gives inf; for fp8 e4m3,
    which has no infinity, torch's cast saturates, so the bound is explicit (float64 goes through float32, as the
    cast does)."""
    if code in _SATURATING:
        return t.to(torch.float32).abs() > _SATURATING[code]
    return not_finite(t.to(torch_dtype(code)))
