"""The validation token stream: every shard a glob matches, in sorted name order, concatenated (as the challenge's
load_validation_tokens), optionally cut to a prefix; and the CaseOps byte sidecars beside it.

CaseOps records (Parameter Golf, 2026-04-18 on) keep, beside the token shards `fineweb_val_NNNNNN.bin`, byte sidecars
`fineweb_val_bytes_NNNNNN.bin` in the same shard layout: one uint16 per token, that token's original UTF-8 byte count
(BOS and case-operator tokens count 0). BPB then divides by the sidecar's counts over the scored targets instead of
the tokenizer's byte table. A file whose name holds `_bytes_` is a sidecar, never a token shard: a token glob that
matches one is an error, not silently filtered (`fineweb_val_*.bin` matches both kinds in such a folder).
"""
import glob as globbing
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..data import HEADER_INTS, SHARD_MAGIC, SHARD_VERSION, read_shard
from ..errors import SqueezeError

SIDECAR_MARK = "_bytes_"
NO_SIDECAR = "none"  # --val-bytes none: the tokenizer's byte table, even where sidecars lie beside the shards
LUT = "tokenizer LUT"
_NUMBERED = re.compile(r"^(?P<stem>.+)_(?P<number>\d+)(?P<ext>\.bin)$")


def is_sidecar(path) -> bool:
    return SIDECAR_MARK in Path(path).name


def _quote(pattern: str) -> str:
    return f"'{pattern}'"


def _token_only_glob(pattern: str, tokens: list) -> str:
    """A glob that matches exactly `tokens` (the user's with its first * as [0-9]*), or the CaseOps example."""
    head, sep, name = pattern.rpartition("/")
    if "*" in name:
        candidate = head + sep + name.replace("*", "[0-9]*", 1)
        if sorted(globbing.glob(candidate)) == tokens:
            return candidate
    return "fineweb_val_[0-9]*.bin"


def shard_paths(pattern: str, option: str | None = None) -> list:
    """The token shards `pattern` matches, sorted. A glob that also, or only, matches byte sidecars (`*_bytes_*`)
    is a one-line error; `option` ("--val") names the flag the sidecars belong to in it."""
    paths = sorted(globbing.glob(pattern))
    if not paths:
        raise SqueezeError(f"{pattern}: no token shards match")
    sidecars = [p for p in paths if is_sidecar(p)]
    tokens = [p for p in paths if not is_sidecar(p)]
    elsewhere = " (pass them with --val-bytes)" if option == "--val" else ""
    if sidecars and tokens:
        raise SqueezeError(f"{pattern}: matches token shards ({tokens[0]}) and CaseOps byte sidecars ({sidecars[0]})"
                           f"{elsewhere}; give a glob of the token shards only, e.g. "
                           f"{_quote(_token_only_glob(pattern, tokens))}")
    if sidecars:
        raise SqueezeError(f"{pattern}: matches only CaseOps byte sidecars ({sidecars[0]}): these are byte counts, "
                           f"not tokens{elsewhere}; give the token shards, e.g. 'fineweb_val_[0-9]*.bin'")
    return paths


def shard_length(path) -> int:
    """Values a shard holds, from its header (the file's size is checked against it; the values are not read)."""
    path = str(path)
    try:
        with open(path, "rb") as f:
            header = np.frombuffer(f.read(HEADER_INTS * 4), dtype="<i4")
            size = Path(path).stat().st_size
    except OSError as e:
        raise SqueezeError(f"{path}: cannot read shard ({e.strerror or e})") from None
    if header.size < HEADER_INTS:
        raise SqueezeError(f"{path}: too short for a shard header ({size} bytes)")
    if header[0] != SHARD_MAGIC or header[1] != SHARD_VERSION:
        raise SqueezeError(f"{path}: not a shard (header {header[0]}, {header[1]}; expected {SHARD_MAGIC}, "
                           f"{SHARD_VERSION})")
    n = int(header[2])
    if n < 0 or size != HEADER_INTS * 4 + 2 * n:
        raise SqueezeError(f"{path}: header says {n} values but the file holds {(size - 1024) / 2:g}")
    return n


def _concatenate(paths: list, max_predictions: int | None, check=None) -> np.ndarray:
    chunks, held = [], 0
    for path in paths:
        values = read_shard(path)
        if check is not None:
            check(path, values)
        chunks.append(values)
        held += values.size
        if max_predictions is not None and held > max_predictions:
            break  # later shards are not needed for the prefix
    stream = np.concatenate(chunks)
    return stream if max_predictions is None else stream[: max_predictions + 1]


