"""Writing outputs so that a crash or a failed check never leaves a partial or wrong file (CLI and export)."""
import os
import tempfile
from pathlib import Path

from .errors import SqueezeError


def write_atomically(path: str, data: bytes, check=None):
    """Write to a temporary file beside `path`, optionally re-read and check it, then rename: a crash or a failed
    check never leaves a partial or wrong file at `path`, and never touches an existing one."""
    target = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent or ".")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; the output gets what open() would have given it
        if check is not None:
            try:
                check(tmp)
            except SqueezeError as e:  # name the file the user asked for, not our temporary one
                raise SqueezeError(str(e).replace(tmp, f"{path} (re-read before writing)")) from None
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
