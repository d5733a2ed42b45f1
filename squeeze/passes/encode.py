"""encode: group byte parts into sections and compress each with its codec (or the smallest candidate on "auto").

Parts of one kind and role share a section (all MLP codes together, all fp16 scales together), because a compressor
learns the statistics of a large homogeneous stream better than of many small ones. Sections of 2-, 4- or 8-byte
elements are also tried byte-shuffled (all low bytes, then all high bytes), which suits fp16 scales and floats.
Layout-aware codecs (rans) also get the section's parts as matrices (format.part_matrix), unshuffled only.

Memory: a section is coded from the buffer pack laid its parts out in (no joined copy when the parts are consecutive
views of one buffer); of each section's candidates only the smallest output is kept, as soon as it is known; and
byte compressors on large sections run one at a time (brotli-11 with a 16 MB window holds ~250 MB of match state),
beside the other jobs, so that two of them never add up, and before the other candidates of their section. The
state encode returns has its sections and no parts (pack's buffers are let go with the state pack returned).
"""
import dataclasses
import hashlib
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from .. import codecs, memory
from ..codecs import EncodeParams
from ..format import part_matrix
from ..dtypes import itemsize
from ..factors import QuantizedFactors
from ..packing import joined, shuffle
from ..state import Section, State


@dataclass(frozen=True)
class EncodeConfig:
    group_by: str = "role"                        # role | tensor | all
    candidates: tuple = ("zlib", "zstd", "brotli", "lzma", "rans")
    codes_candidates: tuple | None = None         # on sections of codes; None: `candidates` (recipe.EncodeSettings)
    shuffle: str = "auto"                         # auto | off
    params: EncodeParams = EncodeParams()
    workers: int = 2
    # (digest and length of a section's bytes, codec, shuffle width, params) -> a byte compressor's output on them:
    # a budget compile (squeeze/budget.py) shares one across its rounds, where most scale and float sections come
    # back unchanged. Not part of the config's identity (compare=False): it only saves work.
    memo: dict | None = field(default=None, compare=False, repr=False)

    @staticmethod
    def from_recipe(recipe) -> "EncodeConfig":
        """The recipe's [encode] table."""
        enc = recipe.encode
        return EncodeConfig(group_by=enc.group_by, candidates=enc.candidates, codes_candidates=enc.codes_candidates,
                            shuffle=enc.shuffle, params=enc.params)

    def candidates_for(self, kind: str) -> tuple:
        """The codecs "auto" tries on a section of parts of this kind (codes, scales, lowrank, data)."""
        return self.codes_candidates if kind == "codes" and self.codes_candidates is not None else self.candidates


HEAVY_BYTES = 8 << 20  # byte-compressor jobs on sections at least this large run one at a time


def _group_key(e, kind: str, group_by: str) -> tuple[str, int]:
    """(section name, element width) of one part."""
    p = e.plan
    if kind == "codes":
        base, width = "codes", 1
    elif kind == "scales":
        base, width = f"scales.{p.quant.scale_dtype}", itemsize(p.quant.scale_dtype)
    elif kind == "lowrank":  # never with parts of another kind: a 1.1 reader then refuses the file (FORMAT.md)
        base, width = ("lowrank.q", 1) if isinstance(e.lowrank, QuantizedFactors) else ("lowrank.f16", 2)
    else:
        base, width = f"{p.scheme}.{p.store}", itemsize(p.store)
    if group_by == "tensor":
        return f"{e.name}.{kind}", width
    if group_by == "role" and kind == "codes":
        return f"{e.role}.codes", width
    return base, width


def _candidates(codec: str, width: int, kind: str, config: EncodeConfig) -> list[tuple[str, int]]:
    names = list(config.candidates_for(kind)) + ["raw"] if codec == "auto" else [codec]
    widths = [1, width] if (width > 1 and config.shuffle == "auto") else [1]
    return [(n, w) for n in dict.fromkeys(names) for w in widths if w == 1 or not codecs.uses_layout(n)]


def group_key(e, kind: str, group_by: str) -> tuple[str, str]:
    """(section name, codec) of the section one part goes to (before names shared by two codecs get "@codec")."""
    return _group_key(e, kind, group_by)[0], e.plan.codec


def _encode_one(job):
    name, width, raw, layout, config = job
    return codecs.encode(name, shuffle(raw, width), config.params, layout if width == 1 else None)


def _matrix(e, kind: str, data: bytes) -> tuple[int, int]:
    return part_matrix(kind, e.shape, e.plan.pack if kind == "codes" else None, len(data))


