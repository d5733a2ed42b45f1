"""Token shards in the Parameter Golf format: 256 little-endian int32 header (20240520, 1, n_tokens, 0...), then
n_tokens little-endian uint16 tokens; the file is exactly 1024 + 2·n_tokens bytes."""
from pathlib import Path

import numpy as np

from .errors import SqueezeError

SHARD_MAGIC, SHARD_VERSION, HEADER_INTS = 20240520, 1, 256


def read_shard(path) -> np.ndarray:
    path = str(path)
    try:
        blob = Path(path).read_bytes()
    except OSError as e:
        raise SqueezeError(f"{path}: cannot read token shard ({e.strerror or e})") from None
    if len(blob) < HEADER_INTS * 4:
        raise SqueezeError(f"{path}: too short for a token shard header ({len(blob)} bytes)")
    header = np.frombuffer(blob, dtype="<i4", count=HEADER_INTS)
    if header[0] != SHARD_MAGIC or header[1] != SHARD_VERSION:
        raise SqueezeError(f"{path}: not a token shard (header {header[0]}, {header[1]}; expected "
                           f"{SHARD_MAGIC}, {SHARD_VERSION})")
    n = int(header[2])
    if n < 0 or len(blob) != HEADER_INTS * 4 + 2 * n:
        raise SqueezeError(f"{path}: header says {n} tokens but the file holds {(len(blob) - 1024) / 2:g}")
    return np.frombuffer(blob, dtype="<u2", offset=HEADER_INTS * 4).astype(np.int64)
