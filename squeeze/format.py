"""The artifact container, version 1 (docs/FORMAT.md is normative). The only code that knows its byte layout.

An artifact is a file people download and load, so `read` trusts nothing in it: every header value is checked for
type and range before it is used, and anything wrong raises FormatError naming the file and the field (never
TypeError, KeyError and the like). Once `read` returns, the loader can index the header without further checks.
"""
import json
import struct
import zlib
from dataclasses import dataclass, field

from . import codecs, factors, packing
from .packing import unshuffle
from .dtypes import DTYPES, FLOAT_CODES, FP8_CODES, itemsize
from .errors import FormatError
from .quant import matrix_shape, n_groups, numel

MAGIC = b"SQZ\x00"
VERSION = (1, 4)          # the newest this reader reads; write() puts the lowest that describes the file
PREAMBLE = struct.Struct("<4sBBBBIII")   # magic, major, minor, header codec id, reserved, size, raw size, crc
MAX_HEADER_RAW = 16 << 20
MAX_SECTION_RAW = (1 << 32) - 1
MAX_NUMEL = 1 << 40
MAX_DIMS = 8
# This reader's bound on the bytes of all decoded sections together, and on those of the tensors it returns: the spec
# bounds one section, and a header of many sections (or dense int2 codes widened to f64) could otherwise make a
# small file claim terabytes. 1 GiB is a 250M-parameter fp32 model, far beyond what fits a 16 MB artifact; the
# rans reader needs ~7 bytes of memory per declared byte. load(..., max_decoded_bytes=N) reads larger artifacts.
MAX_DECODED = 1 << 30
MAX_INT_DIGITS = 20          # no valid header integer is longer; Python would parse thousands of digits, slowly
ROLES = ("embedding", "attention", "mlp", "control", "other")
SHUFFLE_WIDTHS = (1, 2, 4, 8)
PACKS = ("byte", "dense")
SCALE_DTYPES = ("f16", "bf16", "f32")
STORAGE_FORMS = ("alias", "data", "q", "stack")
PART_KINDS = ("data", "codes", "scales", "lowrank")
PARTS_OF_FORM = {"alias": (), "data": ("data",), "q": ("codes", "scales", "lowrank"), "stack": ()}
LOWRANK_KEYS = ("rank", "ldtype")  # in "q", present exactly when the tensor has a "lowrank" part (1.2)
QUANTIZED_FACTOR_KEYS = ("lbits", "lgroup", "lsdtype")  # in "q", present exactly when "ldtype" is "i8" (1.4)
MAX_RANK = 256  # reconstruction costs rank·R·C operations: the bound keeps a hostile file from costing hours


def crc32(data: bytes) -> int:
    return zlib.crc32(data) & 0xFFFFFFFF


def write(header: dict, stored_sections: list, header_codec: str, params) -> bytes:
    """Preamble + coded header + sections. `header` must already hold each section's size, raw size and crc."""
    raw_header = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    stored_header = codecs.encode(header_codec, raw_header, params)
    preamble = PREAMBLE.pack(MAGIC, VERSION[0], minor_version_of(header), codecs.get(header_codec).ID, 0,
                             len(stored_header), len(raw_header), crc32(stored_header))
    return b"".join([preamble, stored_header, *stored_sections])


def minor_version_of(header: dict) -> int:
    """The lowest minor version whose features the header uses (see `feature_of`). Writing the lowest keeps every
    file that needs no newer feature readable by older readers (and by tiny decoders emitted then)."""
    tensors = header.get("tensors") if isinstance(header, dict) else None  # write() serialises any header (fuzzer)
    if not isinstance(tensors, list):
        return 1
    return max([1] + [feature_of(t)[0] for t in tensors if isinstance(t, dict)])