def load_stream(pattern: str, vocab_size: int, max_predictions: int | None = None,
                option: str | None = None) -> torch.Tensor:
    """int32 tokens of the matched shards; with `max_predictions`, only the first max_predictions + 1 tokens (that
    many predictions). Every token must be an id of the tokenizer's vocabulary. Byte sidecars are refused (see
    shard_paths; `option` names the flag in that error)."""
    def check(path, tokens):
        if tokens.size and int(tokens.max()) >= vocab_size:
            raise SqueezeError(f"{path}: token id {int(tokens.max())} is outside the tokenizer's vocabulary of "
                               f"{vocab_size}")
    return torch.from_numpy(_concatenate(shard_paths(pattern, option), max_predictions, check).astype(np.int32))


@dataclass(frozen=True)
class ByteSource:
    """Where each scored target's byte count comes from: the tokenizer's table (glob None) or a sidecar."""
    glob: str | None = None   # the sidecars' glob (given, or the one found beside the token shards)
    files: tuple = ()         # the sidecar shards, in stream order
    found: bool = False       # found beside the token shards (no --val-bytes given)

    @property
    def label(self) -> str:
        """"tokenizer LUT" or "sidecar GLOB", as the report says it."""
        return LUT if self.glob is None else f"sidecar {self.glob}"


def _sidecar_of(token_shard: str) -> str | None:
    """X_NNNNNN.bin -> X_bytes_NNNNNN.bin (fineweb_val_000000.bin -> fineweb_val_bytes_000000.bin)."""
    head, sep, name = token_shard.rpartition("/")  # as the glob spelled it, so the names compare
    m = _NUMBERED.match(name)
    return None if m is None else f"{head}{sep}{m['stem']}{SIDECAR_MARK}{m['number']}{m['ext']}"


def _sidecar_glob(val: str, sidecars: list) -> str:
    """A glob for sidecars found by themselves: the val glob with `bytes_` after its last "_" when that matches
    exactly them, else their paths."""
    head, sep, name = val.rpartition("/")
    if "_" in name:
        cut = name.rindex("_") + 1
        candidate = head + sep + name[:cut] + SIDECAR_MARK[1:] + name[cut:]
        if sorted(globbing.glob(candidate)) == sidecars:
            return candidate
    return " ".join(sidecars)


def byte_source(val: str, val_bytes: str | None) -> ByteSource:
    """The byte counts to use for the token shards of `val`: `val_bytes` "none" -> the tokenizer's table; a glob ->
    those sidecars; None -> the sidecars beside every token shard (X_NNNNNN.bin -> X_bytes_NNNNNN.bin) when each has
    one, else the tokenizer's table (some but not all is an error). Counts are checked by load_byte_counts."""
    tokens = shard_paths(val, "--val")
    if val_bytes is not None and val_bytes.strip().lower() == NO_SIDECAR:
        return ByteSource()
    if val_bytes is not None:
        files = sorted(globbing.glob(val_bytes))
        if not files:
            raise SqueezeError(f"--val-bytes {val_bytes}: no byte sidecar shards match")
        shared = sorted(set(files) & set(tokens))
        if shared:
            raise SqueezeError(f"--val-bytes {val_bytes}: matches the token shard {shared[0]} of --val {val}; give "
                               f"the byte sidecars, e.g. 'fineweb_val_bytes_*.bin'")
        return ByteSource(val_bytes, tuple(files))
    beside = [_sidecar_of(p) for p in tokens]
    present = [p for p in beside if p is not None and Path(p).is_file()]
    if not present:
        return ByteSource()
    if len(present) < len(tokens):
        missing = next(t for t, s in zip(tokens, beside) if s is None or not Path(s).is_file())
        raise SqueezeError(f"{val}: CaseOps byte sidecars lie beside {len(present)} of its {len(tokens)} token shards "
                           f"(none for {missing}); give --val-bytes GLOB, or --val-bytes none for the tokenizer's "
                           f"byte table")
    return ByteSource(_sidecar_glob(val, present), tuple(present), found=True)


def load_byte_counts(source: ByteSource, val: str, max_predictions: int | None = None) -> torch.Tensor | None:
    """int64 byte count of every token of the stream (None for the tokenizer's table), cut as load_stream cuts the
    tokens. The sidecars must hold exactly as many values as the token shards hold tokens."""
    if source.glob is None:
        return None
    n_tokens = sum(shard_length(p) for p in shard_paths(val, "--val"))
    n_values = sum(shard_length(p) for p in source.files)
    if n_values != n_tokens:
        raise SqueezeError(f"--val-bytes {source.glob}: the byte sidecars hold {n_values:,} values but --val {val} "
                           f"holds {n_tokens:,} tokens; they must match one for one")
    return torch.from_numpy(_concatenate(list(source.files), max_predictions))
