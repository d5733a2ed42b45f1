"""Fuzz the artifact reader: mutate small valid artifacts and check that squeeze.load either returns exactly the
tensors the header describes or raises FormatError (one line), never any other exception.

    python bench/fuzz_artifacts.py --count 100000 [--seed 0] [--decoder-every 10] [--inspect-every 10]
                                   [--save-failures DIR] [--memory-limit-gb 6]
    python bench/fuzz_artifacts.py --replay 1234          # re-run one case of a run (same --seed) and show it

Prints how many cases ended in each outcome (ok, FormatError, any other exception type with its first message), the
mutations that led there, and the slowest case; exits with status 1 if any other exception occurred. With
--decoder-every N, every N-th case is also loaded by the emitted tiny decoder, which must return or raise
ValueError("squeeze: ...") in one line; with --inspect-every N, squeeze.inspect too, which must read what
load reads and refuse the rest with FormatError. The process's address space is capped (--memory-limit-gb), so that a
hostile size that slipped through shows as a MemoryError crash instead of exhausting a shared machine.

Seeds: one small artifact per codec (rans, brotli, zlib, zstd, lzma, raw with dense packing) and the default recipe,
all compiled from one synthetic state dict with every storage form (quantized, float, integer, bool, aliases).
Mutations work at two levels: bytes (bit flips, truncations, splices, preamble fields) that the CRCs should catch,
and structure (header field edits, section bytes) re-written with valid CRCs, so the checks behind the CRCs run.
tests/test_fuzz.py drives the same mutators from hypothesis in CI.
"""
import argparse
import copy
import importlib.util
import json
import random
import resource
import sys
import tempfile
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import squeeze  # noqa: E402
from squeeze import codecs, decoder, format  # noqa: E402
from squeeze.dtypes import torch_dtype  # noqa: E402
from squeeze.errors import FormatError  # noqa: E402
from squeeze.inspect import render  # noqa: E402
from squeeze.recipe import parse  # noqa: E402

_FAST = "[encode]\nbrotli_quality = 5\nzstd_level = 3\nlzma_preset = 1\nlzma_extreme = false\n"
_SMALL = "[keep_float]\nmax_numel = 256\n"
SEED_RECIPES = {  # name -> recipe text (None: the built-in default); together they use every codec and packing,
    # and low-rank corrections (format 1.2) in a rans and a brotli section
    "rans": '[defaults]\nbits = 6\ncodec = "rans"\nclip = "std"\n[[rules]]\nmatch = "*.attn.*"\ngroup_size = 16\n'
            '[[rules]]\nmatch = "*.mlp.*"\nlowrank_rank = 2\n' + _SMALL,
    "brotli": '[defaults]\nbits = 5\ncodec = "brotli"\nscale_dtype = "bf16"\nlowrank_rank = 3\n' + _SMALL + _FAST,
    "zlib": '[defaults]\nbits = 8\ncodec = "zlib"\nclip = "percentile"\n' + _SMALL + _FAST,
    "zstd": '[defaults]\nbits = 4\ncodec = "zstd"\ngroup_size = 8\n' + _SMALL + _FAST,
    "lzma": '[defaults]\nbits = 3\ncodec = "lzma"\nscale_dtype = "fp32"\n' + _SMALL + _FAST,
    "raw-dense": '[defaults]\nbits = 3\ncodec = "raw"\npack = "dense"\n' + _SMALL,
    "default": None,
}