def _heavy(job) -> bool:
    name, _, raw, _, _ = job
    return not codecs.uses_layout(name) and len(raw) >= HEAVY_BYTES


def _memo_key(job) -> tuple | None:
    """Where a job's output is kept in EncodeConfig.memo: byte compressors only (their outputs are what is slow
    to make; rans codes a section in about the time hashing and keeping it would cost in memory)."""
    name, width, raw, _, config = job
    if config.memo is None or codecs.uses_layout(name) or name == "raw":
        return None
    return hashlib.blake2b(raw, digest_size=20).digest(), len(raw), name, width, config.params


def _run_jobs(jobs: list, owner: list, workers: int) -> dict:
    """{plan index: (stored size, option index, stored bytes)}: each section's smallest output, ties to the earlier
    option, whatever order the jobs finish in. The sections with a heavy job have all their jobs run one after
    another on one worker, heavy ones first (so no other output of the section is held while they run); the other
    sections' jobs run beside them."""
    best, lock = {}, threading.Lock()

    def run(i):
        key = _memo_key(jobs[i])
        out = jobs[i][4].memo.get(key) if key is not None else None
        made = out is None
        if made:
            out = _encode_one(jobs[i])
            if key is not None:
                jobs[i][4].memo[key] = out
        plan, option = owner[i]
        with lock:
            if plan not in best or (len(out), option) < best[plan][:2]:
                best[plan] = (len(out), option, out)
        del out
        if made:
            memory.trim()  # what the job freed goes back before the next one allocates its own

    heavy_plans = {owner[i][0] for i, job in enumerate(jobs) if _heavy(job)}
    serial = sorted((i for i in range(len(jobs)) if owner[i][0] in heavy_plans),
                    key=lambda i: (owner[i][0], not _heavy(jobs[i]), i))
    beside = [i for i in range(len(jobs)) if owner[i][0] not in heavy_plans]
    if workers <= 1:
        for i in serial + beside:
            run(i)
        return best
    with ThreadPoolExecutor(max_workers=workers) as pool:  # codecs release the GIL
        futures = [pool.submit(lambda: [run(i) for i in serial])] if serial else []
        futures += [pool.submit(run, i) for i in beside]
        for f in futures:
            f.result()
    return best


def _plans(state: State, config: EncodeConfig) -> tuple[list, list, list]:
    """(plans: (section name, raw size, members, options), jobs, owner: (plan, option) of each job)."""
    groups = {}  # (section name, codec) -> [width, [(tensor, kind, bytes)]]
    for e in state.stored_entries():
        for kind, data in e.parts:
            name, width = _group_key(e, kind, config.group_by)
            groups.setdefault((name, e.plan.codec), [width, []])[1].append((e.name, kind, data, _matrix(e, kind, data)))
    names_used = {}
    for name, codec in groups:
        names_used[name] = names_used.get(name, 0) + 1
    jobs, owner, plans = [], [], []
    for (name, codec), (width, members) in groups.items():
        raw = joined([m[2] for m in members])
        layout = [m[3] for m in members]
        options = _candidates(codec, width, members[0][1], config)  # a section holds parts of one kind
        plans.append((name if names_used[name] == 1 else f"{name}@{codec}", len(raw),
                      [(tensor, kind, len(data)) for tensor, kind, data, _ in members], options))
        owner.extend((len(plans) - 1, i) for i in range(len(options)))
        jobs.extend((c, w, raw, layout, config) for c, w in options)
    return plans, jobs, owner


def run(state: State, config: EncodeConfig = EncodeConfig()) -> State:
    plans, jobs, owner = _plans(state, config)
    memory.trim()  # the earlier passes' freed temporaries, before the codecs' working memory comes on top
    best = _run_jobs(jobs, owner, max(1, config.workers))
    del jobs
    sections = []
    for k, (name, raw_size, members, options) in enumerate(plans):
        _, chosen, stored = best.pop(k)
        codec, width = options[chosen]
        offset, layout = 0, []
        for tensor, kind, n in members:
            layout.append((tensor, kind, offset, n))
            offset += n
        sections.append(Section(name=name, codec=codec, shuffle=width, raw_size=raw_size,
                                stored=stored, members=tuple(layout)))
    # The parts are now the sections (members say where each one went): the state that goes on to the end of the
    # compile keeps no second copy of every code.
    entries = tuple(dataclasses.replace(e, parts=()) if e.parts else e for e in state.entries)
    memory.trim()
    return dataclasses.replace(state, entries=entries, sections=tuple(sections))
