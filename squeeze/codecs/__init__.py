"""Codec registry: lossless byte codecs that store a section (docs/FORMAT.md, "Codecs").

Each codec is one module with:
  ID, NAME         the id stored in the preamble and the name stored in the header;
  encode(raw, p)   bytes -> stored bytes, `p` an EncodeParams (levels, windows);
  decode(b, n)     stored bytes -> exactly n raw bytes, never producing more than n (raises FormatError);
  DECODER_IMPORT   the import line the emitted tiny decoder needs for it ("" if none);
  DECODER_EXPR     a Python lambda (stored bytes, n) -> bytes of at most n+1 bytes, pasted into the tiny decoder.
"""
from dataclasses import dataclass

from ..errors import FormatError
from . import brotli_codec, lzma_codec, raw, zlib_codec, zstd_codec

_MODULES = (raw, zlib_codec, zstd_codec, brotli_codec, lzma_codec)
BY_NAME = {m.NAME: m for m in _MODULES}
BY_ID = {m.ID: m for m in _MODULES}
NAMES = tuple(BY_NAME)


@dataclass(frozen=True)
class EncodeParams:
    """Effort knobs of the codecs; they change the stored bytes, never the decoded ones."""
    zlib_level: int = 9
    zstd_level: int = 19
    brotli_quality: int = 11
    brotli_window: int = 24
    lzma_preset: int = 9
    lzma_extreme: bool = True


def get(name: str):
    return BY_NAME[name]


def encode(name: str, raw_bytes: bytes, params: EncodeParams) -> bytes:
    return BY_NAME[name].encode(raw_bytes, params)


def decode(name: str, stored: bytes, raw_size: int, what: str) -> bytes:
    """Decode `stored` to exactly `raw_size` bytes; `what` names the section in the error."""
    codec = BY_NAME.get(name)
    if codec is None:
        raise FormatError(f"{what}: unknown codec {name!r}")
    try:
        out = codec.decode(stored, raw_size)
    except FormatError as e:
        raise FormatError(f"{what}: {e}") from None
    except Exception as e:  # a codec library's own error type: damaged stream
        raise FormatError(f"{what}: corrupt {name} stream ({type(e).__name__}: {e})") from None
    if len(out) != raw_size:
        raise FormatError(f"{what}: {name} stream decodes to {'more' if len(out) > raw_size else len(out)} "
                          f"bytes, header declares {raw_size}")
    return out
