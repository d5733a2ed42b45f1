"""inspect: where every byte of an artifact went, per tensor, role and section. Totals equal the file size exactly.

A section's stored bytes are shared among its parts in proportion to their decoded sizes (largest-remainder rounding,
so the integers add up); in a rans section, the coded bytes in proportion to each part's coded bits and the overhead
(stream header, tables, lane states) in proportion to decoded sizes. The preamble and header have rows of their own.
Beside each quantized tensor stands the order-0 entropy of its codes: the size an ideal coder with one table for the
tensor would reach, so the coded bytes show how far the codec is from it (or, with contexts, below it).

The summary also puts the budget allocator's predicted loss increase (header meta, --budget compiles) beside the
drift `squeeze verify` measured (its report, ARTIFACT.verify.json), when each is known.
"""
import math
from dataclasses import asdict, dataclass, field

import numpy as np

from . import codecs, format, quant
from .codecs import rans
from .errors import SqueezeError
from .loader import read_artifact
from .verify import record


@dataclass
class TensorRow:
    name: str
    role: str
    shape: list
    dtype: str
    scheme: str
    codec: str
    raw_bytes: int          # decoded bytes of its parts
    bytes: int              # its share of the stored file
    bits_per_weight: float
    alias_of: str | None = None
    entropy_bytes: float | None = None  # order-0 entropy of its codes (quantized tensors)
    codes_bytes: int = 0                # its share of its codes section (bytes includes scales too)
    coder_model: str = ""               # how rans modelled its codes ("table 0", "8 column classes", "40 row refs…")
    overhead_bytes: int = 0             # its share of a rans section's tables, lane states and stream header


@dataclass
class Drift:
    """The budget allocator's predicted loss increase beside what `squeeze verify` measured, where each is known.
    The prediction is on the calibration data and the measurement on the validation data, both in nats/token."""
    predicted_loss: float | None = None  # header meta predicted_loss_increase (--budget compiles only)
    measured_loss: float | None = None   # decoded − original val_loss, from the verify report
    measured_bpb: float | None = None    # decoded − original val_bpb
    ratio: float | None = None           # measured_loss / predicted_loss
    tokens: int | None = None            # validation predictions verify scored
    val: str | None = None               # the validation shards' glob
    bytes: str | None = None             # verify's byte counts: "tokenizer LUT" or "sidecar GLOB" (CaseOps)
    report: str | None = None            # the verify report the measured figures come from
    note: str | None = None              # why a verify report was not used (one line)


@dataclass
class Report:
    file_size: int
    preamble_bytes: int
    header_bytes: int
    header_codec: str
    params: int
    bits_per_param: float
    sections: list = field(default_factory=list)
    tensors: list = field(default_factory=list)
    roles: dict = field(default_factory=dict)
    meta: dict = field(default_factory=dict)
    sha256: str = ""
    drift: Drift = field(default_factory=Drift)

    def to_dict(self) -> dict:
        return asdict(self)


def scheme_of(t: dict) -> str:
    if "alias" in t:
        return f"alias{'ᵀ' if t['t'] else ''} of {t['alias']}"
    if "stack" in t:  # FORMAT.md 1.3: its slices, listed above it, hold the bytes
        return f"stack of {len(t['stack'])} slices"
    if "q" in t:
        q = t["q"]
        grain = "row" if q["group"] == 0 else f"g{q['group']}"
        lowrank = f" +r{q['rank']}" if "rank" in q else ""  # the low-rank correction (FORMAT.md 1.2)
        if q.get("ldtype") == "i8":  # its factors quantized (1.4)
            lowrank += f" int{q['lbits'][0]}/int{q['lbits'][1]}"
        method = " gptq" if q.get("method") == "gptq" else ""  # informational: how the codes were chosen
        return f"int{q['bits']}/{grain} {q['clip']} {q['pack']}{lowrank}{method}"
    return t["store"] if t["store"] == t["dtype"] else f"{t['store']}←{t['dtype']}"


def _apportion(total: int, weights: list) -> list:
    """Integers proportional to weights summing exactly to total (largest remainder, ties to the earlier)."""
    wsum = sum(weights)
    if wsum == 0:
        shares = [0] * len(weights)
        if shares:
            shares[0] = total
        return shares
    exact = [total * w / wsum for w in weights]
    shares = [int(x) for x in exact]
    order = sorted(range(len(weights)), key=lambda i: (-(exact[i] - shares[i]), i))
    for i in order[: total - sum(shares)]:
        shares[i] += 1
    return shares


def _entropy_bytes(data: bytes) -> float:
    return rans.entropy_bits(rans.symbol_counts(np.frombuffer(data, dtype=np.uint8))) / 8