def feature_of(t: dict) -> tuple[int, str]:
    """(the minor version a tensor object needs, the feature that needs it)."""
    if isinstance(t.get("q"), dict) and t["q"].get("ldtype") == "i8":
        return 4, "quantized low-rank factors"
    if "stack" in t:
        return 3, "a stack of matrix slices"
    fp8 = fp8_code_of(t)
    if fp8:
        return 3, f"the fp8 dtype code {fp8}"
    if "lowrank" in t:
        return 2, "a low-rank correction"
    return 1, ""


def fp8_code_of(t: dict):
    """The first fp8 dtype code (format 1.3) a tensor object uses as dtype, store, sdtype or ldtype, else None."""
    q = t.get("q")
    codes = [t.get("dtype"), t.get("store")] + ([q.get("sdtype"), q.get("ldtype")] if isinstance(q, dict) else [])
    return next((c for c in codes if isinstance(c, str) and c in FP8_CODES), None)


@dataclass
class Artifact:
    """A parsed, checked artifact. Sections are decoded lazily (and each checked) by `section(i)`."""
    blob: bytes
    header: dict
    header_codec: str
    header_size: int
    data_start: int
    offsets: list
    layouts: list             # per section: [(rows, cols), ...] of its parts (docs/FORMAT.md, "The section layout")
    source: str = "artifact"
    minor: int = VERSION[1]   # the minor version the preamble declares
    _decoded: dict = field(default_factory=dict)

    @property
    def sections(self) -> list:
        return self.header["sections"]

    @property
    def tensors(self) -> list:
        return self.header["tensors"]

    def section(self, i: int) -> bytes:
        if i not in self._decoded:
            s = self.sections[i]
            what = f"{self.source}: section {i} ({s['name']})"
            stored = self.blob[self.offsets[i]: self.offsets[i] + s["size"]]
            if crc32(stored) != s["crc"]:
                raise FormatError(f"{what}: checksum mismatch (the file is damaged)")
            raw = codecs.decode(s["codec"], stored, s["raw"], what, self.layouts[i])
            self._decoded[i] = unshuffle(raw, s["shuffle"])
        return self._decoded[i]

    def check_crcs(self):
        """Check every section's CRC without decoding it (what inspect does)."""
        for i, s in enumerate(self.sections):
            if crc32(self.blob[self.offsets[i]: self.offsets[i] + s["size"]]) != s["crc"]:
                raise FormatError(f"{self.source}: section {i} ({s['name']}): checksum mismatch (the file is damaged)")

    def part(self, ref) -> bytes:
        i, off, n = ref
        return self.section(i)[off: off + n]


def read(blob: bytes, source: str = "artifact", max_decoded_bytes: int = MAX_DECODED) -> Artifact:
    """Parse and check the preamble and header; FormatError naming what is wrong. Sections are decoded later."""
    blob = bytes(blob)
    header_codec, minor, h_size, h_raw, h_crc = _read_preamble(blob, source)
    data_start = PREAMBLE.size + h_size
    if data_start > len(blob):
        raise FormatError(f"{source}: header: truncated ({len(blob) - PREAMBLE.size} of {h_size} bytes)")
    stored = blob[PREAMBLE.size:data_start]
    if crc32(stored) != h_crc:
        raise FormatError(f"{source}: header: checksum mismatch (the file is damaged)")
    header = _parse_header(codecs.decode(header_codec, stored, h_raw, f"{source}: header"), source)
    _check_top_level(header, source)
    offsets = _check_sections(header["sections"], len(blob), data_start, source, max_decoded_bytes)
    layouts = _check_tensors(header, source, max_decoded_bytes)
    if minor < minor_version_of(header):
        t = max(header["tensors"], key=lambda t: feature_of(t)[0])
        needs, feature = feature_of(t)
        raise FormatError(f"{source}: tensor {t['name']}: {feature} is a format 1.{needs} feature, the file "
                          f"declares 1.{minor}")
    return Artifact(blob=blob, header=header, header_codec=header_codec, header_size=h_size, data_start=data_start,
                    offsets=offsets, layouts=layouts, source=source, minor=minor)


