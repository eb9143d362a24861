"""Finding the `ovchat serve` processes running on this machine, so that `ovchat run` and `ovchat chat` can use
a model that is already loaded instead of loading it again (the warm path ollama gives its users).

A server registers itself in ``OVCHAT_HOME/servers/PID.json`` once it listens (its URL, the
models it was started with, the store it serves, whether it wants a key) and removes the file
when it stops. ``find`` returns a live server that serves a given model (one it was started with,
or any entry of its store) and the name it knows the model by: the file's process still runs and
its /health answers. A file left by a killed server is removed by the next ``find``. Only the
standard library is used here, so the warm path never imports OpenVINO.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass
from http.client import HTTPConnection, HTTPException
from pathlib import Path
from typing import Dict, List, Optional, Tuple
from urllib.parse import urlparse

from ovchat.machine import process_alive

HEALTH_TIMEOUT_S = 2.0


@dataclass(frozen=True)
class ServerInfo:
    url: str
    pid: int
    models: Dict[str, str]  # resolved path -> name, of the models it was started with (-m)
    store: Optional[str]  # the resolved store directory whose entries it serves by name
    key_required: bool
    device: str

    def name_of(self, model_path: Path) -> Optional[str]:
        """The name this server knows ``model_path`` by, or None if it does not serve it."""
        wanted = Path(model_path).resolve()
        if str(wanted) in self.models:
            return self.models[str(wanted)]
        if self.store is not None and wanted.parent == Path(self.store) and wanted.is_dir():
            return wanted.name
        return None


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


def servers() -> List[ServerInfo]:
    """The servers announced on this machine whose process still runs (a killed server's
    announcement is removed on the way)."""
    try:
        files = sorted(_directory().glob("*.json"))
    except OSError:
        return []
    found = []
    for file in files:
        try:
            info = ServerInfo(**json.loads(file.read_text(encoding="utf-8")))
        except (OSError, ValueError, TypeError):
            continue
        if not process_alive(info.pid):
            unregister(file)
            continue
        found.append(info)
    return found


def find(model_path: Path, *, device: Optional[str] = None) -> Optional[Tuple[ServerInfo, str]]:
    """A running server that serves ``model_path`` (on ``device``, if given) and answers
    /health, with the model's name there; or None."""
    for info in servers():
        name = info.name_of(model_path)
        if name is None or (device is not None and device.upper() != info.device.upper()):
            continue
        if health(info) is not None:
            return info, name
    return None


def health(info: ServerInfo) -> Optional[dict]:
    """The server's /health answer if it is 200, else None."""
    return _get(info, "/health")


def model_card(info: ServerInfo, name: str, api_key: Optional[str] = None) -> Optional[dict]:
    """The server's /v1/models/NAME card (with its window and whether it has a chat template),
    or None."""
    from urllib.parse import quote

    return _get(info, f"/v1/models/{quote(name, safe='')}", api_key)


def loaded_models(info: ServerInfo, api_key: Optional[str] = None) -> Optional[List[dict]]:
    """The server's loaded models (its /api/ps), or None if it does not answer."""
    answer = _get(info, "/api/ps", api_key)
    return answer.get("models") if isinstance(answer, dict) else None


def unload(info: ServerInfo, name: str, api_key: Optional[str] = None) -> bool:
    """Ask the server to unload a model now (ollama's keep_alive 0); whether it said yes."""
    return _request(info, "POST", "/api/generate", api_key, {"model": name, "keep_alive": 0}) is not None


def _get(info: ServerInfo, path: str, api_key: Optional[str] = None) -> Optional[dict]:
    return _request(info, "GET", path, api_key)


def _request(info: ServerInfo, method: str, path: str, api_key: Optional[str] = None,
             body: Optional[dict] = None) -> Optional[dict]:
    """The server's JSON answer if it is 200, else None."""
    parsed = urlparse(info.url)
    conn = HTTPConnection(parsed.hostname, parsed.port, timeout=HEALTH_TIMEOUT_S if body is None else 120)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    if body is not None:
        headers["Content-Type"] = "application/json"
    try:
        conn.request(method, path, body=None if body is None else json.dumps(body), headers=headers)
        response = conn.getresponse()
        answer = response.read()
        return json.loads(answer) if response.status == 200 else None
    except (OSError, HTTPException, ValueError):
        return None
    finally:
        conn.close()
