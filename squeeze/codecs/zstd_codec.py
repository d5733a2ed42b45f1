"""zstd (RFC 8878), one frame."""
import io

import zstandard

ID, NAME = 2, "zstd"
DECODE_ERRORS = (zstandard.ZstdError,)
DECODER_IMPORT = "import zstandard,io"
DECODER_EXPR = "lambda b,n,l:zstandard.ZstdDecompressor().stream_reader(io.BytesIO(b)).read(n+1)"


def encode(raw_bytes: bytes, params) -> bytes:
    # No content size/checksum in the frame: the header already declares the size and carries a CRC.
    cctx = zstandard.ZstdCompressor(level=params.zstd_level, write_content_size=False, write_checksum=False)
    return cctx.compress(raw_bytes)


def decode(stored: bytes, raw_size: int) -> bytes:
    # A stream reader allocates as it goes, so a frame claiming a huge size cannot make us allocate it.
    reader = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(stored))
    return reader.read(raw_size + 1)