def _read_preamble(blob: bytes, source: str) -> tuple[str, int, int, int, int]:
    """(header codec name, minor version, header size, header raw size, header crc) from a checked preamble."""
    if len(blob) < PREAMBLE.size:
        raise FormatError(f"{source}: too short to be a squeeze artifact ({len(blob)} bytes)")
    magic, major, minor, codec_id, reserved, h_size, h_raw, h_crc = PREAMBLE.unpack_from(blob)
    if magic != MAGIC:
        raise FormatError(f"{source}: not a squeeze artifact (bad magic {magic!r})")
    if major != VERSION[0]:
        raise FormatError(f"{source}: unsupported format version {major}.{minor} (this reader reads {VERSION[0]}.x)")
    if reserved:
        raise FormatError(f"{source}: preamble: reserved byte is {reserved}, must be 0")
    if codec_id not in codecs.BY_ID:
        raise FormatError(f"{source}: header: unknown codec id {codec_id}")
    codec = codecs.BY_ID[codec_id].NAME
    if codecs.uses_layout(codec):
        raise FormatError(f"{source}: header: codec {codec} (id {codec_id}) codes sections only, never the header")
    if h_raw > MAX_HEADER_RAW:
        raise FormatError(f"{source}: header: declared size {h_raw} exceeds {MAX_HEADER_RAW}")
    return codec, minor, h_size, h_raw, h_crc


def _parse_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise ValueError(f"an integer of {len(text.lstrip('-'))} digits")
    return int(text)


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def _parse_header(raw: bytes, source: str):
    try:
        return json.loads(raw.decode("utf-8"), parse_int=_parse_int, parse_constant=_refuse_constant)
    except UnicodeDecodeError as e:
        raise FormatError(f"{source}: header: not valid UTF-8 ({e.reason} at byte {e.start})") from None
    except RecursionError:
        raise FormatError(f"{source}: header: not valid JSON (nested too deeply)") from None
    except ValueError as e:  # json.JSONDecodeError, and the refusals above
        raise FormatError(f"{source}: header: not valid JSON ({e})") from None


# ---------------------------------------------------------------------------------------------------------------
# Field checks. A hostile header can hold any JSON value anywhere: lists where ints belong, megabyte strings,
# unhashable values where a name is looked up. Each check tests the type first, then the range.

def _is_int(v, lo=0, hi=None) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= lo and (hi is None or v <= hi)


def _is_name(v) -> bool:
    """A non-empty printable string: names appear in one-line error messages (no newlines, no lone surrogates)."""
    return isinstance(v, str) and v != "" and v.isprintable()


