"""The model verify scores, rebuilt from a state dict: the built-in Parameter Golf baseline or the user's own.

`--model pgolf` (the default) is squeeze/models/pgolf.py's GPT: it reads the architecture from the state dict's
names and shapes; `--model-config` supplies what shapes cannot tell (rope_base, logit_softcap, qk_gain_init, or
num_heads without q_gain) as overrides to config_from_state_dict.

`--model path/to/file.py:NAME` or `--model package.module:NAME` is your own architecture. The contract:

    NAME(state_dict, config) -> torch.nn.Module

- state_dict: {name: tensor} on the CPU, in the checkpoint's dtypes; verify calls it twice, with the checkpoint's
  tensors and with the artifact's decoded tensors (same names, shapes and dtypes).
- config: the `--model-config` JSON object, or {} without one.
- It returns the module with those weights loaded. verify moves it to the device and calls eval(). A
  load_state_dict error raised inside it (RuntimeError) is reported as one line naming every missing, unexpected and
  mis-shaped key.
- One of its methods takes int64 token ids [batch, seq] and returns logits [batch, seq, vocab] (any float dtype):
  position t predicts token t + 1. vocab must equal the tokenizer's vocabulary size. Which method: `--forward NAME`
  (library: forward=NAME); without it `forward_logits` when the module has one (as the Parameter Golf records, whose
  forward(input_ids, target_ids) returns the loss), else `forward`, called as module(input_ids). A method that
  needs more arguments, or returns a loss or another shape, is a one-line error (logits_fn, vocab_of).

A file is imported as a fresh module with its directory on sys.path (so it can import its siblings); code under
`if __name__ == "__main__":` does not run.
"""
import dataclasses
import importlib
import importlib.util
import inspect
import json
import re
import sys
from pathlib import Path

import torch

from ..errors import SqueezeError
from ..models.pgolf import GPT, GPTConfig, config_from_state_dict

BUILTIN = "pgolf"
FORWARD_METHODS = ("forward_logits", "forward")  # tried in this order when no --forward is given


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
    return lambda state_dict, source: _build_user_model(factory, spec, state_dict, config, source)


# Every tensor name the baseline GPT has, to name the unexpected ones when the architecture cannot be read at all.
_PGOLF_NAME = re.compile(r"tok_emb\.weight|lm_head\.weight|skip_weights|blocks\.\d+\.(attn\.(c_q|c_k|c_v|proj)\.weight"
                         r"|attn\.q_gain|mlp\.(fc|proj)\.weight|attn_scale|mlp_scale|resid_mix)")


def _build_pgolf(state_dict: dict, config: dict, source: str) -> torch.nn.Module:
    def fail(text):
        return SqueezeError(f"{source}: does not fit the Parameter Golf baseline GPT ({text}); for another "
                            f"architecture pass --model FILE.py:FACTORY")

    sd = {k: v.float() for k, v in state_dict.items()}
    try:
        cfg = config_from_state_dict(sd, **config)
    except KeyError as e:
        unexpected = [k for k in sd if not _PGOLF_NAME.fullmatch(k)]
        extra = f"; unexpected keys: {', '.join(unexpected)}" if unexpected else ""
        raise fail(f"no tensor {e.args[0]}, which the architecture is read from{extra}") from None
    except (ValueError, TypeError) as e:
        raise fail(_first_line(e)) from None
    try:
        model = GPT(cfg)
    except (ValueError, RuntimeError, TypeError) as e:
        raise fail(_first_line(e)) from None
    mismatch = key_mismatch(model.state_dict(), sd)
    if mismatch:
        raise fail(mismatch) from None
    try:
        model.load_state_dict(sd, strict=True)  # copies bf16 tensors into fp32 params exactly
    except RuntimeError as e:
        raise fail(load_error_summary(str(e)) or _first_line(e)) from None
    return model


def _first_line(e: BaseException) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def key_mismatch(expected: dict, given: dict) -> str:
    """'' when `given` has exactly `expected`'s names and shapes; else one line naming every missing, unexpected and
    mis-shaped key: "missing keys: a, b; unexpected keys: c; shape mismatch: d [4] (model [8])"."""
    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    shapes = [f"{k} {list(given[k].shape)} (model {list(expected[k].shape)})" for k in expected
              if k in given and tuple(given[k].shape) != tuple(expected[k].shape)]
    parts = []
    if missing:
        parts.append(f"missing keys: {', '.join(missing)}")
    if unexpected:
        parts.append(f"unexpected keys: {', '.join(unexpected)}")
    if shapes:
        parts.append(f"shape mismatch: {', '.join(shapes)}")
    return "; ".join(parts)


_SIZE_MISMATCH = re.compile(r"size mismatch for (.+?): copying a param with shape torch\.Size\((\[.*?\])\) from "
                            r"checkpoint, the shape in current model is torch\.Size\((\[.*?\])\)")


