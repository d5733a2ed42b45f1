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
    [budget]                   # optional: what compile --budget may choose per matrix (passes/allocate.py)
    bits_choices = [4, 5, 6]   # also clip_k_choices, group_choices ([] for per-row scales only), lowrank_ranks,
    float_option = false       # float_option (may a tensor stay f16), measure_bits (grids this narrow are priced
                               # on their loss measured on calibration text, 2 by default; 0: never)
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
import functools
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from . import codecs
from .codecs import EncodeParams
from .errors import RecipeError
from .format import ROLES
from .factors import FactorSpec
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
    lowrank_bits_u: int = 0        # 0: f16 factors; 2..8: U's codes (one scale per component) ...
    lowrank_bits_v: int = 4        # ... and V's codes (one scale per lowrank_group elements of a row)
    lowrank_group: int = 64

    def quant_spec(self) -> QuantSpec:
        value = {"percentile": self.clip_percentile, "std": self.clip_std_k}.get(self.clip, 0.0)
        return QuantSpec(bits=self.bits, group=self.group_size, clip=self.clip, clip_value=value,
                         mse_grid=self.mse_grid, scale_dtype=self.scale_dtype, scale_min=self.scale_min)

    def factor_spec(self) -> FactorSpec:
        return FactorSpec.from_keys(self.lowrank_bits_u, self.lowrank_bits_v, self.lowrank_group)


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
    # codecs tried on the sections of quantized codes; None: `candidates`. rans alone there skips the byte
    # compressors' slowest work (brotli-11 on the codes is 24 of a 17M-param budget compile's 99 s), where they
    # rarely win: rans models each row's or column's code statistics, which an LZ + order-2 coder sees only as bytes
    codes_candidates: tuple | None = None
    shuffle: str = "auto"          # auto | off: try byte-shuffling sections of 2+-byte elements
    params: EncodeParams = EncodeParams()


@dataclass(frozen=True)
class GPTQSettings:
    """[gptq]: the knobs of the GPTQ pass (squeeze/passes/gptq.py), the Parameter Golf records' values by default."""
    block_size: int = 128          # columns updated together (the lazy-batch trick of the GPTQ paper)
    damp: float = 0.01             # added to H's diagonal, as a fraction of its mean, so H is invertible
    act_order: bool = True         # quantize columns by decreasing Hessian diagonal (most important first)


@dataclass(frozen=True)
class BudgetSettings:
    """[budget]: the candidates of the budget allocator (compile --budget; AllocateConfig in passes/allocate.py)."""
    bits_choices: tuple = (2, 3, 4, 5, 6, 7, 8)
    clip_k_choices: tuple = (1.5, 2.0, 2.5, 3.5, 5.0, 7.0, 10.0, 14.0)  # std clips k (step = k·σ / qmax)
    group_choices: tuple = (128,)  # scale groups tried besides one scale per row; () for rows only
    lowrank_ranks: tuple = (1, 2, 4, 8)  # low-rank correction ranks offered; () for none
    lowrank_bits_u: int = 4        # their factors' storage, as the [defaults] keys of the same names say
    lowrank_bits_v: int = 4
    lowrank_group: int = 64
    float_option: bool = True      # may a tensor stay f16
    measure_bits: int = 2          # grids this narrow or narrower are priced on their measured loss; 0: never


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
    # bought ~30 on the fixture's scales); rans alone on the codes, where it beat brotli on every section measured
    # (fixture codes: 0.978x brotli-11 on the embedding, 0.983x on MLP; BENCHMARKS.md, "Entropy coder"), at a
    # fraction of its time
    encode: EncodeSettings = EncodeSettings(candidates=("brotli", "rans"), codes_candidates=("rans",))
    gptq: GPTQSettings = GPTQSettings()
    budget: BudgetSettings = BudgetSettings()
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
# The schema: each table's keys, with the TOML type, the values allowed, what an error expects and how it is stored

def _int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


_KINDS = {int: (_int, "expected an integer"), float: (_number, "expected a number"),
          str: (lambda v: isinstance(v, str), "expected a string"), list: (lambda v: isinstance(v, list), ""),
          bool: (lambda v: isinstance(v, bool), "expected true or false")}


