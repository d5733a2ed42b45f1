"""zlib (RFC 1950): what the Parameter Golf baseline uses (level 9)."""
import zlib

from ..errors import FormatError

ID, NAME = 1, "zlib"
DECODE_ERRORS = (zlib.error,)
DECODER_IMPORT = ""  # the tiny decoder imports zlib anyway, for CRC-32
DECODER_EXPR = "lambda b,n,l:zlib.decompressobj().decompress(b,n+1)"


def encode(raw_bytes: bytes, params) -> bytes:
    return zlib.compress(raw_bytes, params.zlib_level)


def decode(stored: bytes, raw_size: int) -> bytes:
    d = zlib.decompressobj()
    out = d.decompress(stored, raw_size + 1)  # bounded: a bomb stops one byte past the declared size
    if len(out) == raw_size and not d.eof:
        raise FormatError("zlib stream is truncated or longer than declared")
    return out
