"""lzma (.xz container): what some Parameter Golf records used (preset 6 or 9)."""
import lzma

from ..errors import FormatError

ID, NAME = 4, "lzma"
DECODE_ERRORS = (lzma.LZMAError,)
DECODER_IMPORT = "import lzma"
DECODER_EXPR = "lambda b,n,l:lzma.LZMADecompressor().decompress(b,n+1)"


def encode(raw_bytes: bytes, params) -> bytes:
    preset = params.lzma_preset | (lzma.PRESET_EXTREME if params.lzma_extreme else 0)
    # CHECK_NONE: the header's CRC-32 already guards the section; a CRC-64 would cost 8 bytes per section.
    return lzma.compress(raw_bytes, format=lzma.FORMAT_XZ, check=lzma.CHECK_NONE, preset=preset)


def decode(stored: bytes, raw_size: int) -> bytes:
    d = lzma.LZMADecompressor(format=lzma.FORMAT_XZ)
    out = d.decompress(stored, raw_size + 1)
    if len(out) == raw_size and not d.eof:
        raise FormatError("lzma stream is truncated or longer than declared")
    return out