def _is_utf8(v) -> bool:
    try:
        v.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _show(value) -> str:
    """A value for an error message: its repr, cut short (one field of a hostile header can hold megabytes)."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _bad_field(what: str, obj: dict, key: str, expected: str) -> FormatError:
    found = f"got {_show(obj[key])}" if key in obj else "missing"
    return FormatError(f"{what}: '{key}' must be {expected}, {found}")


def _require_choice(what: str, obj: dict, key: str, choices) -> str:
    value = obj.get(key)
    if not (isinstance(value, str) and value in choices):
        raise _bad_field(what, obj, key, f"one of {', '.join(choices)}")
    return value


# ---------------------------------------------------------------------------------------------------------------
# Header structure

def _check_top_level(header, source: str):
    what = f"{source}: header"
    if not isinstance(header, dict):
        raise FormatError(f"{what}: expected a JSON object, got {_show(header)}")
    for key in ("sections", "tensors"):
        if not isinstance(header.get(key), list):
            raise _bad_field(what, header, key, "a list")
    meta = header.get("meta", {})
    if not (isinstance(meta, dict) and all(isinstance(v, str) and _is_utf8(v) and _is_utf8(k)
                                           for k, v in meta.items())):
        raise _bad_field(what, header, "meta", "an object of strings")


def _check_sections(sections: list, file_size: int, data_start: int, source: str, max_decoded: int) -> list:
    """Each section's fields, their total decoded size, and the file's length; returns each section's offset."""
    offsets, pos, decoded = [], data_start, 0
    for i, s in enumerate(sections):
        what = f"{source}: section {i}"
        if not isinstance(s, dict):
            raise FormatError(f"{what}: expected an object, got {_show(s)}")
        if not _is_name(s.get("name")):
            raise _bad_field(what, s, "name", "a non-empty printable string")
        what += f" ({s['name']})"
        _check_section_fields(s, what)
        decoded += s["raw"]
        if decoded > max_decoded:
            raise FormatError(f"{what}: sections decode to more than {max_decoded:,} bytes in all, this reader's "
                              f"bound (load(..., max_decoded_bytes=N) reads larger artifacts)")
        offsets.append(pos)
        pos += s["size"]
        if pos > file_size:
            raise FormatError(f"{what}: truncated (file ends {pos - file_size} bytes early)")
    if pos != file_size:
        raise FormatError(f"{source}: {file_size - pos} unexpected bytes after the last section")
    return offsets


def _check_section_fields(s: dict, what: str):
    codec = s.get("codec")
    if not isinstance(codec, str):
        raise _bad_field(what, s, "codec", f"a codec name ({', '.join(codecs.NAMES)})")
    if codec not in codecs.BY_NAME:
        raise FormatError(f"{what}: unknown codec {_show(codec)}")
    if not _is_int(s.get("size")):
        raise _bad_field(what, s, "size", "an integer >= 0")
    if not _is_int(s.get("raw"), 0, MAX_SECTION_RAW):
        raise _bad_field(what, s, "raw", f"an integer in 0..{MAX_SECTION_RAW}")
    if not _is_int(s.get("crc"), 0, 0xFFFFFFFF):
        raise _bad_field(what, s, "crc", "an integer in 0..4294967295")
    if not (_is_int(s.get("shuffle")) and s["shuffle"] in SHUFFLE_WIDTHS):
        raise _bad_field(what, s, "shuffle", "one of 1, 2, 4, 8")
    if s["raw"] % s["shuffle"]:
        raise FormatError(f"{what}: 'raw' {s['raw']} is not a multiple of the shuffle width {s['shuffle']}")


def expected_part_sizes(t: dict) -> dict:
    """Byte length each part of a tensor must have, from its shape and scheme."""
    n = numel(t["shape"])
    if "q" in t:
        rows, cols = matrix_shape(t["shape"])
        q = t["q"]
        sizes = {"codes": packing.packed_size(n, q["bits"], q["pack"]),
                 "scales": rows * n_groups(cols, q["group"]) * itemsize(q["sdtype"])}
        if "rank" in q:
            sizes["lowrank"] = factors.part_size(q, rows, cols)
        return sizes
    if "data" in t:
        return {"data": n * itemsize(t["store"])}
    return {}


def part_matrix(kind: str, shape, pack: str | None, length: int) -> tuple[int, int]:
    """How a layout-aware codec sees one part: the [R, C] matrix of a byte-per-code `codes` part, else one row."""
    if kind == "codes" and pack == "byte":
        return matrix_shape(shape)
    return 1, length


def _check_tensors(header: dict, source: str, max_decoded: int) -> list:
    """Check every tensor entry and the tiling of sections; return each section's layout."""
    entries = {}  # name -> tensor object
    stacked = {}  # slice name -> the stack it belongs to
    tiles = {}    # section index -> [(offset, length, "kind of name", matrix)]
    for i, t in enumerate(header["tensors"]):
        what = _check_common_fields(t, i, entries, source)
        entries[t["name"]] = t
        if "alias" in t:
            _check_alias_fields(t, what)
            continue
        if "stack" in t:
            _check_stack(t, entries, stacked, what)
            continue
        for kind, ref, matrix in _check_storage(t, what, len(header["sections"])):
            tiles.setdefault(ref[0], []).append((ref[1], ref[2], f"{kind} of {t['name']}", matrix))
    _check_alias_targets(entries, stacked, source)
    _check_output_size(entries.values(), source, max_decoded)
    return _section_layouts(header["sections"], tiles, source)


