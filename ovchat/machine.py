"""What ovchat reads of the machine it runs on: installed package versions, whether a process
still runs, and memory (the machine's, and a process's resident and peak sizes).

Standard library only (the warm path and `ovchat --help` import it). Memory comes from Linux's
/proc; elsewhere the functions say 0 (unknown) rather than guess.
"""

from __future__ import annotations

import os
import resource
import sys
from importlib import metadata
from typing import Dict, Iterable, Optional


def installed_versions(dists: Iterable[str]) -> Dict[str, Optional[str]]:
    """The installed version of each distribution (None where it is not installed)."""
    found: Dict[str, Optional[str]] = {}
    for dist in dists:
        try:
            found[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            found[dist] = None
    return found


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` exists (someone else's counts: it is not ours to judge)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # PermissionError: it exists, as another user's
    return True


def _kib_field(path: str, name: str) -> int:
    """A 'Name:   1234 kB' line of a /proc file, in bytes (0 where it cannot be read)."""
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith(name + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def memory_total() -> int:
    """The machine's memory in bytes (MemTotal)."""
    return _kib_field("/proc/meminfo", "MemTotal")


def memory_available() -> int:
    """Memory the kernel could give without swapping, in bytes (MemAvailable)."""
    return _kib_field("/proc/meminfo", "MemAvailable")


def resident_bytes(pid: int) -> int:
    """Process ``pid``'s resident memory now (VmRSS)."""
    return _kib_field(f"/proc/{pid}/status", "VmRSS")


def peak_resident_bytes() -> int:
    """This process's high-water mark of resident memory. On Linux VmHWM, not ru_maxrss: the
    latter survives exec, so a run started by a big parent (a benchmark script holding models)
    would report the parent's peak."""
    peak = _kib_field("/proc/self/status", "VmHWM")
    if peak:
        return peak
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(maxrss if sys.platform == "darwin" else maxrss * 1024)  # bytes on macOS, KiB elsewhere