def load_error_summary(message: str) -> str | None:
    """torch's load_state_dict RuntimeError ("Error(s) in loading state_dict for M: ...") as one line in
    key_mismatch's words, every key named; None for any other message."""
    lines = [line.strip() for line in message.strip().splitlines()]
    if not lines or not lines[0].startswith("Error(s) in loading state_dict"):
        return None
    missing, unexpected, shapes, other = [], [], [], []
    for line in lines[1:]:
        if not line:
            continue
        if line.startswith("Missing key(s) in state_dict:"):
            missing += re.findall(r'"([^"]*)"', line)
        elif line.startswith("Unexpected key(s) in state_dict:"):
            unexpected += re.findall(r'"([^"]*)"', line)
        elif m := _SIZE_MISMATCH.match(line):
            shapes.append(f"{m.group(1)} {m.group(2)} (model {m.group(3)})")
        else:
            other.append(line.rstrip(". "))
    parts = [f"missing keys: {', '.join(missing)}"] if missing else []
    if unexpected:
        parts.append(f"unexpected keys: {', '.join(unexpected)}")
    if shapes:
        parts.append(f"shape mismatch: {', '.join(shapes)}")
    parts += other
    where = lines[0].split(" for ", 1)[-1].rstrip(":") if " for " in lines[0] else "the model"
    return f"{where}: {'; '.join(parts)}" if parts else lines[0]


def _build_user_model(factory, spec: str, state_dict: dict, config: dict, source: str = "the weights"):
    try:
        model = factory(dict(state_dict), dict(config))
    except RuntimeError as e:
        summary = load_error_summary(str(e))
        if summary is None:
            raise
        raise SqueezeError(f"{source}: does not load into --model {spec} ({summary})") from None
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


class LogitsFn:
    """ids [B, T] int64 -> logits [B, T, vocab]: the model's method that returns logits (logits_fn). `name` is
    "Class.method", for messages; `module` is the model."""

    def __init__(self, module: torch.nn.Module, method: str, call):
        self.module, self.method, self._call = module, method, call
        self.name = f"{type(module).__name__}.{method}"

    def __call__(self, input_ids: torch.Tensor):
        return self._call(input_ids)


def logits_fn(model: torch.nn.Module, forward: str | None = None, spec: str = BUILTIN) -> LogitsFn:
    """The callable verify and calibration run the model through: `model.<forward>(ids)`, or without `forward` the
    first of FORWARD_METHODS the model has (forward is called as model(ids), so module hooks run). A method that does
    not exist, or whose signature needs more than the ids, is a one-line SqueezeError; vocab_of checks the output."""
    if isinstance(model, LogitsFn):
        return model
    cls = type(model).__name__
    if forward is None:
        forward = next((n for n in FORWARD_METHODS if callable(getattr(model, n, None))), "forward")
    method = getattr(model, forward, None)
    if method is None:
        raise SqueezeError(f"--model {spec}: --forward {forward}: {cls} has no method '{forward}'")
    if not callable(method):
        raise SqueezeError(f"--model {spec}: --forward {forward}: {cls}.{forward} is a {type(method).__name__}, "
                           f"not a method")
    needed = _required_arguments(method)
    if needed is not None and len(needed) > 1:
        raise SqueezeError(f"--model {spec}: {cls}.{forward}() needs {len(needed)} arguments ({', '.join(needed)}); "
                           f"pass --forward NAME for the method that returns logits")
    return LogitsFn(model, forward, model if forward == "forward" else method)


def _required_arguments(method) -> list | None:
    """Names of the arguments a call must pass (None when the signature accepts a single one or cannot be read)."""
    try:
        signature = inspect.signature(method)
    except (TypeError, ValueError):
        return None
    try:
        signature.bind(None)
        return None
    except TypeError:
        pass
    return [p.name for p in signature.parameters.values() if p.default is p.empty
            and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


def vocab_of(model, device: torch.device, spec: str, length: int = 8, forward: str | None = None) -> int:
    """The vocabulary size the model predicts over, from one short forward pass on token 0 (an id every vocabulary
    has); also checks the output contract. `model`: a module (its logits method chosen by logits_fn with `forward`)
    or logits_fn's result."""
    fn = logits_fn(model, forward, spec)
    ids = torch.zeros(1, length, dtype=torch.int64, device=device)
    with torch.inference_mode():
        try:
            logits = fn(ids)
        except TypeError as e:  # a signature (*args) could not tell: the call itself says it needs more
            if f"{fn.method}() missing" not in str(e):
                raise
            raise SqueezeError(f"--model {spec}: {fn.name}() needs more arguments ({_first_line(e)}); pass "
                               f"--forward NAME for the method that returns logits") from None
    if not isinstance(logits, torch.Tensor) or logits.dim() != 3 or tuple(logits.shape[:2]) != (1, length):
        if isinstance(logits, torch.Tensor) and logits.dim() == 0:
            got = "a scalar (a loss?)"
        else:
            got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise SqueezeError(f"--model {spec}: {fn.name} returned {got} for input [1, {length}]; expected "
                           f"logits [batch, seq, vocab]; pass --forward NAME for the method that returns them")
    return int(logits.shape[-1])