def _check_common_fields(t, i: int, entries: dict, source: str) -> str:
    """Name, shape, dtype and role of one tensor entry; returns how errors name it."""
    if not isinstance(t, dict):
        raise FormatError(f"{source}: header: tensor {i}: expected an object, got {_show(t)}")
    if not _is_name(t.get("name")):
        raise _bad_field(f"{source}: header: tensor {i}", t, "name", "a non-empty printable string")
    what = f"{source}: tensor {t['name']}"
    if t["name"] in entries:
        raise FormatError(f"{what}: duplicate name")
    shape = t.get("shape")
    if not (isinstance(shape, list) and len(shape) <= MAX_DIMS and all(_is_int(s, 0, MAX_NUMEL) for s in shape)):
        raise FormatError(f"{what}: invalid shape {_show(shape)}: must be a list of at most {MAX_DIMS} integers "
                          f"in 0..{MAX_NUMEL}")
    if numel(shape) >= MAX_NUMEL:
        raise FormatError(f"{what}: shape {shape} has too many elements (at most {MAX_NUMEL - 1})")
    _require_choice(what, t, "dtype", tuple(DTYPES))
    _require_choice(what, t, "role", ROLES)
    forms = [key for key in STORAGE_FORMS if key in t]
    if len(forms) != 1:
        found = " and ".join(map(repr, forms)) or "none of alias, data, q, stack"
        raise FormatError(f"{what}: has {found}: exactly one "
                          f"storage form is allowed")
    stray = [k for k in PART_KINDS if k in t and k not in PARTS_OF_FORM[forms[0]]]
    if stray:  # inspect and the tiny decoder's rans layout read every part key they find
        raise FormatError(f"{what}: '{stray[0]}' is no part of a tensor stored as {forms[0]!r}")
    return what


def _check_alias_fields(t: dict, what: str):
    if not _is_name(t["alias"]):
        raise _bad_field(what, t, "alias", "the name of a stored tensor")
    if not _is_int(t.get("t"), 0, 1):
        raise _bad_field(what, t, "t", "0 or 1")
    if t["t"] and len(t["shape"]) != 2:
        raise FormatError(f"{what}: a transposed alias must be 2-D, its shape is {t['shape']}")


def _check_stack(t: dict, entries: dict, stacked: dict, what: str):
    """A stack names prod(shape[:-2]) earlier stored tensors of shape shape[-2:] and its dtype, each in no other
    stack (docs/FORMAT.md, storage form 4)."""
    slices, shape = t["stack"], t["shape"]
    if len(shape) < 3:
        raise FormatError(f"{what}: a stack must have at least 3 dims, its shape is {shape}")
    n = numel(shape[:-2])
    if not (isinstance(slices, list) and len(slices) == n and all(_is_name(s) for s in slices)):
        raise FormatError(f"{what}: invalid stack {_show(slices)}: must be a list of the names of its {n} slices")
    for name in slices:
        s = entries.get(name)
        if s is None:
            raise FormatError(f"{what}: slice {name!r} is not a tensor written before the stack")
        if "data" not in s and "q" not in s:
            raise FormatError(f"{what}: slice {name!r} must be stored as-is, cast or quantized, not as an "
                              f"{'alias' if 'alias' in s else 'stack'}")
        if s["shape"] != shape[-2:] or s["dtype"] != t["dtype"]:
            raise FormatError(f"{what}: slice {name!r} is {s['shape']} {s['dtype']}, the stack needs "
                              f"{shape[-2:]} {t['dtype']}")
        if name in stacked:
            raise FormatError(f"{what}: slice {name!r} is also a slice of {stacked[name]!r}")
        stacked[name] = t["name"]