def seed_state_dict() -> dict:
    """Small, deterministic, with every storage form: quantized matrices (one with near-duplicate rows, which the
    rans coder models by row references), float control tensors, integer and bool tensors, plain and transposed
    aliases, bf16 and f64 originals."""
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(192, 32, generator=g) * 0.02
    emb[96:] = emb[0] + 0.0005 * torch.randn(96, 32, generator=g)
    fc = torch.randn(256, 32, generator=g) * torch.linspace(0.002, 0.2, 32)  # column spreads: column classes
    return {
        "tok_emb.weight": emb,
        "blocks.0.attn.c_q.weight": (torch.randn(32, 32, generator=g) * 0.05).bfloat16(),
        "blocks.0.mlp.fc.weight": fc,
        "blocks.0.mlp.proj.weight": (torch.randn(32, 64, generator=g) * 0.05).double(),
        "blocks.0.attn_scale": torch.rand(32, generator=g),
        "skip_weights": torch.randn(2, 32, generator=g),
        "step": torch.tensor([1234], dtype=torch.int64),
        "mask": torch.rand(16, generator=g) > 0.5,
        "lm_head.weight": emb,
        "fc_t.weight": fc.t().contiguous(),
    }


def seed_artifacts() -> dict:
    """name -> artifact bytes, one per SEED_RECIPES entry."""
    sd = seed_state_dict()
    return {name: squeeze.compile(sd, parse(text, f"{name}.toml") if text else squeeze.Recipe())
            for name, text in SEED_RECIPES.items()}


# ---------------------------------------------------------------------------------------------------------------
# Taking an artifact apart and putting it back with valid CRCs

@dataclass
class Parts:
    header: object            # the decoded JSON header (after edits: any JSON value)
    sections: list            # stored bytes of each section, in file order
    header_codec: str


def parts_of(blob: bytes) -> Parts:
    art = format.read(blob)
    stored = [blob[o:o + s["size"]] for o, s in zip(art.offsets, art.sections)]
    return Parts(header=copy.deepcopy(art.header), sections=stored, header_codec=art.header_codec)


def assemble(parts: Parts) -> bytes:
    """The artifact format.write makes of these parts: preamble and header CRC valid whatever the header says."""
    return format.write(parts.header, parts.sections, parts.header_codec, codecs.EncodeParams())


def with_raw_header(parts: Parts, raw_header: bytes) -> bytes:
    """An artifact whose decoded header is exactly `raw_header` (any bytes: invalid UTF-8, invalid JSON), coded
    with zlib and carrying a valid CRC."""
    stored = zlib_encode(raw_header)
    preamble = format.PREAMBLE.pack(format.MAGIC, format.VERSION[0], 1, codecs.get("zlib").ID, 0, len(stored),
                                    len(raw_header), format.crc32(stored))
    return b"".join([preamble, stored, *parts.sections])


def zlib_encode(data: bytes) -> bytes:
    return codecs.encode("zlib", data, codecs.EncodeParams(zlib_level=1))


def fix_section_checksums(parts: Parts):
    """Make every section's declared size and CRC match its (edited) stored bytes, where the header allows."""
    sections = parts.header.get("sections") if isinstance(parts.header, dict) else None
    if not isinstance(sections, list):
        return
    for s, stored in zip(sections, parts.sections):
        if isinstance(s, dict):
            s["size"], s["crc"] = len(stored), format.crc32(stored)


# ---------------------------------------------------------------------------------------------------------------
# Hostile values

_CODES = ["f32", "f16", "bf16", "f64", "i8", "i16", "i32", "i64", "u8", "bool", "byte", "dense", "rans", "zlib",
          "raw", "brotli", "zstd", "lzma", "embedding", "mlp", "control", "other", "gzip", ""]
_INTS = [0, 1, 2, 3, 7, 8, 9, 255, 256, 65535, 65536, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**40 - 1, 2**40, 2**53,
         2**63, 2**64, 10**19, 10**25, -1, -2**31, -2**63]


def nested(depth: int) -> list:
    value = []
    for _ in range(depth):
        value = [value]
    return value


