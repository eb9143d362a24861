"""Quantities as people read and write them (sizes, durations), for the library and the CLI alike."""

from __future__ import annotations

import re
from typing import Optional

from ovchat.errors import OptionError


def human_size(n: float) -> str:
    """Bytes as B, KB, MB, GB or TB (powers of 1024)."""
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


_DURATION = re.compile(r"(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s?)?")
_SIZE_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 1 << 10, "kib": 1 << 10, "m": 1 << 20, "mb": 1 << 20,
               "mib": 1 << 20, "g": 1 << 30, "gb": 1 << 30, "gib": 1 << 30, "t": 1 << 40, "tb": 1 << 40,
               "tib": 1 << 40}


def parse_duration(value: object, *, what: str = "the duration") -> Optional[float]:
    """Seconds in 90, "90", "30s", "5m", "1h", "1h30m" or "500ms", as ollama's keep_alive takes
    them; a negative number is None (forever). OptionError for anything else."""
    if isinstance(value, bool):
        raise OptionError(f"{what} must be a duration such as 30s, 5m or 1h (or -1 for forever), not {value!r}")
    if isinstance(value, (int, float)):
        if value != value or value in (float("inf"), float("-inf")):
            raise OptionError(f"{what} must be a finite number of seconds, not {value!r}")
        return None if value < 0 else float(value)
    text = str(value).strip().lower()
    if re.fullmatch(r"-\d+(\.\d+)?[smh]?", text):
        return None
    millis = re.fullmatch(r"(\d+(?:\.\d+)?)ms", text)
    if millis:
        return float(millis.group(1)) / 1000
    match = _DURATION.fullmatch(text)
    if not text or match is None or not any(match.groups()):
        raise OptionError(f"{what} {value!r} is not a duration; use e.g. 30s, 5m, 1h, or -1 for forever")
    hours, minutes, seconds = (float(g) if g else 0.0 for g in match.groups())
    return hours * 3600 + minutes * 60 + seconds


def parse_size(value: str, *, total: Optional[int] = None, what: str = "the size") -> int:
    """Bytes in "512MB", "4GB", "4G", "1073741824", or with ``total`` a share of it: "75%"."""
    text = str(value).strip().lower().replace(" ", "")
    percent = re.fullmatch(r"(\d+(?:\.\d+)?)%", text)
    if percent and total is not None:
        share = float(percent.group(1))
        if not 0 < share <= 100:
            raise OptionError(f"{what} {value!r} must be a share from 1% to 100%")
        return int(total * share / 100)
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([a-z]*)", text)
    if match is None or match.group(2) not in _SIZE_UNITS or float(match.group(1)) <= 0:
        raise OptionError(f"{what} {value!r} is not a size; use e.g. 512MB, 4GB" + (" or 75%" if total else ""))
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2)])
