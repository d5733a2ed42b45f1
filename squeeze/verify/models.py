"""The model verify scores, rebuilt from a state dict: the built-in Parameter Golf baseline or the user's own.

`--model pgolf` (the default) is squeeze/models/pgolf.py's GPT: it reads the architecture from the state dict's
names and shapes; `--model-config` supplies what shapes cannot tell (rope_base, logit_softcap, qk_gain_init, or
num_heads without q_gain) as overrides to config_from_state_dict.

`--model path/to/file.py:NAME` or `--model package.module:NAME` is your own architecture. The contract:

    NAME(state_dict, config) -> torch.nn.Module

- state_dict: {name: tensor} on the CPU, in the checkpoint's dtypes; verify calls it twice, with the checkpoint's
  tensors and with the artifact's decoded tensors (same names, shapes and dtypes).
- config: the `--model-config` JSON object, or {} without one.
- It returns the module with those weights loaded. verify moves it to the device and calls eval().
- module(input_ids) takes int64 token ids [batch, seq] and returns logits [batch, seq, vocab] (any float dtype):
  position t predicts token t + 1. vocab must equal the tokenizer's vocabulary size.

A file is imported as a fresh module with its directory on sys.path (so it can import its siblings); code under
`if __name__ == "__main__":` does not run.
"""
import dataclasses
import importlib
import importlib.util
import json
import sys
from pathlib import Path

import torch

from ..errors import SqueezeError
from ..models.pgolf import GPT, GPTConfig

BUILTIN = "pgolf"


def load_model_config(path) -> dict:
    """The JSON object of a --model-config file. A file that keeps it under "config" (like the fixture's
    pgolf_4x256.json, which also records training and eval figures) is read from there."""
    path = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise SqueezeError(f"{path}: cannot read model config ({e.strerror or e})") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise SqueezeError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    if isinstance(obj, dict) and isinstance(obj.get("config"), dict):
        obj = obj["config"]
    if not isinstance(obj, dict):
        raise SqueezeError(f"{path}: a model config must be a JSON object, not {type(obj).__name__}")
    return obj


def resolve(spec: str, config: dict, config_source: str):
    """A builder `(state_dict, source) -> nn.Module` for `--model spec`; `source` names the weights in errors."""
    if spec == BUILTIN:
        known = {f.name for f in dataclasses.fields(GPTConfig)}
        unknown = sorted(set(config) - known)
        if unknown:
            raise SqueezeError(f"{config_source}: unknown key '{unknown[0]}' for --model pgolf "
                               f"(known: {', '.join(sorted(known))})")
        return lambda state_dict, source: _build_pgolf(state_dict, config, source)
    factory = _import_factory(spec)
    return lambda state_dict, source: _build_user_model(factory, spec, state_dict, config)


def _build_pgolf(state_dict: dict, config: dict, source: str) -> torch.nn.Module:
    try:
        return GPT.from_state_dict({k: v.float() for k, v in state_dict.items()}, **config)
    except (KeyError, ValueError, RuntimeError, TypeError) as e:
        text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SqueezeError(f"{source}: does not fit the Parameter Golf baseline GPT ({text}); for another "
                           f"architecture pass --model FILE.py:FACTORY") from None


def _build_user_model(factory, spec: str, state_dict: dict, config: dict) -> torch.nn.Module:
    model = factory(dict(state_dict), dict(config))
    if not isinstance(model, torch.nn.Module):
        raise SqueezeError(f"{spec}: returned a {type(model).__name__}, not a torch.nn.Module")
    return model


def _import_factory(spec: str):
    where, sep, name = spec.rpartition(":")
    if not sep or not where or not name:
        raise SqueezeError(f"--model {spec}: expected 'pgolf', FILE.py:NAME or package.module:NAME")
    if where.endswith(".py") or "/" in where or "\\" in where:
        module = _import_file(Path(where))
        origin = where
    else:
        try:
            module = importlib.import_module(where)
        except ImportError as e:
            raise SqueezeError(f"{where}: cannot import module ({e})") from None
        origin = where
    factory = getattr(module, name, None)
    if factory is None:
        raise SqueezeError(f"{origin}: has no attribute '{name}'")
    if not callable(factory):
        raise SqueezeError(f"{origin}: '{name}' is a {type(factory).__name__}, not callable")
    return factory


def _import_file(path: Path):
    if not path.is_file():
        raise SqueezeError(f"{path}: no such model file")
    module_name = f"squeeze_user_model_{path.stem}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    directory = str(path.resolve().parent)
    if directory not in sys.path:
        sys.path.insert(0, directory)
    sys.modules[module_name] = module  # dataclasses and pickling look the module up by name
    spec.loader.exec_module(module)
    return module


def vocab_of(model: torch.nn.Module, device: torch.device, spec: str, length: int = 8) -> int:
    """The vocabulary size the model predicts over, from one short forward pass on token 0 (an id every vocabulary
    has); also checks the output contract."""
    with torch.inference_mode():
        logits = model(torch.zeros(1, length, dtype=torch.int64, device=device))
    if not isinstance(logits, torch.Tensor) or logits.dim() != 3 or tuple(logits.shape[:2]) != (1, length):
        got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise SqueezeError(f"--model {spec}: forward returned {got} for input [1, {length}]; expected "
                           f"logits [batch, seq, vocab]")
    return int(logits.shape[-1])