def hostile_value(rng: random.Random, original=None):
    """A replacement for a header value: near the original (off by one, halved, another valid code), or of the
    wrong type, out of range, deeply nested."""
    near = []
    if isinstance(original, bool):
        near = [not original, 0, 1]
    elif isinstance(original, int):
        near = [original + 1, original - 1, original * 2, original // 2, -original, original + 2**32, 0]
    elif isinstance(original, str):
        near = [original + "x", original[:-1], original.upper(), original * 2, "\n" + original] + _CODES
    elif isinstance(original, list):
        near = [[], original[:-1], original + original[-1:], original[::-1], [original], original * 2]
        if original and all(isinstance(v, int) for v in original):
            i = rng.randrange(len(original))
            near.append(original[:i] + [rng.choice(_INTS)] + original[i + 1:])
    elif isinstance(original, dict):
        near = [{}, [original], dict(list(original.items())[:-1])]
    confused = [None, True, False, 0.5, -0.0, 1e308, 1.0, "12", "", [], {}, [1, 2, 3], {"a": 1}, [[1, 2], [3]],
                nested(rng.choice([2, 40, 400])), "x" * rng.choice([1, 1000, 100000]), rng.choice(_INTS),
                rng.choice(_CODES)]
    pool = near if near and rng.random() < 0.6 else confused
    return copy.deepcopy(rng.choice(pool))


def _containers(value):
    """Every dict and list inside a JSON value, the value itself first."""
    if isinstance(value, (dict, list)):
        yield value
        for child in (value.values() if isinstance(value, dict) else value):
            yield from _containers(child)


def _pick_slot(rng: random.Random, header):
    """(container, key) of a random value somewhere in the header, or None if it holds none."""
    slots = [(c, k) for c in _containers(header) for k in (c.keys() if isinstance(c, dict) else range(len(c)))]
    return rng.choice(slots) if slots else None


# ---------------------------------------------------------------------------------------------------------------
# Structural mutations: edit the parts, re-write them with valid CRCs. Earlier edits may have left any JSON value
# anywhere, so each mutation looks before it takes.

def _objects(parts: Parts, key: str) -> list:
    """The dict entries of header[key] ("tensors" or "sections"), whatever shape the header is in now."""
    entries = parts.header.get(key) if isinstance(parts.header, dict) else None
    return [e for e in entries if isinstance(e, dict)] if isinstance(entries, list) else []


def edit_value(rng, parts: Parts, value=None) -> str:
    slot = _pick_slot(rng, parts.header)
    if slot is None:
        parts.header = hostile_value(rng)
        return "edit header"
    container, key = slot
    container[key] = hostile_value(rng, container[key]) if value is None else value
    return f"edit {key}"


def delete_value(rng, parts: Parts) -> str:
    slot = _pick_slot(rng, parts.header)
    if slot is None:
        return "delete nothing"
    container, key = slot
    del container[key]
    return f"delete {key}"


_KEYS = ["name", "shape", "dtype", "role", "alias", "t", "store", "data", "q", "codes", "scales", "bits", "group",
         "pack", "sdtype", "clip", "codec", "size", "raw", "crc", "shuffle", "sections", "tensors", "meta", "extra"]


def add_key(rng, parts: Parts) -> str:
    dicts = [c for c in _containers(parts.header) if isinstance(c, dict)]
    if not dicts:
        return "add nothing"
    key = rng.choice(_KEYS)
    rng.choice(dicts)[key] = hostile_value(rng)
    return f"add {key}"


def reorder(rng, parts: Parts) -> str:
    """Shuffle, duplicate or drop entries of the tensor or section list (sections with their bytes)."""
    header = parts.header
    if not isinstance(header, dict):
        return "reorder nothing"
    key = rng.choice(["tensors", "sections"])
    entries = header.get(key)
    if not isinstance(entries, list) or not entries:
        return "reorder nothing"
    how = rng.choice(["shuffle", "duplicate", "drop"])
    order = list(range(len(entries)))
    if how == "shuffle":
        rng.shuffle(order)
    elif how == "duplicate":
        order.insert(rng.randrange(len(order) + 1), rng.choice(order))
    else:
        order.pop(rng.randrange(len(order)))
    header[key] = [copy.deepcopy(entries[i]) for i in order]
    if key == "sections" and len(parts.sections) == len(entries):
        parts.sections = [parts.sections[i] for i in order]
    return f"{how} {key}"


def retarget_part(rng, parts: Parts) -> str:
    """Point one tensor's part at another's (overlaps), or move it within its section (holes)."""
    refs = [(t, k) for t in _objects(parts, "tensors") for k in ("data", "codes", "scales")
            if isinstance(t.get(k), list)]
    if len(refs) < 2:
        return "retarget nothing"
    (t, k), (u, j) = rng.sample(refs, 2)
    if rng.random() < 0.5:
        t[k] = copy.deepcopy(u[j])
    elif len(t[k]) == 3 and all(isinstance(v, int) for v in t[k]):
        t[k] = [t[k][0], max(0, t[k][1] + rng.choice([-3, -1, 1, 5])), t[k][2]]
    return f"retarget {k}"


def swap_codec(rng, parts: Parts) -> str:
    """Declare another codec for a section: its bytes go to the wrong decoder (behind a valid CRC)."""
    sections = _objects(parts, "sections")
    if not sections:
        return "swap nothing"
    rng.choice(sections)["codec"] = rng.choice(codecs.NAMES)
    return "swap codec"


def damage_section_bytes(rng, parts: Parts) -> str:
    """Damage one section's stored bytes and re-declare its size and CRC: the codec must catch it."""
    if not parts.sections:
        return "damage nothing"
    i = rng.randrange(len(parts.sections))
    how, parts.sections[i] = mutate_bytes(rng, parts.sections[i], others=parts.sections)
    fix_section_checksums(parts)
    return f"section {how}"


def damage_rans_model(rng, parts: Parts) -> str:
    """Change, insert or drop one u16 value of a rans section's model (tables, modes, classes, row references) and
    re-code it, stream and CRC valid otherwise: the model checks of docs/FORMAT.md must catch it."""
    sections = parts.header.get("sections") if isinstance(parts.header, dict) else None
    found = [i for i, s in enumerate(sections if isinstance(sections, list) else [])
             if isinstance(s, dict) and s.get("codec") == "rans" and i < len(parts.sections)
             and len(parts.sections[i]) >= 8]
    if not found:
        return "rans nothing"
    i = rng.choice(found)
    stored = parts.sections[i]
    model_end = 8 + int.from_bytes(stored[4:8], "little")
    try:
        values = np.frombuffer(zlib.decompress(stored[8:model_end]), "<u2").astype(np.int64).tolist()
    except zlib.error:
        return "rans model unreadable"
    j = rng.randrange(len(values) + 1)
    how = rng.choice(["set", "set", "set", "insert", "drop"])
    new = rng.choice([0, 1, 2, 3, 4, 63, 64, 65, 255, 256, 4095, 4096, 4097, 32768, 65535,
                      (values[j % len(values)] + rng.choice([1, -1])) % 65536 if values else 0])
    if how == "set" and values:
        values[j % len(values)] = new
    elif how == "insert":
        values.insert(j, new)
    elif values:
        values.pop(j % len(values))
    model = zlib.compress(np.array(values, "<u2").tobytes())
    parts.sections[i] = stored[:4] + len(model).to_bytes(4, "little") + model + stored[model_end:]
    fix_section_checksums(parts)
    return f"rans model {how}"


def resize_section(rng, parts: Parts) -> str:
    """Declare a different decoded size for a section (a bomb or a short read), CRC valid."""
    sections = _objects(parts, "sections")
    if not sections:
        return "resize nothing"
    s = rng.choice(sections)
    raw = s.get("raw") if isinstance(s.get("raw"), int) else 0
    s["raw"] = rng.choice([0, 1, raw - 1, raw + 1, raw * 2, raw * 1000, 2**32 - 1, 2**32])
    return "resize section"


STRUCTURAL = (edit_value, edit_value, edit_value, delete_value, add_key, reorder, retarget_part, swap_codec,
              damage_section_bytes, damage_section_bytes, damage_rans_model, resize_section)


# ---------------------------------------------------------------------------------------------------------------
# Byte mutations: what a damaged download looks like (the CRCs should catch nearly all of it)

_TOKENS = [b"NaN", b"Infinity", b"-1", b"1e999", b"[" * 3000, b"{" * 3000, b'"\\ud800"', b"\xff\xfe", b"\x00",
           b"99999999999999999999999", b"null", b"true", b"[]", b"{}", b'"', b",", b":"]


def mutate_bytes(rng, data: bytes, others=()) -> tuple[str, bytes]:
    """(what was done, the damaged bytes)."""
    data = bytearray(data)
    how = rng.choice(["flip", "truncate", "extend", "splice", "delete", "overwrite", "token"])
    pos = rng.randrange(len(data) + 1)
    if how == "flip" and data:
        for _ in range(rng.choice([1, 1, 2, 8])):
            p = rng.randrange(len(data))
            data[p] ^= 1 << rng.randrange(8)
    elif how == "truncate":
        del data[pos:]
    elif how == "extend":
        data += bytes(rng.randrange(256) for _ in range(rng.choice([1, 2, 7, 64])))
    elif how == "splice":
        source = bytes(rng.choice(list(others) or [bytes(data)])) or b"\x00"
        a = rng.randrange(len(source))
        data[pos:pos + rng.randrange(16)] = source[a:a + rng.randrange(1, 64)]
    elif how == "delete":
        del data[pos:pos + rng.choice([1, 2, 4, 100])]
    elif how == "overwrite":
        data[pos:pos + 1] = bytes([rng.choice([0, 1, 0x7F, 0x80, 0xFF, rng.randrange(256)])])
    else:
        data[pos:pos] = rng.choice(_TOKENS)
    return how, bytes(data)


_PREAMBLE_FIELDS = ["magic", "major", "minor", "codec", "reserved", "header_size", "header_raw", "header_crc"]


def mutate_preamble(rng, blob: bytes) -> tuple[str, bytes]:
    """Set one preamble field (not the magic) to a boundary or random value."""
    if len(blob) < format.PREAMBLE.size:
        return "preamble short", blob
    fields = list(format.PREAMBLE.unpack_from(blob))
    i = rng.randrange(1, len(fields))
    value = fields[i]
    if i < 5:  # one byte
        candidates = [0, 1, 2, 5, 6, 255, 255, rng.randrange(256), (value + 1) % 256]
    else:      # u32
        top = 2**32 - 1
        candidates = [0, 1, value - 1 if value else 0, min(value + 1, top), top, 16 << 20, (16 << 20) + 1,
                      rng.randrange(top + 1)]
    fields[i] = rng.choice(candidates)
    return f"preamble {_PREAMBLE_FIELDS[i]}", format.PREAMBLE.pack(*fields) + blob[format.PREAMBLE.size:]


def mutate_raw_header(rng, parts: Parts) -> tuple[str, bytes]:
    """Damage the header's JSON text itself and re-code it with a valid CRC (invalid JSON, UTF-8, nesting)."""
    text = json.dumps(parts.header, separators=(",", ":")).encode()
    how, text = mutate_bytes(rng, text)
    return f"json {how}", with_raw_header(parts, text)


# ---------------------------------------------------------------------------------------------------------------
# One fuzz case

def mutate(rng: random.Random, seeds: dict) -> tuple[str, str, bytes]:
    """(seed name, mutations applied, artifact bytes) of one random case."""
    name = rng.choice(sorted(seeds))
    blob = seeds[name]
    parts = parts_of(blob)
    mode = rng.choice(["structure", "structure", "structure", "bytes", "preamble", "json", "mixed"])
    done = []
    if mode in ("structure", "mixed"):
        for _ in range(rng.choice([1, 1, 1, 2, 3])):
            done.append(rng.choice(STRUCTURAL)(rng, parts))
        blob = assemble_any(parts)
    if mode in ("bytes", "mixed"):
        for _ in range(rng.choice([1, 1, 2])):
            how, blob = mutate_bytes(rng, blob, others=list(seeds.values()))
            done.append(how)
    elif mode == "preamble":
        how, blob = mutate_preamble(rng, blob)
        done.append(how)
    elif mode == "json":
        how, blob = mutate_raw_header(rng, parts)
        done.append(how)
    return name, ", ".join(done), blob


def assemble_any(parts: Parts) -> bytes:
    """assemble(), or the raw-header route for a header format.write cannot serialise (a lone surrogate)."""
    try:
        return assemble(parts)
    except UnicodeEncodeError:
        return with_raw_header(parts, json.dumps(parts.header, separators=(",", ":")).encode())


def check_load(blob: bytes) -> str:
    """'ok' or 'FormatError'. Anything else propagates: another exception type, a FormatError of several lines, or
    (AssertionError) tensors that do not match the header."""
    try:
        tensors = squeeze.load(blob)
    except FormatError as e:
        if "\n" in str(e) or not str(e).startswith("artifact: "):
            raise AssertionError(f"FormatError not one line naming the artifact: {str(e)[:200]!r}") from None
        return "FormatError"
    header = format.read(blob).header
    expected = [(t["name"], tuple(t["shape"]), torch_dtype(t["dtype"])) for t in header["tensors"]]
    got = [(name, tuple(x.shape), x.dtype) for name, x in tensors.items()]
    if got != expected:
        raise AssertionError(f"loaded tensors {got[:3]}... differ from the header {expected[:3]}...")
    return "ok"


def check_inspect(blob: bytes, loads: bool) -> str:
    """'ok' or 'FormatError' from what `squeeze inspect` runs (inspect and render); anything else propagates, and so
    does a FormatError for an artifact that loads (`loads`)."""
    try:
        render(squeeze.inspect(blob))
    except FormatError as e:
        if loads or "\n" in str(e):
            raise AssertionError(f"inspect refused what load reads, or not in one line: {str(e)[:200]!r}") from None
        return "FormatError"
    return "ok"


class TinyDecoder:
    """The emitted decoder for every codec, loaded once, run on blobs written to one scratch file."""

    def __init__(self, scratch_dir: str):
        self.path = str(Path(scratch_dir) / "case.sqz")
        source = Path(scratch_dir) / "tiny_decoder.py"
        source.write_text(decoder.emit(codecs.NAMES))
        spec = importlib.util.spec_from_file_location("tiny_decoder", source)
        self.module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(self.module)

    def check(self, blob: bytes) -> str:
        """'ok' or 'ValueError'; anything else (or a ValueError not in the decoder's one-line form) propagates."""
        Path(self.path).write_bytes(blob)
        try:
            self.module.squeeze_load(self.path)
        except ValueError as e:
            if not str(e).startswith("squeeze: ") or "\n" in str(e):
                raise AssertionError(f"tiny decoder error not in its one-line form: {str(e)[:200]!r}") from None
            return "ValueError"
        return "ok"


# ---------------------------------------------------------------------------------------------------------------
# The command

def case_rng(seed: int, index: int) -> random.Random:
    return random.Random(f"{seed}:{index}")  # any case can be replayed alone from (seed, index)


def run(count: int, seed: int, decoder_every: int, inspect_every: int, save_dir: str | None, progress: bool) -> int:
    seeds = seed_artifacts()
    outcomes = {}  # outcome -> [count, first message, first case]
    slowest = (0.0, None)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        tiny = TinyDecoder(scratch) if decoder_every else None
        for i in range(count):
            try:
                seed_name, done, blob = mutate(case_rng(seed, i), seeds)
            except Exception as e:  # a bug of the fuzzer's own, counted apart (and failing the run) so it shows
                entry = outcomes.setdefault(f"mutator: {type(e).__name__}", [0, str(e)[:200], f"case {i}"])
                entry[0] += 1
                continue
            t0 = time.perf_counter()
            keys = [_outcome("load", check_load, blob)]
            if inspect_every and i % inspect_every == 0:
                keys.append(_outcome("inspect", lambda b: check_inspect(b, keys[0][0] == "load: ok"), blob))
            if tiny is not None and i % decoder_every == 0:
                keys.append(_outcome("tiny decoder", tiny.check, blob))
            elapsed = time.perf_counter() - t0
            if elapsed > slowest[0]:
                slowest = (elapsed, f"case {i} ({seed_name}: {done})")
            for key, message in keys:
                entry = outcomes.setdefault(key, [0, message, f"case {i} ({seed_name}: {done})"])
                entry[0] += 1
                if message and save_dir and entry[0] == 1:
                    Path(save_dir).mkdir(parents=True, exist_ok=True)
                    (Path(save_dir) / f"case{i}.sqz").write_bytes(blob)
            if progress and (i + 1) % 5000 == 0:
                print(f"  {i + 1:,} cases, {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    total = time.perf_counter() - start
    print(f"{count:,} mutated artifacts (seed {seed}) in {total:.1f} s; slowest load {slowest[0] * 1000:.0f} ms: "
          f"{slowest[1]}")
    crashes = 0
    for key, (n, message, first) in sorted(outcomes.items(), key=lambda kv: -kv[1][0]):
        print(f"  {key:<40} {n:>9,}" + (f"   first: {first}: {message}" if message else ""))
        crashes += n if message else 0
    print("no exception other than FormatError" if not crashes else f"{crashes:,} cases raised something else")
    return 1 if crashes else 0


def _outcome(reader: str, check, blob: bytes) -> tuple[str, str | None]:
    """(outcome key, None for an expected outcome or the first line of an unexpected exception)."""
    try:
        return f"{reader}: {check(blob)}", None
    except Exception as e:  # the fuzzer's whole point: any other exception is counted and shown, not raised
        first = (str(e).splitlines() or [""])[0][:200]
        return f"{reader}: {type(e).__name__}", first


def replay(seed: int, index: int):
    """One case through every reader, each outcome printed (and the first unexpected exception raised)."""
    seeds = seed_artifacts()
    seed_name, done, blob = mutate(case_rng(seed, index), seeds)
    print(f"case {index} (seed {seed}): {seed_name}: {done}; {len(blob)} bytes")
    outcome = check_load(blob)
    print(f"load: {outcome}")
    print(f"inspect: {check_inspect(blob, loads=outcome == 'ok')}")
    with tempfile.TemporaryDirectory() as scratch:
        print(f"tiny decoder: {TinyDecoder(scratch).check(blob)}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--count", type=int, default=2000, help="mutated artifacts to load")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--decoder-every", type=int, default=0, metavar="N",
                    help="also run the emitted tiny decoder on every N-th case (0: never)")
    ap.add_argument("--inspect-every", type=int, default=0, metavar="N",
                    help="also run squeeze.inspect (and its table) on every N-th case (0: never)")
    ap.add_argument("--save-failures", metavar="DIR", help="write the first case of each unexpected outcome here")
    ap.add_argument("--replay", type=int, metavar="I", help="run case I alone through every reader and let its "
                                                            "exception show")
    ap.add_argument("--memory-limit-gb", type=float, default=6.0, help="address-space cap of this process")
    ap.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    args = ap.parse_args()
    limit = int(args.memory_limit_gb * (1 << 30))
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    if args.replay is not None:
        replay(args.seed, args.replay)
        return
    sys.exit(run(args.count, args.seed, args.decoder_every, args.inspect_every, args.save_failures, not args.quiet))


if __name__ == "__main__":
    main()
