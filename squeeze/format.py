"""The artifact container, version 1 (docs/FORMAT.md is normative). The only code that knows its byte layout."""
import json
import struct
import zlib
from dataclasses import dataclass, field

from . import codecs, packing
from .packing import unshuffle
from .dtypes import DTYPES, itemsize
from .errors import FormatError
from .quant import matrix_shape, n_groups

MAGIC = b"SQZ\x00"
VERSION = (1, 1)
PREAMBLE = struct.Struct("<4sBBBBIII")   # magic, major, minor, header codec id, reserved, size, raw size, crc
MAX_HEADER_RAW = 16 << 20
MAX_SECTION_RAW = (1 << 32) - 1
MAX_NUMEL = 1 << 40
ROLES = ("embedding", "attention", "mlp", "control", "other")


def crc32(data: bytes) -> int:
    return zlib.crc32(data) & 0xFFFFFFFF


def write(header: dict, stored_sections: list, header_codec: str, params) -> bytes:
    """Preamble + coded header + sections. `header` must already hold each section's size, raw size and crc."""
    raw_header = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    stored_header = codecs.encode(header_codec, raw_header, params)
    preamble = PREAMBLE.pack(MAGIC, VERSION[0], VERSION[1], codecs.get(header_codec).ID, 0,
                             len(stored_header), len(raw_header), crc32(stored_header))
    return b"".join([preamble, stored_header, *stored_sections])


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


def read(blob: bytes, source: str = "artifact") -> Artifact:
    """Parse and check the preamble and header; FormatError naming what is wrong."""
    blob = bytes(blob)
    if len(blob) < PREAMBLE.size:
        raise FormatError(f"{source}: too short to be a squeeze artifact ({len(blob)} bytes)")
    magic, major, minor, codec_id, _, h_size, h_raw, h_crc = PREAMBLE.unpack_from(blob)
    if magic != MAGIC:
        raise FormatError(f"{source}: not a squeeze artifact (bad magic {magic!r})")
    if major != VERSION[0]:
        raise FormatError(f"{source}: unsupported format version {major}.{minor} (this reader reads {VERSION[0]}.x)")
    if codec_id not in codecs.BY_ID:
        raise FormatError(f"{source}: header: unknown codec id {codec_id}")
    if h_raw > MAX_HEADER_RAW:
        raise FormatError(f"{source}: header: declared size {h_raw} exceeds {MAX_HEADER_RAW}")
    data_start = PREAMBLE.size + h_size
    if data_start > len(blob):
        raise FormatError(f"{source}: header: truncated ({len(blob) - PREAMBLE.size} of {h_size} bytes)")
    stored = blob[PREAMBLE.size:data_start]
    if crc32(stored) != h_crc:
        raise FormatError(f"{source}: header: checksum mismatch (the file is damaged)")
    codec = codecs.BY_ID[codec_id].NAME
    raw = codecs.decode(codec, stored, h_raw, f"{source}: header")
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FormatError(f"{source}: header: not valid JSON ({e})") from None
    offsets = _check_sections(header, len(blob), data_start, source)
    layouts = _check_tensors(header, source)
    return Artifact(blob=blob, header=header, header_codec=codec, header_size=h_size, data_start=data_start,
                    offsets=offsets, layouts=layouts, source=source)


def _is_int(v, lo=0, hi=None) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= lo and (hi is None or v <= hi)


def _check_sections(header, file_size: int, data_start: int, source: str) -> list:
    if not isinstance(header, dict) or not isinstance(header.get("sections"), list) \
            or not isinstance(header.get("tensors"), list):
        raise FormatError(f"{source}: header: expected an object with 'sections' and 'tensors' lists")
    offsets, pos = [], data_start
    for i, s in enumerate(header["sections"]):
        what = f"{source}: section {i}"
        if not isinstance(s, dict):
            raise FormatError(f"{what}: not an object")
        what += f" ({s.get('name')})"
        if s.get("codec") not in codecs.BY_NAME:
            raise FormatError(f"{what}: unknown codec {s.get('codec')!r}")
        if not (_is_int(s.get("size")) and _is_int(s.get("raw"), 0, MAX_SECTION_RAW) and _is_int(s.get("crc"))):
            raise FormatError(f"{what}: size, raw and crc must be integers in range")
        if s.get("shuffle") not in (1, 2, 4, 8) or s["raw"] % s["shuffle"]:
            raise FormatError(f"{what}: invalid shuffle width {s.get('shuffle')!r}")
        offsets.append(pos)
        pos += s["size"]
        if pos > file_size:
            raise FormatError(f"{what}: truncated (file ends {pos - file_size} bytes early)")
    if pos != file_size:
        raise FormatError(f"{source}: {file_size - pos} unexpected bytes after the last section")
    return offsets