def _check_alias_targets(entries: dict, stacked: dict, source: str):
    """An alias names a stored tensor or a stack (not a stack's slice) and has its dtype and shape (reversed when
    transposed)."""
    for name, t in entries.items():
        if "alias" not in t:
            continue
        what, target_name = f"{source}: tensor {name}", t["alias"]
        target = entries.get(target_name)
        if target_name == name:
            raise FormatError(f"{what}: an alias of itself")
        if target is None:
            raise FormatError(f"{what}: alias target {target_name!r} does not exist")
        if "alias" in target:
            raise FormatError(f"{what}: alias target {target_name!r} is itself an alias")
        if target_name in stacked:
            raise FormatError(f"{what}: alias target {target_name!r} is a slice of {stacked[target_name]!r}")
        shape = target["shape"][::-1] if t["t"] else target["shape"]
        if t["shape"] != shape or t["dtype"] != target["dtype"]:
            raise FormatError(f"{what}: shape {t['shape']} and dtype {t['dtype']} differ from its alias target "
                              f"{target_name!r}{' transposed' if t['t'] else ''} ({shape}, {target['dtype']})")


def _check_storage(t: dict, what: str, n_sections: int) -> list:
    """[(kind, part, matrix)] of a stored tensor, after checking its scheme and its parts' references."""
    if "q" in t:
        _check_quant_fields(t, what)
        kinds = ("codes", "scales", "lowrank") if "lowrank" in t else ("codes", "scales")
    else:
        _check_store_field(t, what)
        kinds = ("data",)
    sizes = expected_part_sizes(t)
    parts = []
    for kind in kinds:
        ref = _check_part_reference(t, kind, sizes[kind], what, n_sections)
        pack = t["q"]["pack"] if kind == "codes" else None
        parts.append((kind, ref, part_matrix(kind, t["shape"], pack, ref[2])))
    return parts


def _check_quant_fields(t: dict, what: str):
    what = f"{what}: invalid quantization scheme"
    q = t["q"]
    if not isinstance(q, dict):
        raise _bad_field(what, t, "q", "an object")
    if not _is_int(q.get("bits"), 2, 8):
        raise _bad_field(what, q, "bits", "an integer in 2..8")
    if not _is_int(q.get("group")):
        raise _bad_field(what, q, "group", "an integer >= 0")
    _require_choice(what, q, "pack", PACKS)
    _require_choice(what, q, "sdtype", SCALE_DTYPES)
    if not (isinstance(q.get("clip"), str) and _is_utf8(q["clip"])):
        raise _bad_field(what, q, "clip", "a string")
    if "method" in q and not (isinstance(q["method"], str) and _is_utf8(q["method"])):
        raise _bad_field(what, q, "method", "a string")
    if t["dtype"] not in FLOAT_CODES:
        raise FormatError(f"{what}: a {t['dtype']} tensor cannot be quantized (dtype must be one of "
                          f"{', '.join(FLOAT_CODES)})")
    _check_lowrank_fields(t, q, what)


