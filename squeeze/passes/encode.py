"""encode: group byte parts into sections and compress each with its codec (or the smallest candidate on "auto").

Parts of one kind and role share a section (all MLP codes together, all fp16 scales together), because a compressor
learns the statistics of a large homogeneous stream better than of many small ones. Sections of 2-, 4- or 8-byte
elements are also tried byte-shuffled (all low bytes, then all high bytes), which suits fp16 scales and floats.
Layout-aware codecs (rans) also get the section's parts as matrices (format.part_matrix), unshuffled only.
"""
import dataclasses
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from .. import codecs
from ..codecs import EncodeParams
from ..format import part_matrix
from ..dtypes import itemsize
from ..packing import shuffle
from ..state import Section, State


@dataclass(frozen=True)
class EncodeConfig:
    group_by: str = "role"                        # role | tensor | all
    candidates: tuple = ("zlib", "zstd", "brotli", "lzma", "rans")
    shuffle: str = "auto"                         # auto | off
    params: EncodeParams = EncodeParams()
    workers: int = 2


def _group_key(e, kind: str, group_by: str) -> tuple[str, int]:
    """(section name, element width) of one part."""
    p = e.plan
    if kind == "codes":
        base, width = "codes", 1
    elif kind == "scales":
        base, width = f"scales.{p.quant.scale_dtype}", itemsize(p.quant.scale_dtype)
    elif kind == "lowrank":  # never with parts of another kind: a 1.1 reader then refuses the file (FORMAT.md)
        base, width = "lowrank.f16", 2
    else:
        base, width = f"{p.scheme}.{p.store}", itemsize(p.store)
    if group_by == "tensor":
        return f"{e.name}.{kind}", width
    if group_by == "role" and kind == "codes":
        return f"{e.role}.codes", width
    return base, width


def _candidates(codec: str, width: int, config: EncodeConfig) -> list[tuple[str, int]]:
    names = list(config.candidates) + ["raw"] if codec == "auto" else [codec]
    widths = [1, width] if (width > 1 and config.shuffle == "auto") else [1]
    return [(n, w) for n in dict.fromkeys(names) for w in widths if w == 1 or not codecs.uses_layout(n)]


def _encode_one(job):
    name, width, raw, layout, config = job
    return codecs.encode(name, shuffle(raw, width), config.params, layout if width == 1 else None)


def _matrix(e, kind: str, data: bytes) -> tuple[int, int]:
    return part_matrix(kind, e.shape, e.plan.pack if kind == "codes" else None, len(data))


def run(state: State, config: EncodeConfig = EncodeConfig()) -> State:
    groups = {}  # (section name, codec) -> [width, [(tensor, kind, bytes)]]
    for e in state.stored_entries():
        for kind, data in e.parts:
            name, width = _group_key(e, kind, config.group_by)
            groups.setdefault((name, e.plan.codec), [width, []])[1].append((e.name, kind, data, _matrix(e, kind, data)))
    names_used = {}
    for name, codec in groups:
        names_used[name] = names_used.get(name, 0) + 1

    jobs, plans = [], []
    for (name, codec), (width, members) in groups.items():
        raw = b"".join(m[2] for m in members)
        layout = [m[3] for m in members]
        options = _candidates(codec, width, config)
        plans.append((name if names_used[name] == 1 else f"{name}@{codec}", raw, members, options, len(jobs)))
        jobs.extend((c, w, raw, layout, config) for c, w in options)
    with ThreadPoolExecutor(max_workers=max(1, config.workers)) as pool:  # codecs release the GIL
        results = list(pool.map(_encode_one, jobs))

    sections = []
    for name, raw, members, options, first in plans:
        # smallest stored size; ties go to the earlier candidate, so the choice is deterministic
        best = min(range(len(options)), key=lambda i: (len(results[first + i]), i))
        codec, width = options[best]
        offset, layout = 0, []
        for tensor, kind, data, _ in members:
            layout.append((tensor, kind, offset, len(data)))
            offset += len(data)
        sections.append(Section(name=name, codec=codec, shuffle=width, raw_size=len(raw),
                                stored=results[first + best], members=tuple(layout)))
    return dataclasses.replace(state, sections=tuple(sections))