def expected_part_sizes(t: dict) -> dict:
    """Byte length each part of a tensor must have, from its shape and scheme."""
    numel = 1
    for s in t["shape"]:
        numel *= s
    if "q" in t:
        rows, cols = matrix_shape(t["shape"])
        q = t["q"]
        return {"codes": packing.packed_size(numel, q["bits"], q["pack"]),
                "scales": rows * n_groups(cols, q["group"]) * itemsize(q["sdtype"])}
    if "data" in t:
        return {"data": numel * itemsize(t["store"])}
    return {}


def part_matrix(kind: str, shape, pack: str | None, length: int) -> tuple[int, int]:
    """How a layout-aware codec sees one part: the [R, C] matrix of a byte-per-code `codes` part, else one row."""
    if kind == "codes" and pack == "byte":
        return matrix_shape(shape)
    return 1, length


def _check_tensors(header: dict, source: str) -> list:
    """Check every tensor entry and the tiling of sections; return each section's layout."""
    names, stored, tiles = set(), set(), {}
    n_sections = len(header["sections"])
    for t in header["tensors"]:
        if not isinstance(t, dict) or not isinstance(t.get("name"), str) or not t["name"]:
            raise FormatError(f"{source}: header: a tensor entry has no name")
        what = f"{source}: tensor {t['name']}"
        if t["name"] in names:
            raise FormatError(f"{what}: duplicate name")
        names.add(t["name"])
        shape = t.get("shape")
        if not isinstance(shape, list) or len(shape) > 8 or not all(_is_int(s, 0, MAX_NUMEL) for s in shape):
            raise FormatError(f"{what}: invalid shape {shape!r}")
        numel = 1
        for s in shape:
            numel *= s
        if numel >= MAX_NUMEL:
            raise FormatError(f"{what}: shape {shape} has too many elements")
        if t.get("dtype") not in DTYPES or t.get("role") not in ROLES:
            raise FormatError(f"{what}: invalid dtype or role")
        if "alias" in t:
            if t.get("t") not in (0, 1) or (t["t"] and len(shape) != 2):
                raise FormatError(f"{what}: invalid alias transpose flag")
            continue
        stored.add(t["name"])
        if "q" in t:
            q = t["q"]
            if not isinstance(q, dict) or not _is_int(q.get("bits"), 2, 8) or not _is_int(q.get("group"), 0) \
                    or q.get("pack") not in ("byte", "dense") or q.get("sdtype") not in ("f16", "bf16", "f32") \
                    or t["dtype"] not in ("f32", "f16", "bf16", "f64"):
                raise FormatError(f"{what}: invalid quantization scheme")
            kinds = ("codes", "scales")
        elif "data" in t:
            if t.get("store") not in DTYPES:
                raise FormatError(f"{what}: invalid store dtype {t.get('store')!r}")
            kinds = ("data",)
        else:
            raise FormatError(f"{what}: neither alias, data nor quantized")
        sizes = expected_part_sizes(t)
        for kind in kinds:
            ref = t.get(kind)
            if not (isinstance(ref, list) and len(ref) == 3 and all(_is_int(v) for v in ref)) \
                    or ref[0] >= n_sections:
                raise FormatError(f"{what}: invalid {kind} reference {ref!r}")
            if ref[2] != sizes[kind]:
                raise FormatError(f"{what}: {kind} is {ref[2]} bytes, its shape and scheme imply {sizes[kind]}")
            pack = t["q"]["pack"] if kind == "codes" else None
            tiles.setdefault(ref[0], []).append((ref[1], ref[2], t["name"],
                                                 part_matrix(kind, shape, pack, ref[2])))
    for t in header["tensors"]:
        if "alias" in t and t["alias"] not in stored:
            raise FormatError(f"{source}: tensor {t['name']}: alias target {t['alias']!r} is not a stored tensor")
    layouts = []
    for i, s in enumerate(header["sections"]):
        pos, layout = 0, []
        for off, n, name, matrix in sorted(tiles.get(i, [])):
            if off != pos:
                raise FormatError(f"{source}: section {i} ({s['name']}): parts leave a hole or overlap at {name}")
            pos += n
            layout.append(matrix)
        if pos != s["raw"]:
            raise FormatError(f"{source}: section {i} ({s['name']}): parts cover {pos} of {s['raw']} bytes")
        layouts.append(layout if s["shuffle"] == 1 else [(1, s["raw"])])
    return layouts
