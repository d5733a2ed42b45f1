"""Recipes: TOML files that say how each tensor is stored. Nothing else in squeeze reads TOML.

    name = "int6-mixed"
    [defaults]                 # settings for every tensor no rule overrides
    bits = 6
    clip = "std"
    clip_std_k = 12.85
    [keep_float]               # control tensors and small tensors stay float (the challenge baseline's routing)
    max_numel = 65536
    [encode]
    codec = "brotli"
    [roles]                    # optional: roles for names classify's name rules miss (a bank "w_bank" -> mlp)
    attention = ["qo_bank", "kv_bank"]
    [[rules]]                  # ordered; the first rule whose `match` (and `role`, if given) fits a tensor wins
    match = "tok_emb.weight"   # a glob, or "re:<regex>" searched in the name; a list means any of them
    bits = 8

A rule's keys override [defaults]. Small and control tensors stay float unless a rule matching them sets `scheme`.
Unknown keys and invalid values raise RecipeError naming the file, the line and the key.
"""
import dataclasses
import fnmatch
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from . import codecs
from .codecs import EncodeParams
from .errors import RecipeError
from .format import ROLES
from .quant import CLIP_METHODS, QuantSpec

_FLOAT_NAMES = {"fp32": "f32", "f32": "f32", "fp16": "f16", "f16": "f16", "bf16": "bf16", "keep": "keep",
                "fp8e4m3": "f8e4m3", "f8e4m3": "f8e4m3", "fp8e5m2": "f8e5m2", "f8e5m2": "f8e5m2"}
_FLOAT_CHOICES = '"fp16", "bf16", "fp32", "fp8e4m3", "fp8e5m2" or "keep"'
# The challenge baseline's control-tensor name patterns (plus later records' additions).
CONTROL_PATTERNS = ("attn_scale", "attn_scales", "mlp_scale", "mlp_scales", "resid_mix", "resid_mixes", "q_gain",
                    "skip_weight", "skip_weights", "skip_gates", "smear", "lambdas", "attn_gate")


@dataclass(frozen=True)
class TensorSettings:
    """Everything a rule can set for one tensor."""
    scheme: str = "int"            # "int": quantize; "float": keep float (cast to float_dtype)
    bits: int = 8
    group_size: int = 0            # 0: per-row scales
    clip: str = "absmax"           # absmax | percentile | std | mse
    clip_percentile: float = 99.99984
    clip_std_k: float = 12.85
    mse_grid: int = 32
    scale_dtype: str = "f16"
    scale_min: float = 0.0         # floor on scales; the challenge baseline uses 1/127 for int8
    float_dtype: str = "f16"       # f16 | bf16 | f32 | f8e4m3 | f8e5m2 | keep
    pack: str = "auto"             # auto | byte | dense ("auto": dense only when the codec is raw)
    codec: str = "auto"            # a codec name, or "auto": the smallest of [encode].candidates
    method: str = "auto"           # rtn | gptq | auto (gptq where compile has calibration Hessians, else rtn)
    lowrank_rank: int = 0          # r > 0: add a rank-r correction of the quantization error (passes/lowrank.py)

    def quant_spec(self) -> QuantSpec:
        value = {"percentile": self.clip_percentile, "std": self.clip_std_k}.get(self.clip, 0.0)
        return QuantSpec(bits=self.bits, group=self.group_size, clip=self.clip, clip_value=value,
                         mse_grid=self.mse_grid, scale_dtype=self.scale_dtype, scale_min=self.scale_min)


@dataclass(frozen=True)
class KeepFloat:
    max_numel: int = 65536
    control_patterns: tuple = CONTROL_PATTERNS
    control_dtype: str = "f32"
    small_dtype: str = "f16"


@dataclass(frozen=True)
class EncodeSettings:
    group_by: str = "role"         # role | tensor | all: which tensors share a compressed section
    candidates: tuple = ("zlib", "zstd", "brotli", "lzma", "rans")
    shuffle: str = "auto"          # auto | off: try byte-shuffling sections of 2+-byte elements
    params: EncodeParams = EncodeParams()