def _shares(art: format.Artifact, i: int, parts: list) -> tuple[list, list, list]:
    """(bytes, overhead bytes, rans model) of each part of section i; bytes sum to the section's stored size."""
    s = art.sections[i]
    sizes = [n for _, n, _, _ in parts]
    if s["codec"] != "rans" or s["shuffle"] != 1:
        return _apportion(s["size"], sizes), [0] * len(parts), [""] * len(parts)
    stored = art.blob[art.offsets[i]: art.offsets[i] + s["size"]]
    overhead, bits, models = rans.stream_costs(stored, art.section(i), art.layouts[i])
    extra = _apportion(overhead, sizes)
    coded = _apportion(s["size"] - overhead, [round(b) for b in bits])
    return [a + b for a, b in zip(coded, extra)], extra, models


def predicted_loss_of(meta: dict) -> float | None:
    """The allocator's prediction from the header meta; None when absent (not a --budget compile) or unreadable
    (meta is informational, so a bad value is not worth refusing the artifact for)."""
    try:
        value = float(meta.get("predicted_loss_increase"))
    except (AttributeError, TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def drift_of(meta: dict, sha256: str, verify_report=None) -> Drift:
    """The prediction, and the measurement from `verify_report` (a path) when it is a report of these bytes. A
    report that cannot be used leaves a note instead: inspect still works without it."""
    drift = Drift(predicted_loss=predicted_loss_of(meta))
    if verify_report is None:
        return drift
    try:
        measured = record.read(verify_report)
    except SqueezeError as e:
        drift.note = f"verify report ignored: {e}"
        return drift
    if measured.sha256 != sha256:
        drift.note = f"verify report ignored: {verify_report}: report is for another artifact (sha256 differs)"
        return drift
    drift.measured_loss, drift.measured_bpb = measured.loss_increase, measured.bpb_drift
    drift.tokens, drift.val, drift.report = measured.tokens, measured.val, str(verify_report)
    drift.bytes = measured.bytes
    if drift.predicted_loss:  # a zero prediction has no meaningful ratio
        drift.ratio = drift.measured_loss / drift.predicted_loss
    return drift


def inspect(path_or_bytes, verify_report=None, max_decoded_bytes: int = format.MAX_DECODED) -> Report:
    """Where every byte went; with `verify_report` (the path of a `squeeze verify` report, e.g.
    record.default_path(artifact)), the measured drift too. `max_decoded_bytes`: as for squeeze.load (larger
    artifacts are refused)."""
    art = read_artifact(path_or_bytes, max_decoded_bytes)
    art.check_crcs()
    attributed, raw_of, codecs_of, entropy_of, overhead_of, codes_of, model_of = {}, {}, {}, {}, {}, {}, {}
    members = {}  # section -> [(offset, raw length, tensor, kind)], in offset order like the section layout
    for t in art.tensors:
        for kind in format.PART_KINDS:
            if kind in t:
                members.setdefault(t[kind][0], []).append((t[kind][1], t[kind][2], t["name"], kind))
    sections = []
    for i, s in enumerate(art.sections):
        parts = sorted(members.get(i, []))
        shares, overheads, models = _shares(art, i, parts)
        entropy = 0.0
        for (off, n, name, kind), share, extra, model in zip(parts, shares, overheads, models):
            attributed[name] = attributed.get(name, 0) + share
            raw_of[name] = raw_of.get(name, 0) + n
            overhead_of[name] = overhead_of.get(name, 0) + extra
            codecs_of.setdefault(name, [])
            if s["codec"] not in codecs_of[name]:
                codecs_of[name].append(s["codec"])
            if kind == "codes":
                codes_of[name] = share
                if model:
                    model_of[name] = model
                entropy_of[name] = _entropy_bytes(memoryview(art.section(i))[off: off + n])
                entropy += entropy_of[name]
        art._decoded.pop(i, None)  # format.Artifact's cache: one decoded section at a time, not all of them
        sections.append({"index": i, "name": s["name"], "codec": s["codec"], "shuffle": s["shuffle"],
                         "raw": s["raw"], "size": s["size"],
                         "ratio": round(s["raw"] / s["size"], 3) if s["size"] else 0.0,
                         "entropy_bytes": round(entropy, 1), "overhead_bytes": sum(overheads)})
    tensors, roles, params = [], {}, 0
    for t in art.tensors:
        numel = quant.numel(t["shape"])
        counted = "alias" not in t and "stack" not in t  # a stack's parameters are its slices
        params += numel if counted else 0
        b = attributed.get(t["name"], 0)
        tensors.append(TensorRow(name=t["name"], role=t["role"], shape=t["shape"], dtype=t["dtype"],
                                 scheme=scheme_of(t), codec="+".join(codecs_of.get(t["name"], [])) or "-",
                                 raw_bytes=raw_of.get(t["name"], 0), bytes=b,
                                 bits_per_weight=round(8 * b / numel, 4) if numel and counted else 0.0,
                                 alias_of=t.get("alias"),
                                 entropy_bytes=round(entropy_of[t["name"]], 1) if t["name"] in entropy_of else None,
                                 overhead_bytes=overhead_of.get(t["name"], 0), codes_bytes=codes_of.get(t["name"], 0),
                                 coder_model=model_of.get(t["name"], "")))
        r = roles.setdefault(t["role"], {"tensors": 0, "params": 0, "bytes": 0})
        r["tensors"] += 1
        r["params"] += numel if counted else 0
        r["bytes"] += b
    for r in roles.values():
        r["bits_per_weight"] = round(8 * r["bytes"] / r["params"], 4) if r["params"] else 0.0
    size = len(art.blob)
    meta = art.header.get("meta", {})
    sha256 = record.sha256_of(art.blob)
    return Report(file_size=size, preamble_bytes=format.PREAMBLE.size, header_bytes=art.header_size,
                  header_codec=art.header_codec, params=params,
                  bits_per_param=round(8 * size / params, 4) if params else 0.0,
                  sections=sections, tensors=tensors, roles=roles, meta=meta, sha256=sha256,
                  drift=drift_of(meta, sha256, verify_report))


def render(report: Report) -> str:
    """The human table: one row per tensor, then roles, sections and totals."""
    rows = [("tensor", "role", "shape", "scheme", "codec", "bytes", "bits/w", "H0 bytes", "/H0", "overhead",
             "rans model")]
    for t in report.tensors:
        h0 = t.entropy_bytes
        rows.append((t.name, t.role, "×".join(map(str, t.shape)) or "scalar", t.scheme, t.codec,
                     f"{t.bytes:,}", f"{t.bits_per_weight:.3f}" if t.bits_per_weight or t.bytes else "-",
                     f"{h0:,.0f}" if h0 is not None else "-",
                     f"{t.codes_bytes / h0:.3f}" if h0 else "-",
                     f"{t.overhead_bytes:,}" if t.overhead_bytes else "-", t.coder_model or "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    right = {5, 6, 7, 8, 9}
    lines = ["  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append("")
    lines.append("role        tensors      params        bytes   bits/w")
    for role, r in sorted(report.roles.items()):
        lines.append(f"{role:<10} {r['tensors']:>8} {r['params']:>11,} {r['bytes']:>12,} {r['bits_per_weight']:>8.3f}")
    lines.append("")
    lines.append("section                       codec   shuffle          raw       stored   ratio     H0 bytes  overhead")
    for s in report.sections:
        h0 = f"{s['entropy_bytes']:>12,.0f}" if s["entropy_bytes"] else f"{'-':>12}"
        lines.append(f"{s['name']:<29} {s['codec']:<7} {s['shuffle']:>7} {s['raw']:>12,} {s['size']:>12,} "
                     f"{s['ratio']:>7.3f} {h0} {s['overhead_bytes'] or '-':>9}")
    lines.append("(H0 bytes: order-0 entropy of a tensor's codes; /H0: its coded codes bytes over that; overhead: "
                 "rans tables, lane states, stream header)")
    lines.append("")
    body = sum(s["size"] for s in report.sections)
    lines.append(f"preamble {report.preamble_bytes:,} B + header {report.header_bytes:,} B ({report.header_codec}) "
                 f"+ sections {body:,} B = {report.file_size:,} B")
    lines.append(f"{report.params:,} parameters, {report.bits_per_param:.4f} bits/param overall; "
                 f"recipe {report.meta.get('recipe', '?')}, {report.meta.get('producer', '?')}")
    lines.extend(render_drift(report.drift))
    return "\n".join(lines)


def render_drift(d: Drift) -> list:
    """Summary lines: predicted and measured loss increase, or nothing when neither is known."""
    lines = []
    if d.predicted_loss is not None:
        lines.append(f"predicted loss increase {d.predicted_loss:+.4g} nats/token (budget allocator, on calibration "
                     f"data)")
    if d.measured_loss is not None:
        ratio = f"; measured/predicted {d.ratio:.2f}" if d.ratio is not None else ""
        lines.append(f"measured loss increase  {d.measured_loss:+.6f} nats/token, val_bpb {d.measured_bpb:+.6f}{ratio}")
        sidecar = f", bytes: {d.bytes}" if d.bytes and d.bytes != "tokenizer LUT" else ""  # the LUT goes unsaid
        lines.append(f"  (squeeze verify on {d.tokens:,} tokens of {d.val}{sidecar}: {d.report})")
    elif d.predicted_loss is not None and d.note is None:
        lines.append("measured loss increase  - (no verify report: run squeeze verify on this artifact)")
    if d.note:
        lines.append(d.note)
    return lines
