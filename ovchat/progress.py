"""Progress reporting: the library calls a callback, the CLI decides how to show it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional


@dataclass(frozen=True)
class Progress:
    """One progress report.

    ``stage`` names a step ("fetch", "read", "build", "compress", "tokenizer", "save", ...).
    ``done``/``total`` are set for steps with a measurable size (bytes, tensors, layers);
    a report with only ``message`` is a one-off status line.
    """

    stage: str
    message: str = ""
    done: Optional[int] = None
    total: Optional[int] = None


ProgressCallback = Callable[[Progress], None]


def ignore(_: Progress) -> None:
    """The default callback: report nothing."""