def _field(kind, allowed=None, expect="", store=None, typed=False, bare=False):
    """A key's check, `(key, value) -> (error or None, stored value)`. `allowed`: a test of a value of the kind, or
    the allowed values (expected as '"a", "b" or "c"' unless `expect` says otherwise). The error reads
    "{key} = {value!r}: {expect}", or just `expect` if `bare`; if `typed`, a value of another kind gets its kind's
    message first. Numbers are stored as floats and lists as tuples unless `store` says otherwise."""
    is_kind, kind_expect = _KINDS[kind]
    if isinstance(allowed, (tuple, set, dict)):
        expect = expect or f"expected {_either(*allowed)}"
        allowed = allowed.__contains__
    expect, store = expect or kind_expect, store or {float: float, list: tuple}.get(kind, lambda v: v)

    def check(key, value):
        if is_kind(value) and (allowed is None or allowed(value)):
            return None, store(value)
        error = kind_expect if typed and not is_kind(value) else expect
        return (error if bare else f"{key} = {value!r}: {error}"), None
    return check


def _either(*names) -> str:
    return ", ".join(f'"{n}"' for n in names[:-1]) + f' or "{names[-1]}"'


def _int_in(lo: int, hi: int):
    return _field(int, lambda v: lo <= v <= hi, f"expected an integer in {lo}..{hi}")


def _each(element, non_empty=False, distinct=False):
    """A test of a list: each element passes `element`; the list is non-empty and its elements distinct if asked."""
    return lambda v: (v or not non_empty) and all(map(element, v)) and (not distinct or len(set(v)) == len(v))


_setting = functools.partial(_field, typed=True)  # TensorSettings' keys: a wrong type is named first
_INF = float("inf")
_FLOAT_DTYPE = (str, _FLOAT_NAMES, f"expected {_FLOAT_CHOICES}", _FLOAT_NAMES.get)
_CODEC = _setting(str, ("auto",) + codecs.NAMES, f"expected \"auto\" or one of {', '.join(codecs.NAMES)}")

_SETTINGS = {                                                          # [defaults] and [[rules]]: TensorSettings
    "scheme": _setting(str, ("int", "float")),
    "bits": _setting(int, lambda v: 2 <= v <= 8, "bits must be 2..8"),
    "group_size": _setting(int, lambda v: v >= 0, "group_size must be 0 (per row) or positive"),
    "clip": _setting(str, CLIP_METHODS, f"expected one of {', '.join(CLIP_METHODS)}"),
    "clip_percentile": _setting(float, lambda v: 0 < v <= 100, "clip_percentile must be in (0, 100]"),
    "clip_std_k": _setting(float, lambda v: 0 < v < _INF, "clip_std_k must be a positive, finite number"),
    "mse_grid": _setting(int, lambda v: 1 <= v <= 1024, "mse_grid must be 1..1024"),
    "scale_dtype": _setting(str, {n for n, d in _FLOAT_NAMES.items() if d in ("f16", "bf16", "f32")},
                            f"expected {_either('fp16', 'bf16', 'fp32')}", _FLOAT_NAMES.get),
    "scale_min": _setting(float, lambda v: 0 <= v < _INF, "scale_min must be a finite number >= 0"),
    "float_dtype": _setting(*_FLOAT_DTYPE),
    "pack": _setting(str, ("auto", "byte", "dense")),
    "codec": _CODEC,
    "method": _setting(str, ("auto", "rtn", "gptq")),
    "lowrank_rank": _setting(int, lambda v: 0 <= v <= 256, "lowrank_rank must be 0 (none) .. 256 (the format's bound)"),
    "lowrank_bits_u": _setting(int, lambda v: v == 0 or 2 <= v <= 8, "lowrank_bits_u must be 0 (f16 factors) or 2..8"),
    "lowrank_bits_v": _setting(int, lambda v: 2 <= v <= 8, "lowrank_bits_v must be 2..8"),
    "lowrank_group": _setting(int, lambda v: v >= 0, "lowrank_group must be 0 (per row) or positive"),
}
_KEEP_FLOAT = {                                                        # KeepFloat
    "max_numel": _field(int, lambda v: v >= 0, "expected a non-negative integer"),
    "control_patterns": _field(list, _each(lambda p: isinstance(p, str) and p),
                               "control_patterns must be a list of non-empty strings", bare=True),
    "control_dtype": _field(*_FLOAT_DTYPE),
    "small_dtype": _field(*_FLOAT_DTYPE),
}
_CODEC_LIST = _field(list, _each(codecs.NAMES.__contains__, non_empty=True),
                     f"expected a list of {', '.join(codecs.NAMES)}")
