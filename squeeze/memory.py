"""Handing freed memory back to the operating system between the compiler's large steps.

glibc's malloc keeps what a process frees inside its heaps (the main one and one per thread) and returns only what
lies at a heap's top; after a free of a large block it also raises its threshold for using mmap, so later
tensor-sized temporaries (a few MB each) land in the heaps too. A compile interleaves such temporaries with
long-lived codes and buffers, so freed memory stays resident as holes, and the next large step (brotli's match
state, a section's decode) adds to it instead of reusing it. `trim()` asks malloc to give every free page back
(malloc_trim: MADV_DONTNEED on free pages inside the heaps too), and `keep_large_blocks_mapped()`, for a program
that compiles (the CLI), fixes the mmap threshold so that blocks of 4 MB and more are always mmapped and so go
back to the OS the moment they are freed. Elsewhere than glibc both do nothing.
"""
import ctypes
import ctypes.util
import os

M_MMAP_THRESHOLD = -3  # mallopt's parameter number (malloc.h)
MMAP_THRESHOLD = 4 << 20

_malloc_trim = _mallopt = None
try:
    _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    _malloc_trim, _mallopt = _libc.malloc_trim, _libc.mallopt
    _malloc_trim.argtypes, _malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
    _mallopt.argtypes, _mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
except (OSError, AttributeError):  # not glibc (musl, macOS, Windows): nothing to tune this way
    _malloc_trim = _mallopt = None


def trim() -> None:
    """Return free heap memory to the OS (glibc); a no-op elsewhere. Takes milliseconds."""
    if _malloc_trim is not None:
        _malloc_trim(0)


def keep_large_blocks_mapped() -> None:
    """Fix glibc's mmap threshold at 4 MB for the rest of the process (a program's choice, not a library's: the CLI
    calls it), unless MALLOC_MMAP_THRESHOLD_ in the environment already sets it. glibc otherwise raises the threshold
    up to 32 MB whenever a large block is freed, after which tensor-sized temporaries land in the heaps and stay
    resident as holes (~100 MB of a 100M-parameter compile's peak)."""
    if _mallopt is not None and "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        _mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
