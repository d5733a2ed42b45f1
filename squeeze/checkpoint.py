"""Reading checkpoints safely: torch.save files through weights_only=True (never arbitrary unpickling), or safetensors."""
import re
import warnings
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


_RESAVE = "re-save only the tensors: torch.save(model.state_dict(), path)"


def _load_error(path: str, e: Exception) -> CheckpointError:
    """One line for torch.load's failure. Its weights-only refusals are paragraphs that suggest weights_only=False
    (arbitrary code execution), so the line keeps only the reason and says how to re-save instead."""
    text = str(e)
    # "Unsupported global: GLOBAL argparse.Namespace", "unsupported GLOBAL posix.system whose module posix is blocked"
    blocked = re.search(r"GLOBAL ([\w.]+)", text)
    if blocked:
        return CheckpointError(f"{path}: refused, it needs unpickling of arbitrary objects ({blocked.group(1)}), "
                               f"which is unsafe; {_RESAVE}")
    opcode = re.search(r"Unsupported operand (\d+)", text)  # not a torch.save file, or a pickle of other things
    if opcode:
        return CheckpointError(f"{path}: not a readable PyTorch checkpoint (pickle opcode {opcode.group(1)} is not "
                               f"allowed in a weights-only load); if it is one, {_RESAVE}")
    reason = re.search(r"WeightsUnpickler error: *(\S[^\n]*)", text)
    line = reason.group(1) if reason else next((l for l in text.splitlines() if l.strip()), type(e).__name__)
    return CheckpointError(f"{path}: not a readable PyTorch checkpoint ({line.strip()})")


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
            reason = next((line for line in str(e).splitlines() if line.strip()), type(e).__name__)
            raise CheckpointError(f"{path}: not a readable safetensors file ({reason.strip()})") from None
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols on stderr; errors say what matters
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise _load_error(path, e) from None
    sd = _unwrap(obj, path)
    return {k: v for k, v in sd.items()}
