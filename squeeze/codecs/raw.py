"""raw: the bytes as they are (the codec a dense-packed section uses when nothing compresses it)."""
ID, NAME = 0, "raw"
DECODE_ERRORS = ()
DECODER_IMPORT = ""
DECODER_EXPR = "lambda b,n,l:b"


def encode(raw_bytes: bytes, params) -> bytes:
    return bytes(raw_bytes)


def decode(stored: bytes, raw_size: int) -> bytes:
    return bytes(stored)
