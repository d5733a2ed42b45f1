"""Reading checkpoints safely: torch.save files through weights_only=True (never arbitrary unpickling), or safetensors."""
from pathlib import Path

import torch

from .errors import CheckpointError

_NESTED_KEYS = ("state_dict", "model", "model_state_dict", "module")


def _unwrap(obj, path: str) -> dict:
    """The state dict inside a checkpoint: the object itself, or under one of the usual keys."""
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj
    if isinstance(obj, dict):
        for key in _NESTED_KEYS:
            if key in obj and isinstance(obj[key], dict):
                return _unwrap(obj[key], path)
    kind = type(obj).__name__
    raise CheckpointError(f"{path}: no state dict found (a {kind}; expected name -> tensor, or one under "
                          f"'state_dict' or 'model')")


def load_checkpoint(path) -> dict:
    """name -> tensor from a .pt/.pth (torch.save) or .safetensors file."""
    path = str(path)
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file
        try:
            return load_file(path)
        except Exception as e:
            raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        text = str(e).splitlines()[0] if str(e) else type(e).__name__
        # torch names the class it refused ("Unsupported global: GLOBAL argparse.Namespace"); any other failure
        # (not a pickle, not a zip, truncated) is a file that is simply not a checkpoint.
        if "Unsupported global" in str(e):
            raise CheckpointError(
                f"{path}: refused, it needs unpickling of arbitrary objects, which is unsafe; re-save only the "
                f"tensors: torch.save(model.state_dict(), path)") from None
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({text})") from None
    sd = _unwrap(obj, path)
    return {k: v for k, v in sd.items()}
