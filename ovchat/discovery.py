"""Finding the `ovchat serve` processes running on this machine, so that `ovchat run` and `ovchat chat` can use
a model that is already loaded instead of loading it again (the warm path ollama gives its users).

A server registers itself in ``OVCHAT_HOME/servers/PID.json`` once it listens (its URL, the model
it serves, whether it wants a key) and removes the file when it stops. ``find`` returns a live
server of a given model: the file's process still runs and its /health answers. A file left by a
killed server is removed by the next ``find``. Only the standard library is used here, so the
warm path never imports OpenVINO.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass
from http.client import HTTPConnection, HTTPException
from pathlib import Path
from typing import Optional
from urllib.parse import urlparse

from ovchat.machine import process_alive

HEALTH_TIMEOUT_S = 2.0


@dataclass(frozen=True)
class ServerInfo:
    url: str
    pid: int
    model_path: str
    model_id: str
    key_required: bool
    device: str


def _directory() -> Path:
    from ovchat.store import home

    return home() / "servers"


def register(info: ServerInfo) -> Optional[Path]:
    """Announce a server; returns the file to ``unregister`` (None if it could not be written:
    the server then works, only the warm path does not find it)."""
    directory = _directory()
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".server-", dir=directory)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(asdict(info), f)
        path = directory / f"{info.pid}.json"
        os.replace(tmp, path)
        return path
    except OSError:
        return None


def unregister(path: Optional[Path]) -> None:
    if path is not None:
        try:
            path.unlink()
        except OSError:
            pass


def find(model_path: Path, *, device: Optional[str] = None) -> Optional[ServerInfo]:
    """A running server of ``model_path`` (on ``device``, if given) that answers /health, or None."""
    try:
        files = sorted(_directory().glob("*.json"))
    except OSError:
        return None
    wanted = str(Path(model_path).resolve())
    for file in files:
        try:
            info = ServerInfo(**json.loads(file.read_text(encoding="utf-8")))
        except (OSError, ValueError, TypeError):
            continue
        if not process_alive(info.pid):
            unregister(file)
            continue
        if info.model_path != wanted or (device is not None and device.upper() != info.device.upper()):
            continue
        if health(info) is not None:
            return info
    return None


def health(info: ServerInfo) -> Optional[dict]:
    """The server's /health answer if it is 200, else None."""
    parsed = urlparse(info.url)
    conn = HTTPConnection(parsed.hostname, parsed.port, timeout=HEALTH_TIMEOUT_S)
    try:
        conn.request("GET", "/health")
        response = conn.getresponse()
        body = response.read()
        return json.loads(body) if response.status == 200 else None
    except (OSError, HTTPException, ValueError):
        return None
    finally:
        conn.close()
