"""dtype codes used in the artifact header (docs/FORMAT.md, "dtype codes") and their torch/numpy twins."""
import numpy as np
import torch

# code -> (torch dtype, numpy dtype used to read the raw bytes, bytes per element).
# bf16 has no numpy dtype: its bytes are read as int16 and reinterpreted by torch.
DTYPES = {
    "f32": (torch.float32, np.float32, 4),
    "f16": (torch.float16, np.float16, 2),
    "bf16": (torch.bfloat16, np.int16, 2),
    "f64": (torch.float64, np.float64, 8),
    "i8": (torch.int8, np.int8, 1),
    "i16": (torch.int16, np.int16, 2),
    "i32": (torch.int32, np.int32, 4),
    "i64": (torch.int64, np.int64, 8),
    "u8": (torch.uint8, np.uint8, 1),
    "bool": (torch.bool, np.bool_, 1),
}
FLOAT_CODES = ("f32", "f16", "bf16", "f64")
_CODE_OF = {torch_dtype: code for code, (torch_dtype, _, _) in DTYPES.items()}


def code_of(dtype: torch.dtype) -> str:
    """The header code of a torch dtype; KeyError for dtypes the format cannot hold."""
    return _CODE_OF[dtype]


def torch_dtype(code: str) -> torch.dtype:
    return DTYPES[code][0]


def itemsize(code: str) -> int:
    return DTYPES[code][2]


def tensor_to_bytes(t: torch.Tensor) -> bytes:
    """Row-major little-endian bytes of a CPU tensor (bf16 through its int16 view, since numpy has no bf16)."""
    t = t.detach().contiguous().cpu()
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    return t.numpy().tobytes()


def tensor_from_bytes(data: bytes, code: str, shape) -> torch.Tensor:
    """Inverse of tensor_to_bytes."""
    tdt, ndt, _ = DTYPES[code]
    arr = np.frombuffer(data, dtype=ndt).copy()
    t = torch.from_numpy(arr)
    if code == "bf16":
        t = t.view(torch.bfloat16)
    return t.reshape(tuple(shape))
