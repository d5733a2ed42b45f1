"""Code layouts (docs/FORMAT.md, "pack"): one code per byte, or N-bit fields packed densely, little-endian bits.

"byte" suits byte-oriented compressors (brotli, lzma, zstd model bytes, and a code that straddles bytes hides its
statistics from them); "dense" wastes nothing when a section is stored raw.
"""
import numpy as np

_CHUNK = 1 << 20  # codes per step, to bound the 8x temporary of unpackbits


def offset(bits: int) -> int:
    """Stored unsigned value u = q + offset(bits)."""
    return (1 << (bits - 1)) - 1


def packed_size(n_codes: int, bits: int, layout: str) -> int:
    return n_codes if layout == "byte" else -(-n_codes * bits // 8)


def pack(u: np.ndarray, bits: int, layout: str) -> bytes:
    """Unsigned codes (uint8, each < 2^bits) to bytes."""
    u = np.ascontiguousarray(u, dtype=np.uint8).reshape(-1)
    if layout == "byte" or bits == 8:
        return u.tobytes()
    # Chunks of a multiple of 8 codes end on a byte boundary, so their packed bytes simply concatenate.
    step = _CHUNK - _CHUNK % 8
    out = []
    for i in range(0, u.size, step):
        bitplanes = np.unpackbits(u[i:i + step, None], axis=1, bitorder="little")[:, :bits]
        out.append(np.packbits(bitplanes.reshape(-1), bitorder="little").tobytes())
    return b"".join(out)


def unpack(data: bytes, n_codes: int, bits: int, layout: str) -> np.ndarray:
    """Bytes to n_codes unsigned codes (uint8)."""
    raw = np.frombuffer(data, dtype=np.uint8)
    if layout == "byte" or bits == 8:
        return raw[:n_codes].copy()
    step = _CHUNK - _CHUNK % 8
    out = np.empty(n_codes, dtype=np.uint8)
    for i in range(0, n_codes, step):
        n = min(step, n_codes - i)
        chunk = raw[i * bits // 8: (i * bits + n * bits + 7) // 8]
        fields = np.unpackbits(chunk, bitorder="little")[: n * bits].reshape(n, bits)
        out[i:i + n] = np.packbits(fields, axis=1, bitorder="little")[:, 0]
    return out


def _address(view: memoryview) -> int:
    return np.frombuffer(view, dtype=np.uint8).ctypes.data


def joined(parts: list):
    """The parts' bytes one after another: the buffer they are consecutive views of when they are (pack lays out
    each section's parts so), as a read-only memoryview, without copying; else a joined copy (bytes)."""
    views = [p for p in parts if len(p)]
    if views and all(isinstance(p, memoryview) and p.obj is views[0].obj for p in views):
        base = memoryview(views[0].obj)
        if base.format != "B" or not base.c_contiguous:
            return b"".join(parts)
        pos = start = _address(base)
        for p in views:
            if p.format != "B" or _address(p) != pos:
                break
            pos += len(p)
        else:
            if pos - start == base.nbytes:
                return base.toreadonly()
    return b"".join(parts)


def shuffle(data: bytes, width: int) -> bytes:
    """Byte-transpose elements of `width` bytes: all first bytes, then all second bytes, ... (FORMAT.md, shuffle)."""
    if width <= 1:
        return data
    return np.frombuffer(data, dtype=np.uint8).reshape(-1, width).T.tobytes()


def unshuffle(data: bytes, width: int) -> bytes:
    if width <= 1:
        return data
    return np.frombuffer(data, dtype=np.uint8).reshape(width, -1).T.tobytes()