@dataclass(frozen=True)
class GPTQSettings:
    """[gptq]: the knobs of the GPTQ pass (squeeze/passes/gptq.py), the Parameter Golf records' values by default."""
    block_size: int = 128          # columns updated together (the lazy-batch trick of the GPTQ paper)
    damp: float = 0.01             # added to H's diagonal, as a fraction of its mean, so H is invertible
    act_order: bool = True         # quantize columns by decreasing Hessian diagonal (most important first)


@dataclass(frozen=True)
class Rule:
    match: tuple                   # patterns: globs or "re:..." regexes
    role: tuple = ()               # empty: any role
    overrides: tuple = ()          # ((key, value), ...) over TensorSettings
    line: int = 0

    def matches(self, name: str, role: str, parent: str | None = None) -> bool:
        """`parent`: the N-D tensor a slice belongs to (squeeze/passes/stack.py); a rule naming it covers every
        slice."""
        if self.role and role not in self.role:
            return False
        return any(_match(p, name) or (parent is not None and _match(p, parent)) for p in self.match)

    def describe(self) -> str:
        return "|".join(self.match) + (f" role={'|'.join(self.role)}" if self.role else "")


@dataclass(frozen=True)
class Recipe:
    """A parsed recipe. `Recipe()` is the built-in default: int6 matrices, int8 embedding, brotli."""
    name: str = "default"
    description: str = "built-in default: int6 per-row matrices (std clip), int8 embedding, brotli or rans per section"
    # Half the records' SDClip k (12.85 int6 matrices, 20 int8 embedding): the records chose k for GPTQ, whose error
    # feedback repairs rounding and so affords a wide grid; Recipe() was written for round-to-nearest (no
    # calibration), where a tighter clip loses far less. Fixture, RTN, val loss over 32 windows of 256: +0.009 nats
    # at k/2 (2,066,083 B), +0.120 at the records' k (1,905,183 B). recipes/int6-mixed.toml does the same (k 6, 12).
    defaults: TensorSettings = TensorSettings(bits=6, clip="std", clip_std_k=12.85 / 2, codec="auto")
    keep_float: KeepFloat = KeepFloat(control_dtype="f16")
    rules: tuple = (Rule(match=("*",), role=("embedding",),
                         overrides=(("bits", 8), ("clip", "std"), ("clip_std_k", 20.0 / 2)), line=0),)
    # brotli and rans only: each extra codec in an artifact adds its lines to the user's decoder (lzma's ~70 bytes
    # bought ~30 on the fixture's scales)
    encode: EncodeSettings = EncodeSettings(candidates=("brotli", "rans"))
    gptq: GPTQSettings = GPTQSettings()
    roles: tuple = ()              # ((role, patterns), ...) from [roles]: names whose role the name rules miss
    source: str = "<built-in>"

    def role_for(self, name: str) -> str | None:
        """The role [roles] gives a tensor (a pattern naming a stack covers its slices), or None."""
        return next((role for role, patterns in self.roles if any(_match(p, name) for p in patterns)), None)

    @staticmethod
    def load(path) -> "Recipe":
        return load(path)

    def settings_for(self, name: str, role: str, numel: int, parent: str | None = None) -> \
            tuple[TensorSettings, str]:
        """The settings of one tensor and why (for inspect): the first matching rule, else small/control, else
        defaults. `parent`: the stack a slice belongs to, which rules may name instead."""
        rule = next((r for r in self.rules if r.matches(name, role, parent)), None)
        settings = self.defaults
        why = "defaults"
        if rule is not None:
            settings = dataclasses.replace(settings, **dict(rule.overrides))
            why = f"rule {rule.describe()}"
            if "scheme" in dict(rule.overrides):
                return settings, why
        kf = self.keep_float
        if role == "control":
            return dataclasses.replace(settings, scheme="float", float_dtype=kf.control_dtype), "control"
        if numel <= kf.max_numel:
            return dataclasses.replace(settings, scheme="float", float_dtype=kf.small_dtype), "small"
        return settings, why


