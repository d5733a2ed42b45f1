"""brotli (RFC 7932): the Parameter Golf records' choice (quality 11, window 24)."""
import brotli

from ..errors import FormatError

ID, NAME = 3, "brotli"
DECODE_ERRORS = (brotli.error,)
DECODER_IMPORT = "import brotli"
DECODER_EXPR = "lambda b,n,l:brotli.Decompressor().process(b,output_buffer_limit=n+1)"


def encode(raw_bytes: bytes, params) -> bytes:
    return brotli.compress(raw_bytes, quality=params.brotli_quality, lgwin=params.brotli_window)


def decode(stored: bytes, raw_size: int) -> bytes:
    d = brotli.Decompressor()
    out = d.process(stored, output_buffer_limit=raw_size + 1)
    if len(out) == raw_size and not d.is_finished():
        raise FormatError("brotli stream is truncated or longer than declared")
    return out
