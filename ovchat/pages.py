"""Giving back resident pages of read-only file mappings (MADV_DONTNEED), Linux only.

Weights reach memory through mappings of files several times in ovchat's life: the safetensors
and GGUF files a conversion reads, the float IR NNCF compresses, and the ``openvino_model.bin``
the CPU plugin maps and repacks at its first inference. The kernel keeps every page that was
read mapped into the process until memory runs short, so the resident set grows by the whole
file although the data is used once. Dropping clean pages of a read-only, file-backed mapping
loses nothing: a later access faults the page back in from the page cache or the file. Writable
and anonymous memory is never touched. Elsewhere than Linux every function here is a no-op.
"""

from __future__ import annotations

import mmap
import os
from pathlib import Path
from typing import Callable, Iterable, List, Optional, Tuple

MADV_DONTNEED = 4
Madvise = Callable[[int, int, int], int]


def madvise() -> Optional[Madvise]:
    """libc's madvise(addr, length, advice), or None where it cannot be had."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        function = libc.madvise
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    function.restype = ctypes.c_int
    return function


def read_only_mappings(files: Optional[Iterable[Path]] = None) -> List[Tuple[int, int]]:
    """(start, length) of this process's read-only mappings of regular files: of ``files`` only
    if given (resolved paths), else of every file.

    Only mappings that are readable and not writable count ("r--s" is how OpenVINO maps a .bin):
    a private writable mapping could hold changes that DONTNEED would throw away.
    """
    wanted = None if files is None else {str(Path(f)) for f in files}
    found = []
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
            for line in maps:
                fields = line.split(maxsplit=5)
                if len(fields) < 6 or fields[1][:2] != "r-":
                    continue
                name = fields[5].rstrip("\n")
                if not name.startswith("/") or (wanted is not None and name not in wanted):
                    continue
                start, end = (int(x, 16) for x in fields[0].split("-"))
                found.append((start, end - start))
    except OSError:
        return []
    return found


def drop_ranges(ranges: Iterable[Tuple[int, int]], advise: Optional[Madvise] = None) -> int:
    """Drop the resident pages of ``ranges``; returns the bytes advised."""
    advise = advise or madvise()
    if advise is None:
        return 0
    return sum(length for start, length in ranges if advise(start, length, MADV_DONTNEED) == 0)


def drop_file_pages(files: Iterable[Path], advise: Optional[Madvise] = None) -> int:
    """Drop this process's resident pages of its read-only mappings of ``files``."""
    return drop_ranges(read_only_mappings([Path(f).resolve() for f in files]), advise)


def drop_mmap(mapping: object) -> None:
    """Drop the resident pages of a read-only ``mmap.mmap`` (a reader's view of a whole file)."""
    if isinstance(mapping, mmap.mmap) and hasattr(mmap, "MADV_DONTNEED"):
        mapping.madvise(mmap.MADV_DONTNEED)


def inner_pages(start: int, end: int) -> Tuple[int, int]:
    """The whole pages inside [start, end), as (start, length); length 0 if there are none."""
    page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
    first, last = -(-start // page) * page, end // page * page
    return first, max(0, last - first)
