"""Files ovchat reads and writes on a user's behalf (a saved conversation, a JSON schema, tools).

A path a user types may name anything: a FIFO (opening it waits forever), /dev/zero (reading it
never ends), a 3 GB log, a symbolic link to a file they care about. So reads accept only a
regular file, checked before it is opened, and read at most ``limit`` bytes; writes go to a new
file beside the target and are renamed over it only when the target is absent or a regular file,
so a link, a device or a directory is never replaced and an existing file is never left
half-written.
"""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path

from ovchat.errors import InputError
from ovchat.units import human_size

READ_LIMIT = 16 * 1024 * 1024  # a conversation of the longest context, many times over


def read_text(path: str | Path, *, what: str = "file", limit: int = READ_LIMIT) -> str:
    """The UTF-8 text of the regular file ``path``, or InputError saying why not."""
    path = Path(path).expanduser()
    try:
        info = os.stat(path)
    except OSError as e:
        raise InputError(f"could not read {path}: {e.strerror}") from None
    if not stat.S_ISREG(info.st_mode):
        raise InputError(f"{path} is not a regular file; give the path of a {what}")
    if info.st_size > limit:
        raise InputError(f"{path} has {human_size(info.st_size)}, more than a {what} may "
                         f"({human_size(limit)})")
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except OSError as e:
        raise InputError(f"could not read {path}: {e.strerror}") from None
    if len(data) > limit:  # it grew after the check
        raise InputError(f"{path} has more than a {what} may ({human_size(limit)})")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise InputError(f"{path} is not UTF-8 text; give the path of a {what}") from None


def write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically; refuse to replace anything but a regular file."""
    path = Path(path).expanduser()
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        pass
    except OSError as e:
        raise InputError(f"could not write {path}: {e.strerror}") from None
    else:
        if not stat.S_ISREG(info.st_mode):
            kind = "a symbolic link" if stat.S_ISLNK(info.st_mode) else \
                "a directory" if stat.S_ISDIR(info.st_mode) else "not a regular file"
            raise InputError(f"{path} is {kind}; it was left as it is. Choose another file name")
    partial = path.with_name(f".{path.name}.partial-{os.getpid()}")
    try:
        # O_EXCL: never through a link someone planted at the partial name.
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(partial, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            partial.unlink()
        raise InputError(f"could not write {path}: {e.strerror}") from None