def _match(pattern: str, name: str) -> bool:
    if pattern.startswith("re:"):
        return re.search(pattern[3:], name) is not None
    return fnmatch.fnmatchcase(name, pattern)


# ---------------------------------------------------------------------------------------------------------------
# Parsing and validation

_SETTING_TYPES = {f.name: f.type for f in dataclasses.fields(TensorSettings)}
_KEEP_FLOAT_KEYS = {f.name for f in dataclasses.fields(KeepFloat)}
_ENCODE_KEYS = {"group_by", "candidates", "shuffle", "codec"} | {f.name for f in dataclasses.fields(EncodeParams)}
_TOP_KEYS = {"name", "description", "defaults", "keep_float", "encode", "gptq", "rules", "roles"}


class _Checker:
    """Validates values and reports `file:line: message` using the TOML text to find the key's line."""

    def __init__(self, path: str, text: str):
        self.path, self.lines = path, text.splitlines()

    def line_of(self, table: str, key: str, index: int = 0) -> int:
        """Line of `key` inside `[table]` (or the index-th `[[table]]`); 0 if not found."""
        current, seen = "", -1
        key_re = re.compile(rf"^\s*(\"{re.escape(key)}\"|{re.escape(key)})\s*=")
        for no, line in enumerate(self.lines, 1):
            header = re.match(r"^\s*\[\[?\s*([^\]]+?)\s*\]\]?", line)
            if header:
                current = header.group(1)
                if current == table and line.strip().startswith("[["):
                    seen += 1
                continue
            in_table = current == table and (not table or seen == index or not self._is_array(table))
            if in_table and key_re.match(line):
                return no
        return 0

    def _is_array(self, table: str) -> bool:
        return any(re.match(rf"^\s*\[\[\s*{re.escape(table)}\s*\]\]", l) for l in self.lines)

    def fail(self, table: str, key: str, message: str, index: int = 0):
        line = self.line_of(table, key, index)
        where = f"{self.path}:{line}" if line else self.path
        raise RecipeError(f"{where}: {message}")


def _check_setting(chk: _Checker, table: str, key: str, value, index: int = 0):
    """Type- and range-check one TensorSettings value; returns it normalized."""
    def bad(msg):
        chk.fail(table, key, f"{key} = {value!r}: {msg}", index)

    expected = _SETTING_TYPES[key]
    if expected in ("int", int) and (not isinstance(value, int) or isinstance(value, bool)):
        bad("expected an integer")
    if expected in ("float", float) and (not isinstance(value, (int, float)) or isinstance(value, bool)):
        bad("expected a number")
    if expected in ("str", str) and not isinstance(value, str):
        bad("expected a string")
    if key == "scheme" and value not in ("int", "float"):
        bad('expected "int" or "float"')
    if key == "bits" and not 2 <= value <= 8:
        bad("bits must be 2..8")
    if key == "group_size" and value < 0:
        bad("group_size must be 0 (per row) or positive")
    if key == "clip" and value not in CLIP_METHODS:
        bad(f"expected one of {', '.join(CLIP_METHODS)}")
    if key == "clip_percentile" and not 0 < value <= 100:
        bad("clip_percentile must be in (0, 100]")
    if key == "clip_std_k" and not 0 < value < float("inf"):
        bad("clip_std_k must be a positive, finite number")
    if key == "scale_min" and not 0 <= value < float("inf"):
        bad("scale_min must be a finite number >= 0")
    if key == "lowrank_rank" and not 0 <= value <= 256:
        bad("lowrank_rank must be 0 (none) .. 256 (the format's bound)")
    if key == "mse_grid" and not 1 <= value <= 1024:
        bad("mse_grid must be 1..1024")
    if key == "scale_dtype":
        if _FLOAT_NAMES.get(value) not in ("f16", "bf16", "f32"):
            bad('expected "fp16", "bf16" or "fp32"')
        value = _FLOAT_NAMES[value]
    if key == "float_dtype":
        if value not in _FLOAT_NAMES:
            bad(f"expected {_FLOAT_CHOICES}")
        value = _FLOAT_NAMES[value]
    if key == "pack" and value not in ("auto", "byte", "dense"):
        bad('expected "auto", "byte" or "dense"')
    if key == "method" and value not in ("auto", "rtn", "gptq"):
        bad('expected "auto", "rtn" or "gptq"')
    if key == "codec" and value != "auto" and value not in codecs.NAMES:
        bad(f"expected \"auto\" or one of {', '.join(codecs.NAMES)}")
    return float(value) if expected in ("float", float) else value


