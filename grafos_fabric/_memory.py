"""I/O buffers on transparent huge pages, for large ``O_DIRECT`` writes.

How fast a large ``O_DIRECT`` write goes depends on how many physically
contiguous pieces its buffer is made of: the block layer hands the device one
segment per piece, and a virtual disk may charge per segment and split a
request at ``max_segments`` (254 on this VM's virtio-blk). Measured here (C,
the same write from buffers of either kind, 20 ms turns, README "Checkpoint
speed"): a 1 MiB ``O_DIRECT`` + ``RWF_DSYNC`` write from 256 discontiguous
4 KiB pages took 475-535 us, from a buffer of 47-67 pieces 360-380 us, and a
page-aligned anonymous buffer gets whichever the allocator hands out. A buffer
inside one 2 MiB transparent huge page is one piece.

So the large checkpoint states whose memory this package allocates itself
(``CheckpointedStageState.with_buffer``'s array, from :data:`HUGE_MIN` bytes)
are private anonymous mappings advised ``MADV_HUGEPAGE`` at a 2 MiB-aligned
address: a 1 MiB checkpoint of such a state measured 1.14-1.41x the best raw
write (median of 9 rounds, three runs; 0.89-1.03x on small pages). A ``bytes``
state stays where Python put it: copying it to a buffer on huge pages first
measured no better than writing it from its own pages (0.86-1.10x against
0.94-0.99x). Where the kernel
has no transparent huge pages (``never``, no ``MADV_HUGEPAGE``, another page
size) or ``GRAFOS_NO_HUGE_PAGES`` is set in the environment, :func:`huge_pages`
is False and callers keep their ordinary page-aligned buffers. The kernel may
still hand out small pages (no free 2 MiB block): the buffer then works as any
other, only without the gain. The cost is resident memory: a 1 MiB buffer takes
a whole 2 MiB page.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import mmap
import os

__all__ = ["HUGE_MIN", "HUGE_PAGE", "huge_mmap", "huge_pages"]

HUGE_PAGE = 2 << 20  # the PMD-sized transparent huge page with 4 KiB base pages
HUGE_MIN = 1 << 20  # buffers from this size go on huge pages (see the module's text)
_THP = "/sys/kernel/mm/transparent_hugepage"


def _setting(path: str) -> str:
    """The bracketed choice of a THP sysfs file (``always [madvise] never`` -> ``madvise``), or ''."""
    try:
        with open(path, encoding="ascii") as f:
            text = f.read()
    except (OSError, ValueError):
        return ""
    start, end = text.find("["), text.find("]")
    return text[start + 1 : end] if 0 <= start < end else ""


@functools.cache
def _kernel_huge_pages() -> bool:
    if mmap.PAGESIZE != 4096 or not hasattr(mmap, "MADV_HUGEPAGE") or not hasattr(mmap, "MAP_PRIVATE"):
        return False
    try:
        with open(f"{_THP}/hpage_pmd_size", encoding="ascii") as f:
            if int(f.read()) != HUGE_PAGE:
                return False
    except (OSError, ValueError):
        return False
    top = _setting(f"{_THP}/enabled")
    size = _setting(f"{_THP}/hugepages-{HUGE_PAGE >> 10}kB/enabled") or "inherit"
    if size == "inherit":
        size = top
    return size in ("always", "madvise")


def huge_pages() -> bool:
    """Whether :func:`huge_mmap` can get transparent huge pages here (read once, and the
    ``GRAFOS_NO_HUGE_PAGES`` environment variable on every call)."""
    return "GRAFOS_NO_HUGE_PAGES" not in os.environ and _kernel_huge_pages()


def huge_mmap(nbytes: int) -> tuple[mmap.mmap, int]:
    """A zeroed private anonymous mapping and the offset in it of ``nbytes`` bytes that start on
    a 2 MiB boundary and are advised ``MADV_HUGEPAGE``. The mapping is private: a forked child
    gets its own copy, as with any Python object."""
    span = -(-max(nbytes, 1) // HUGE_PAGE) * HUGE_PAGE
    mm = mmap.mmap(-1, span + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    with memoryview(mm) as view:
        addr = ctypes.addressof(ctypes.c_char.from_buffer(view))
    start = -addr % HUGE_PAGE  # the mapping's first 2 MiB boundary
    with contextlib.suppress(OSError, ValueError):  # no huge pages: small ones, as any buffer
        mm.madvise(mmap.MADV_HUGEPAGE, start, span)
    return mm, start
