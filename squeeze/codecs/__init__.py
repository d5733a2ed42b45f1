"""Codec registry: lossless byte codecs that store a section (docs/FORMAT.md, "Codecs").

Each codec is one module of this package, named once in MODULES below (docs/ARCHITECTURE.md, "Adding a codec"),
with:
  ID, NAME         the id stored in the preamble (0..255) and the name stored in the header (lowercase, [a-z0-9_]);
  encode(raw, p)   bytes -> stored bytes, `p` an EncodeParams (levels, windows);
  decode(b, n)     stored bytes -> exactly n raw bytes, never producing more than n (raises FormatError);
  DECODE_ERRORS    the exception types its library raises on a damaged stream (a tuple, () if none): `decode` below
                   turns those, and FormatError, into one FormatError naming the section; anything else is a bug and
                   propagates;
  DECODER_IMPORT   "import m1,m2": the modules the emitted tiny decoder needs for it ("" if none); the decoder
                   imports them inside its one function (squeeze/decoder.py);
  DECODER_EXPR     a Python expression for a function (stored bytes, n, layout) -> bytes of at most n+1 bytes,
                   pasted into the tiny decoder's codec table;
  DECODER_DEF      (optional) definitions the expression needs (rans: V and R, squeeze/codecs/rans.py), pasted
                   before the codec table inside the decoder's function, one space deeper;
  USES_LAYOUT      (optional) True if encode/decode take the section layout: [(rows, cols), ...] per part
                   (docs/FORMAT.md, "The section layout"); such a codec codes sections only, never the header.

The protocol is checked when this package is imported: a missing or mistyped attribute, or an ID or NAME that two
modules share, raises CodecProtocolError naming the module and what is wrong, before any artifact is read.
"""
import importlib
import inspect
import re
from dataclasses import dataclass

from ..errors import FormatError

# One name per codec module, in ID order (the order of NAMES: recipes' error messages list them so).
MODULES = ("raw", "zlib_codec", "zstd_codec", "brotli_codec", "lzma_codec", "rans")


class CodecProtocolError(TypeError):
    """A codec module does not follow the protocol above (a bug of squeeze's, raised at import)."""


_NAME = re.compile(r"[a-z][a-z0-9_]*")
_IMPORT = re.compile(r"(import [A-Za-z_]\w*(\.\w+)*(,[A-Za-z_]\w*(\.\w+)*)*)?")
_RESERVED_NAMES = ("auto",)  # recipes' `codec = "auto"`


def check_protocol(module) -> None:
    """Raise CodecProtocolError naming `module` and the first attribute that breaks the protocol."""
    where = f"codec module {module.__name__}"

    def fail(message: str):
        raise CodecProtocolError(f"{where}: {message} (protocol: squeeze/codecs/__init__.py)")

    for attr in ("ID", "NAME", "encode", "decode", "DECODE_ERRORS", "DECODER_IMPORT", "DECODER_EXPR"):
        if not hasattr(module, attr):
            fail(f"missing {attr}")
    ident, name = module.ID, module.NAME
    if not (isinstance(ident, int) and not isinstance(ident, bool) and 0 <= ident <= 255):
        fail(f"ID = {ident!r}: expected an int in 0..255 (one preamble byte)")
    if not (isinstance(name, str) and _NAME.fullmatch(name)) or name in _RESERVED_NAMES:
        fail(f"NAME = {name!r}: expected a lowercase name of [a-z0-9_], not {', '.join(_RESERVED_NAMES)}")
    layout = getattr(module, "USES_LAYOUT", False)
    if not isinstance(layout, bool):
        fail(f"USES_LAYOUT = {layout!r}: expected True or False")
    for fn, args in (("encode", "raw, params"), ("decode", "stored, raw_size")):
        args += ", layout" if layout else ""
        f = getattr(module, fn)
        try:
            inspect.signature(f).bind(*args.split(", "))
        except (TypeError, ValueError):
            fail(f"{fn} must be a function of ({args})")
    errors = module.DECODE_ERRORS
    if not (isinstance(errors, tuple) and all(isinstance(e, type) and issubclass(e, Exception) for e in errors)):
        fail(f"DECODE_ERRORS = {errors!r}: expected a tuple of exception types")
    if Exception in errors:
        fail("DECODE_ERRORS must name the library's own error types, not Exception")
    if not (isinstance(module.DECODER_IMPORT, str) and _IMPORT.fullmatch(module.DECODER_IMPORT)):
        fail(f'DECODER_IMPORT = {module.DECODER_IMPORT!r}: expected "" or "import m1,m2"')
    for attr, mode in (("DECODER_EXPR", "eval"), ("DECODER_DEF", "exec")):
        source = getattr(module, attr, "")
        if not isinstance(source, str) or (attr == "DECODER_EXPR" and not source.strip()):
            fail(f"{attr} must be a string of Python source")
        try:
            compile(source, f"<{module.__name__}.{attr}>", mode)
        except SyntaxError as e:
            fail(f"{attr} is not valid Python ({e.msg}, line {e.lineno})")


def registry(modules) -> tuple[dict, dict]:
    """(BY_NAME, BY_ID) of checked codec modules; CodecProtocolError on a broken module or a shared ID or NAME."""
    by_name, by_id = {}, {}
    for m in modules:
        check_protocol(m)
        for table, key, attr in ((by_id, m.ID, "ID"), (by_name, m.NAME, "NAME")):
            if key in table:
                raise CodecProtocolError(f"codec module {m.__name__}: {attr} {key!r} is already taken by "
                                         f"{table[key].__name__}")
        by_name[m.NAME], by_id[m.ID] = m, m
    return by_name, by_id


BY_NAME, BY_ID = registry(importlib.import_module(f"{__name__}.{m}") for m in MODULES)
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
    """Decode `stored` to exactly `raw_size` bytes; `what` names the section in the error. Only FormatError and the
    codec's DECODE_ERRORS mean a damaged stream; any other exception is a bug and is not disguised as one."""
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
    except codec.DECODE_ERRORS as e:  # the codec library's own error type: a damaged stream
        raise FormatError(f"{what}: corrupt {name} stream ({type(e).__name__}: {e})") from None
    if len(out) != raw_size:
        raise FormatError(f"{what}: {name} stream decodes to {'more' if len(out) > raw_size else len(out)} "
                          f"bytes, header declares {raw_size}")
    return out