def _settings_table(chk: _Checker, table: str, data: dict, index: int = 0, allowed_extra=()) -> dict:
    out = {}
    for key, value in data.items():
        if key in allowed_extra:
            continue
        if key not in _SETTING_TYPES:
            chk.fail(table, key, f"unknown key {key!r} in [{table}]", index)
        out[key] = _check_setting(chk, table, key, value, index)
    return out


def _string_list(chk, table, key, value, index=0) -> tuple:
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, list) or not values or not all(isinstance(v, str) and v for v in values):
        chk.fail(table, key, f"{key} must be a non-empty string or list of strings", index)
    for v in values:
        if v.startswith("re:"):
            try:
                re.compile(v[3:])
            except re.error as e:
                chk.fail(table, key, f"{key} = {v!r}: invalid regex ({e})", index)
    return tuple(values)


def parse(text: str, path: str = "<recipe>") -> Recipe:
    chk = _Checker(path, text)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise RecipeError(f"{path}: invalid TOML ({e})") from None
    for key in data:
        if key not in _TOP_KEYS:
            chk.fail("", key, f"unknown key {key!r} (expected one of {', '.join(sorted(_TOP_KEYS))})")
    for key in ("name", "description"):
        if key in data and not isinstance(data[key], str):
            chk.fail("", key, f"{key} must be a string")
    for key in ("defaults", "keep_float", "encode", "gptq", "roles"):
        if key in data and not isinstance(data[key], dict):
            chk.fail("", key, f"{key} must be a table [{key}]")

    defaults = TensorSettings(**_settings_table(chk, "defaults", data.get("defaults", {})))
    keep_float = _parse_keep_float(chk, data.get("keep_float", {}))
    encode, encode_codec = _parse_encode(chk, data.get("encode", {}))
    if encode_codec is not None:  # [encode] codec = "..." is shorthand for the default codec of every tensor
        defaults = dataclasses.replace(defaults, codec=encode_codec)

    rules = []
    raw_rules = data.get("rules", [])
    if not isinstance(raw_rules, list):
        chk.fail("", "rules", "rules must be an array of tables [[rules]]")
    for i, rule in enumerate(raw_rules):
        if not isinstance(rule, dict):
            chk.fail("", "rules", f"rule {i + 1} is not a table: write each rule as a [[rules]] section")
        if "match" not in rule:
            line = [n for n, l in enumerate(chk.lines, 1) if re.match(r"^\s*\[\[\s*rules\s*\]\]", l)]
            raise RecipeError(f"{path}:{line[i] if i < len(line) else 0}: rule {i + 1} has no 'match' key")
        match = _string_list(chk, "rules", "match", rule["match"], i)
        role = _string_list(chk, "rules", "role", rule["role"], i) if "role" in rule else ()
        for r in role:
            if r not in ROLES:
                chk.fail("rules", "role", f"role = {r!r}: expected one of {', '.join(ROLES)}", i)
        overrides = _settings_table(chk, "rules", rule, i, allowed_extra=("match", "role"))
        rules.append(Rule(match=match, role=role, overrides=tuple(overrides.items()),
                          line=chk.line_of("rules", "match", i)))
    roles = []
    for role, patterns in data.get("roles", {}).items():
        if role not in ROLES:
            chk.fail("roles", role, f"unknown role {role!r} in [roles] (expected one of {', '.join(ROLES)})")
        roles.append((role, _string_list(chk, "roles", role, patterns)))
    return Recipe(name=data.get("name", Path(path).stem), description=data.get("description", ""),
                  defaults=defaults, keep_float=keep_float, rules=tuple(rules), encode=encode,
                  gptq=_parse_gptq(chk, data.get("gptq", {})), roles=tuple(roles), source=path)