_ENCODE = {                                                            # EncodeSettings, EncodeParams, and `codec`:
    "group_by": _field(str, ("role", "tensor", "all")),                # shorthand for [defaults] codec
    "candidates": _CODEC_LIST,
    "codes_candidates": _CODEC_LIST,
    "shuffle": _field(str, ("auto", "off")),
    "codec": _CODEC,
    "zlib_level": _int_in(0, 9), "zstd_level": _int_in(1, 22), "brotli_quality": _int_in(0, 11),
    "brotli_window": _int_in(10, 24), "lzma_preset": _int_in(0, 9), "lzma_extreme": _field(bool),
}
_GPTQ = {                                                              # GPTQSettings
    "block_size": _int_in(1, 65536),
    "damp": _field(float, lambda v: 0 < v <= 1, "expected a number in (0, 1]"),
    "act_order": _field(bool),
}
_BUDGET = {                                                            # BudgetSettings
    "bits_choices": _field(list, _each(lambda b: _int(b) and 2 <= b <= 8, non_empty=True, distinct=True),
                           "expected a non-empty list of distinct integers in 2..8"),
    "clip_k_choices": _field(list, _each(lambda k: _number(k) and 0 < k < _INF, non_empty=True),
                             "expected a non-empty list of positive, finite numbers", lambda v: tuple(map(float, v))),
    "group_choices": _field(list, _each(lambda g: _int(g) and g > 0), "expected a list of positive integers"),
    "lowrank_ranks": _field(list, _each(lambda r: _int(r) and 1 <= r <= 256), "expected a list of integers in 1..256"),
    "lowrank_bits_u": _field(int, lambda v: v == 0 or 2 <= v <= 8, "expected 0 (f16 factors) or an integer in 2..8"),
    "lowrank_bits_v": _int_in(2, 8),
    "lowrank_group": _field(int, lambda v: v >= 0, "expected an integer >= 0"),
    "float_option": _field(bool),
    "measure_bits": _int_in(0, 8),
}
_TABLES = ("defaults", "keep_float", "encode", "gptq", "roles", "budget")
_TOP_KEYS = {"name", "description", "rules", *_TABLES}


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

    def table(self, table: str, data: dict, schema: dict, index: int = 0, skip=()) -> dict:
        """The table's values, checked against `schema` key by key in the file's order, as stored."""
        out = {}
        for key, value in data.items():
            if key in skip:
                continue
            if key not in schema:
                self.fail(table, key, f"unknown key {key!r} in [{table}]", index)
            error, out[key] = schema[key](key, value)
            if error:
                self.fail(table, key, error, index)
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
    for key in _TABLES:
        if key in data and not isinstance(data[key], dict):
            chk.fail("", key, f"{key} must be a table [{key}]")

    defaults = TensorSettings(**chk.table("defaults", data.get("defaults", {}), _SETTINGS))
    keep_float = KeepFloat(**chk.table("keep_float", data.get("keep_float", {}), _KEEP_FLOAT))
    encode = chk.table("encode", data.get("encode", {}), _ENCODE)
    if "codec" in encode:  # [encode] codec = "..." is shorthand for the default codec of every tensor
        defaults = dataclasses.replace(defaults, codec=encode.pop("codec"))
    params = {key: encode.pop(key) for key in list(encode) if key in EncodeParams.__dataclass_fields__}

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
        overrides = chk.table("rules", rule, _SETTINGS, i, skip=("match", "role"))
        rules.append(Rule(match=match, role=role, overrides=tuple(overrides.items()),
                          line=chk.line_of("rules", "match", i)))
    roles = []
    for role, patterns in data.get("roles", {}).items():
        if role not in ROLES:
            chk.fail("roles", role, f"unknown role {role!r} in [roles] (expected one of {', '.join(ROLES)})")
        roles.append((role, _string_list(chk, "roles", role, patterns)))
    return Recipe(name=data.get("name", Path(path).stem), description=data.get("description", ""),
                  defaults=defaults, keep_float=keep_float, rules=tuple(rules),
                  encode=EncodeSettings(params=EncodeParams(**params), **encode),
                  gptq=GPTQSettings(**chk.table("gptq", data.get("gptq", {}), _GPTQ)),
                  budget=BudgetSettings(**chk.table("budget", data.get("budget", {}), _BUDGET)),
                  roles=tuple(roles), source=path)


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
