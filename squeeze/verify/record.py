"""The verify report file: what `squeeze verify` measured, kept beside the artifact (ARTIFACT.verify.json) so that
`squeeze inspect` can show the measured drift next to the budget allocator's prediction.

The document is the same as `squeeze verify --json` prints: VerifyResult.to_dict() plus a format marker and the
--max-drift gate. It names the artifact by sha256, so a report left over from an earlier artifact at the same path
is recognised as stale. This module builds and reads the document; writing it is the caller's (the CLI writes it
atomically, rank 0 only), so that the library's verify() never leaves files behind.
"""
import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

from ..errors import SqueezeError

KIND = "squeeze verify report"
VERSION = 1
SUFFIX = ".verify.json"
MAX_REPORT_BYTES = 1 << 20  # a real report is a few KB; anything far larger is not one, so do not read it whole


def default_path(artifact) -> Path:
    """Where verify writes, and inspect looks for, the report of `artifact`: model.sqz -> model.sqz.verify.json."""
    return Path(f"{artifact}{SUFFIX}")


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def document(result, max_drift: float | None = None) -> dict:
    """The report of a VerifyResult: what `verify --json` prints and the report file holds."""
    return {"report": KIND, "version": VERSION, **result.to_dict(), "max_drift": max_drift}


def encode(doc: dict) -> bytes:
    return (json.dumps(doc, indent=1) + "\n").encode("utf-8")


@dataclass(frozen=True)
class Measured:
    """The parts of a report inspect shows."""
    sha256: str            # of the artifact that was verified
    loss_increase: float   # decoded − original val_loss, nats/token
    bpb_drift: float       # decoded − original val_bpb
    tokens: int            # validation predictions scored
    val: str               # the validation glob
    bytes: str = "tokenizer LUT"  # where the byte counts came from: "tokenizer LUT" or "sidecar GLOB" (CaseOps)


def read(path) -> Measured:
    """The measured drift from the report at `path`; a one-line SqueezeError when it cannot be read or is not a
    report this version of squeeze wrote."""
    path = Path(path)
    try:
        if path.stat().st_size > MAX_REPORT_BYTES:
            raise SqueezeError(f"{path}: not a verify report (larger than {MAX_REPORT_BYTES:,} bytes)")
        doc = json.loads(path.read_bytes())
    except OSError as e:
        raise SqueezeError(f"{path}: cannot read ({e.strerror or e})") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SqueezeError(f"{path}: not a verify report (not JSON: {str(e).splitlines()[0]})") from None
    if not isinstance(doc, dict) or doc.get("report") != KIND:
        raise SqueezeError(f"{path}: not a verify report (no \"report\": \"{KIND}\")")
    if type(doc.get("version")) is not int or doc["version"] != VERSION:  # (True == 1 in Python)
        raise SqueezeError(f"{path}: verify report version {doc.get('version')!r}, this squeeze reads {VERSION}")
    sha = _field(doc, path, "artifact", "sha256")
    if not isinstance(sha, str) or len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
        raise SqueezeError(f"{path}: not a verify report (artifact.sha256 is not a sha256 hex digest)")
    return Measured(sha256=sha, loss_increase=_number(doc, path, "drift", "val_loss"),
                    bpb_drift=_number(doc, path, "drift", "val_bpb"),
                    tokens=int(_number(doc, path, "decoded", "tokens")), val=str(_field(doc, path, "settings", "val")),
                    bytes=_byte_label(doc, path))


def _byte_label(doc: dict, path: Path) -> str:
    """settings.bytes; a report written before CaseOps sidecars were read has none: its bytes were the LUT's."""
    settings = _field(doc, path, "settings")
    label = settings.get("bytes", "tokenizer LUT") if isinstance(settings, dict) else "tokenizer LUT"
    if not isinstance(label, str):
        raise SqueezeError(f"{path}: not a verify report (settings.bytes is not a string)")
    return label


def _field(doc: dict, path: Path, *keys: str):
    value = doc
    for key in keys:
        if not isinstance(value, dict) or key not in value:
            raise SqueezeError(f"{path}: not a verify report (no {'.'.join(keys)})")
        value = value[key]
    return value


def _number(doc: dict, path: Path, *keys: str) -> float:
    value = _field(doc, path, *keys)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise SqueezeError(f"{path}: not a verify report ({'.'.join(keys)} is not a finite number)")
    return float(value)
