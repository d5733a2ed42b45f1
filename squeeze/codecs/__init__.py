"""Codec registry: lossless byte codecs that store a section (docs/FORMAT.md, "Codecs").

Each codec is one module with:
  ID, NAME         the id stored in the preamble and the name stored in the header;
  encode(raw, p)   bytes -> stored bytes, `p` an EncodeParams (levels, windows);
  decode(b, n)     stored bytes -> exactly n raw bytes, never producing more than n (raises FormatError);
  DECODER_IMPORT   the import line the emitted tiny decoder needs for it ("" if none);
  DECODER_EXPR     a Python lambda (stored bytes, n, layout) -> bytes of at most n+1 bytes, pasted into the tiny
                   decoder (rans has its decoder function in squeeze/decoder.py instead);
  USES_LAYOUT      (optional) True if encode/decode take the section layout: [(rows, cols), ...] per part
                   (docs/FORMAT.md, "The section layout").
"""
from dataclasses import dataclass

from ..errors import FormatError
from . import brotli_codec, lzma_codec, rans, raw, zlib_codec, zstd_codec

_MODULES = (raw, zlib_codec, zstd_codec, brotli_codec, lzma_codec, rans)
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


def uses_layout(name: str) -> bool:
    return getattr(BY_NAME[name], "USES_LAYOUT", False)


def encode(name: str, raw_bytes: bytes, params: EncodeParams, layout=None) -> bytes:
    """`layout`: the section's parts as [(rows, cols), ...]; None means one row of all the bytes."""
    if uses_layout(name):
        return BY_NAME[name].encode(raw_bytes, params, layout or [(1, len(raw_bytes))])
    return BY_NAME[name].encode(raw_bytes, params)


def decode(name: str, stored: bytes, raw_size: int, what: str, layout=None) -> bytes:
    """Decode `stored` to exactly `raw_size` bytes; `what` names the section in the error."""
    codec = BY_NAME.get(name)
    if codec is None:
        raise FormatError(f"{what}: unknown codec {name!r}")
    try:
        if uses_layout(name):
            out = codec.decode(stored, raw_size, layout or [(1, raw_size)])
        else:
            out = codec.decode(stored, raw_size)
    except FormatError as e:
        raise FormatError(f"{what}: {e}") from None
    except Exception as e:  # a codec library's own error type: damaged stream
        raise FormatError(f"{what}: corrupt {name} stream ({type(e).__name__}: {e})") from None
    if len(out) != raw_size:
        raise FormatError(f"{what}: {name} stream decodes to {'more' if len(out) > raw_size else len(out)} "
                          f"bytes, header declares {raw_size}")
    return out
