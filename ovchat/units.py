"""Quantities as people read them, for messages and reports of the library and the CLI alike."""

from __future__ import annotations


def human_size(n: float) -> str:
    """Bytes as B, KB, MB, GB or TB (powers of 1024)."""
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"