def _check_lowrank_fields(t: dict, q: dict, what: str):
    """rank, ldtype and the lowrank part come together; 1 <= rank <= min(R, C, MAX_RANK)."""
    present = [k in q for k in LOWRANK_KEYS] + ["lowrank" in t]
    if any(present) and not all(present):
        raise FormatError(f"{what}: a low-rank correction needs 'rank' and 'ldtype' in q and a 'lowrank' part, "
                          f"all three or none")
    if not any(present):
        return
    rows, cols = matrix_shape(t["shape"])
    top = max(1, min(rows, cols, MAX_RANK))
    if not _is_int(q["rank"], 1, top):
        raise _bad_field(what, q, "rank", f"an integer in 1..{top} (at most the smaller side and {MAX_RANK})")
    _require_choice(what, q, "ldtype", SCALE_DTYPES + ("i8",))
    quantized = [k in q for k in QUANTIZED_FACTOR_KEYS]
    if q["ldtype"] != "i8":
        if any(quantized):
            raise FormatError(f"{what}: 'lbits', 'lgroup' and 'lsdtype' belong to quantized factors (ldtype \"i8\")")
        return
    if not all(quantized):
        raise FormatError(f"{what}: quantized low-rank factors (ldtype \"i8\") need 'lbits', 'lgroup' and 'lsdtype'")
    bits = q["lbits"]
    if not (isinstance(bits, list) and len(bits) == 2 and all(_is_int(b, 2, 8) for b in bits)):
        raise _bad_field(what, q, "lbits", "a list of two integers in 2..8")
    if not _is_int(q["lgroup"]):
        raise _bad_field(what, q, "lgroup", "an integer >= 0")
    _require_choice(what, q, "lsdtype", SCALE_DTYPES)


def _check_store_field(t: dict, what: str):
    store, dtype = _require_choice(what, t, "store", tuple(DTYPES)), t["dtype"]
    if dtype in FLOAT_CODES and store not in FLOAT_CODES:
        raise FormatError(f"{what}: 'store' {store} cannot hold a {dtype} tensor (one of {', '.join(FLOAT_CODES)})")
    if dtype not in FLOAT_CODES and store != dtype:
        raise FormatError(f"{what}: 'store' must equal its dtype {dtype} for an integer or bool tensor, got {store}")


def _check_part_reference(t: dict, kind: str, size: int, what: str, n_sections: int) -> list:
    ref = t.get(kind)
    if not (isinstance(ref, list) and len(ref) == 3 and all(_is_int(v) for v in ref)):
        raise FormatError(f"{what}: invalid {kind} reference {_show(ref)}: must be [section, offset, length] "
                          f"of integers >= 0")
    if ref[0] >= n_sections:
        raise FormatError(f"{what}: invalid {kind} reference {ref}: there is no section {ref[0]} "
                          f"({n_sections} sections)")
    if ref[2] != size:
        raise FormatError(f"{what}: {kind} is {ref[2]} bytes, its shape and scheme imply {size}")
    return ref


def _check_output_size(entries, source: str, max_decoded: int):
    """The tensors load() returns fit the bound: a stored tensor or a transposed alias (a copy) costs its bytes."""
    total = sum(numel(t["shape"]) * itemsize(t["dtype"]) for t in entries if "alias" not in t or t["t"])
    if total > max_decoded:
        raise FormatError(f"{source}: tensors decode to {total:,} bytes, more than {max_decoded:,}, this reader's "
                          f"bound (load(..., max_decoded_bytes=N) reads larger artifacts)")


def _section_layouts(sections: list, tiles: dict, source: str) -> list:
    """Check that each section's parts tile it exactly; return each section's layout (docs/FORMAT.md)."""
    layouts = []
    for i, s in enumerate(sections):
        what = f"{source}: section {i} ({s['name']})"
        pos, layout = 0, []
        for off, n, part, matrix in sorted(tiles.get(i, [])):
            if off + n > s["raw"]:
                raise FormatError(f"{what}: {part} (bytes {off}..{off + n}) lies outside its {s['raw']} decoded "
                                  f"bytes")
            if off != pos:
                gap = "leave a hole" if off > pos else "overlap"
                raise FormatError(f"{what}: parts {gap} at {part} (offset {off}, the part before ends at {pos})")
            pos += n
            layout.append(matrix)
        if pos != s["raw"]:
            raise FormatError(f"{what}: parts cover {pos} of {s['raw']} bytes")
        layouts.append(layout if s["shuffle"] == 1 else [(1, s["raw"])])
    return layouts