def _parse_gptq(chk: _Checker, data: dict) -> GPTQSettings:
    out = {}
    for key, value in data.items():
        if key == "block_size":
            if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 65536:
                chk.fail("gptq", key, f"block_size = {value!r}: expected an integer in 1..65536")
        elif key == "damp":
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 < value <= 1:
                chk.fail("gptq", key, f"damp = {value!r}: expected a number in (0, 1]")
            value = float(value)
        elif key == "act_order":
            if not isinstance(value, bool):
                chk.fail("gptq", key, f"act_order = {value!r}: expected true or false")
        else:
            chk.fail("gptq", key, f"unknown key {key!r} in [gptq]")
        out[key] = value
    return GPTQSettings(**out)


def _parse_keep_float(chk: _Checker, data: dict) -> KeepFloat:
    out = {}
    for key, value in data.items():
        if key not in _KEEP_FLOAT_KEYS:
            chk.fail("keep_float", key, f"unknown key {key!r} in [keep_float]")
        if key == "max_numel" and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
            chk.fail("keep_float", key, f"max_numel = {value!r}: expected a non-negative integer")
        if key in ("control_dtype", "small_dtype"):
            if not isinstance(value, str) or value not in _FLOAT_NAMES:
                chk.fail("keep_float", key, f"{key} = {value!r}: expected {_FLOAT_CHOICES}")
            value = _FLOAT_NAMES[value]
        if key == "control_patterns":
            if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
                chk.fail("keep_float", key, "control_patterns must be a list of non-empty strings")
            value = tuple(value)
        out[key] = value
    return KeepFloat(**out)


def _parse_encode(chk: _Checker, data: dict):
    params, out, codec = {}, {}, None
    limits = {"zlib_level": (0, 9), "zstd_level": (1, 22), "brotli_quality": (0, 11), "brotli_window": (10, 24),
              "lzma_preset": (0, 9)}
    for key, value in data.items():
        if key not in _ENCODE_KEYS:
            chk.fail("encode", key, f"unknown key {key!r} in [encode]")
        if key in limits:
            lo, hi = limits[key]
            if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
                chk.fail("encode", key, f"{key} = {value!r}: expected an integer in {lo}..{hi}")
            params[key] = value
        elif key == "lzma_extreme":
            if not isinstance(value, bool):
                chk.fail("encode", key, f"{key} = {value!r}: expected true or false")
            params[key] = value
        elif key == "group_by":
            if value not in ("role", "tensor", "all"):
                chk.fail("encode", key, f'group_by = {value!r}: expected "role", "tensor" or "all"')
            out[key] = value
        elif key == "shuffle":
            if value not in ("auto", "off"):
                chk.fail("encode", key, f'shuffle = {value!r}: expected "auto" or "off"')
            out[key] = value
        elif key == "candidates":
            if not isinstance(value, list) or not value or any(v not in codecs.NAMES for v in value):
                chk.fail("encode", key, f"candidates = {value!r}: expected a list of {', '.join(codecs.NAMES)}")
            out[key] = tuple(value)
        elif key == "codec":
            codec = _check_setting(chk, "encode", "codec", value)
    return EncodeSettings(params=EncodeParams(**params), **out), codec


def load(path) -> Recipe:
    """Read a recipe file. RecipeError (one line, naming the file) on any problem."""
    path = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RecipeError(f"{path}: no such recipe file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise RecipeError(f"{path}: cannot read recipe ({e})") from None
    return parse(text, path)
