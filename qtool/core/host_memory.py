"""Freed host memory given back to the system. glibc keeps the blocks a process frees in its heaps, where they
still count in its resident size; a quantization run frees hundreds of MiB in blocks of a few MiB after every
layer (activations, autograd buffers, solver scratch), so its resident size would grow to the most it ever held
at once plus what fragmentation strands. malloc_trim returns every whole free page. Elsewhere than glibc: nothing."""

from __future__ import annotations

import ctypes

GLIBC = "libc.so.6"


def give_back_freed_memory() -> bool:
    """Return the C library's free pages to the system; False where there is no glibc to ask."""
    try:
        trim = ctypes.CDLL(GLIBC).malloc_trim  # already loaded: a lookup, not a load
    except (OSError, AttributeError):
        return False
    trim(0)
    return True
