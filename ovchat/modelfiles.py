"""What a model on disk is, without loading it: its files, manifest, integrity and context length.

A model is either a directory that LLMPipeline reads (an OpenVINO IR with tokenizer IRs, and the
``ovchat.json`` manifest when ovchat wrote it) or a ``.gguf`` file, which OpenVINO GenAI reads
directly. This module names the files once for every other module, validates manifests, checks
a directory against its manifest, and moves finished directories into place safely. GGUF
metadata is parsed here with the standard library so the base install needs no ``gguf`` package.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional

from ovchat.errors import DamagedModelError, ModelNotFoundError, OutputExistsError, StorageError
from ovchat.machine import process_alive

# The files of a model directory, named once for every module that reads or writes them.
MANIFEST = "ovchat.json"  # what ovchat convert wrote: source, recipe, receipt, file sizes and hashes
MODEL_XML = "openvino_model.xml"
MODEL_BIN = "openvino_model.bin"
TOKENIZER_FILES = ("openvino_tokenizer.xml", "openvino_tokenizer.bin",
                   "openvino_detokenizer.xml", "openvino_detokenizer.bin")
REQUIRED_IR_FILES = (MODEL_XML, MODEL_BIN) + TOKENIZER_FILES

_HASH_CHUNK = 8 * 1024 * 1024


def sha256(path: Path) -> str:
    """The hex sha256 of a file, read in chunks (model files are gigabytes)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


# -- the manifest ------------------------------------------------------------------------------

_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def validate_manifest(data: Any, where: Path) -> dict:
    """``data`` if it is a manifest ovchat can use, else DamagedModelError saying what is wrong.

    The one check every reader of ``ovchat.json`` relies on: an object with a ``manifest_version``
    whose ``files`` maps file names (the model's XML among them) to ``{"size": bytes, "sha256":
    hex}``; other fields are optional.
    """
    def damaged(what: str) -> DamagedModelError:
        return DamagedModelError(f"{where} is damaged ({what}); convert the model again", problem=what)

    if not isinstance(data, dict):
        raise damaged(f"{MANIFEST} holds {type(data).__name__}, not an object")
    # What every conversion writes: without it there is nothing to check the files against.
    if isinstance(data.get("manifest_version"), bool) or not isinstance(data.get("manifest_version"), int):
        raise damaged(f"{MANIFEST} has no manifest_version")
    files = data.get("files")
    if not isinstance(files, dict):
        raise damaged(f"'files' in {MANIFEST} is missing or not an object")
    if MODEL_XML not in files:
        raise damaged(f"{MANIFEST} does not list {MODEL_XML}")
    for name, info in files.items():
        if not isinstance(info, dict) or isinstance(info.get("size"), bool) or not isinstance(info.get("size"), int) \
                or info["size"] < 0 or not isinstance(info.get("sha256"), str) or not _SHA256.match(info["sha256"]):
            raise damaged(f"the entry of {name} in {MANIFEST} lacks a size or a sha256")
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise damaged(f"{MANIFEST} names a file outside the model ({name})")
    for key in ("recipe", "source", "store", "receipt", "kept", "bitwidth_distribution"):
        if key in data and data[key] is not None and not isinstance(data[key], dict):
            raise damaged(f"'{key}' in {MANIFEST} is not an object")
    return data


def read_manifest(model_dir: Path) -> dict:
    """The validated manifest of a model directory; ModelNotFoundError if it has none,
    DamagedModelError if it is unreadable or malformed."""
    path = Path(model_dir) / MANIFEST
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ModelNotFoundError(f"{model_dir} has no {MANIFEST}; it was not written by `ovchat convert`") from None
    except OSError as e:
        raise DamagedModelError(f"{path} cannot be read ({e.strerror}); convert the model again",
                                problem=f"{MANIFEST} cannot be read") from None
    except UnicodeDecodeError:
        raise DamagedModelError(f"{path} is not text; convert the model again",
                                problem=f"{MANIFEST} is not text") from None
    try:
        data = json.loads(text)
    except (json.JSONDecodeError, RecursionError):
        raise DamagedModelError(f"{path} is not valid JSON; convert the model again",
                                problem=f"{MANIFEST} is not valid JSON") from None
    return validate_manifest(data, Path(model_dir))


def damage(path: Path, *, full: bool = False) -> List[str]:
    """What is wrong with a converted model's files against its manifest ([] when intact).

    Sizes are always checked (cheap, done at every load); ``full`` also checks sha256 hashes.
    """
    try:
        manifest = read_manifest(path)
    except DamagedModelError as e:
        return [e.problem]
    except ModelNotFoundError:
        return [f"{MANIFEST} is missing"]
    problems = []
    for rel, info in (manifest.get("files") or {}).items():
        f = Path(path) / rel
        if not f.is_file():
            problems.append(f"{rel} is missing")
        elif f.stat().st_size != info["size"]:
            problems.append(f"{rel} has {f.stat().st_size} bytes, expected {info['size']}")
        elif full and sha256(f) != info["sha256"]:
            problems.append(f"{rel} does not match its sha256")
    return problems


# -- putting a finished directory in place ------------------------------------------------------

def replaceable(target: Path) -> Optional[str]:
    """Why ``target`` must not be replaced by a model ovchat writes, or None if it may: only an
    empty directory or a model directory ovchat made (its manifest says so) may go. A user's
    folder of documents, a symbolic link, a file, anything else is never deleted."""
    if not target.exists() and not target.is_symlink():
        return None
    if target.is_symlink() or not target.is_dir():
        return f"{target} is not a model directory ovchat made"
    try:
        entries = [p.name for p in target.iterdir()]
    except OSError as e:
        return f"{target} cannot be read ({e.strerror})"
    if not entries:
        return None
    try:
        manifest = json.loads((target / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        manifest = None
    if isinstance(manifest, dict) and "manifest_version" in manifest:
        return None
    return f"{target} holds files ovchat did not make ({', '.join(sorted(entries)[:3])}{', ...' if len(entries) > 3 else ''})"


def install_directory(work: Path, target: Path, *, replace: bool = True) -> None:
    """Move the complete directory ``work`` to ``target`` (same file system), replacing an
    existing ``target`` only at the last moment: the old one is renamed aside, the new one
    renamed in, and only then is the old one deleted; if the second rename fails the old one
    is put back. At no moment is there neither model. Only what ``replaceable`` allows is ever
    replaced; with ``replace`` False, a ``target`` that appeared meanwhile (another conversion,
    a folder the user made) is kept and OutputExistsError raised."""
    if not replace and (target.exists() or target.is_symlink()):
        raise OutputExistsError(f"{target} appeared while converting; it was kept. Choose another OUTPUT, "
                                "or pass --force to replace it")
    refused = replaceable(target)
    if refused is not None:
        raise OutputExistsError(f"{refused}; it was kept. Choose another OUTPUT")
    old = None
    if target.exists() or target.is_symlink():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        os.rmdir(old)
        try:
            os.replace(target, old)
        except OSError as e:
            raise StorageError(f"could not move the old {target} aside ({e.strerror}); check permissions") from None
    try:
        os.replace(work, target)
    except OSError as e:
        if old is not None:
            os.replace(old, target)
        raise StorageError(f"could not move the new model into {target} ({e.strerror}); check permissions") from None
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO, errno.EFBIG}


def storage_error(where: Path, error: BaseException) -> Optional[StorageError]:
    """The StorageError ``error`` stands for when it is a failure to write under ``where`` (a full
    disk, no permission), else None. OpenVINO reports a failed write as RuntimeError
    "basic_ios::clear: iostream error", without the reason; the free space says it."""
    if isinstance(error, OSError) and error.errno in _WRITE_ERRNOS:
        reason = error.strerror or str(error)
    elif isinstance(error, RuntimeError) and "iostream error" in str(error):
        reason = "a write failed"
    else:
        return None
    try:
        free = shutil.disk_usage(next(p for p in (Path(where), *Path(where).parents) if p.exists())).free
    except (OSError, StopIteration):
        return StorageError(f"could not write under {where} ({reason}); check the disk and its permissions")
    from ovchat.units import human_size

    return StorageError(f"could not write under {where} ({reason}; the disk is probably full: {human_size(free)} "
                        "free once the partial output was removed); free some space or write elsewhere")


def remove_stale_partials(directory: Path, prefix: str) -> List[Path]:
    """Remove ``directory``/``prefix``PID-* work directories whose process PID is gone.

    ovchat names its work directories with its process id (``convert``: .OUTPUT.partial-PID-*,
    ``pull``: models/.partial-NAME@PID-*), so a directory left by a killed process can be told
    from one a live process is still writing. Nothing else is ever touched.
    """
    removed = []
    try:
        entries = list(Path(directory).iterdir())
    except OSError:
        return removed
    for entry in entries:
        if not entry.name.startswith(prefix) or entry.is_symlink() or not entry.is_dir():
            continue
        pid = entry.name[len(prefix):].split("-", 1)[0]
        if pid.isdigit() and not process_alive(int(pid)):
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


# -- what a model is ----------------------------------------------------------------------------

def check_model(path: Path) -> Path:
    """Return ``path`` if it is a loadable model, else raise ModelNotFoundError saying what is missing."""
    path = Path(path).expanduser()
    if not path.exists():
        raise ModelNotFoundError(f"model {path} does not exist; give a model directory, a .gguf file "
                                 "or a known model name")
    if path.is_file():
        with open(path, "rb") as f:
            if f.read(4) != b"GGUF":
                raise ModelNotFoundError(f"{path} is not a GGUF file; give a model directory or a .gguf file")
        return path
    missing = [name for name in REQUIRED_IR_FILES if not (path / name).is_file()]
    if missing:
        raise ModelNotFoundError(f"model directory {path} is incomplete (missing {', '.join(missing)}); "
                                 "convert it again with `ovchat convert`")
    return path


def context_length(path: Path) -> Optional[int]:
    """The model's trained context window, if the model says (config.json or GGUF metadata)."""
    path = Path(path)
    if path.is_file():
        meta = read_gguf_metadata(path, keys_ending=(".context_length",))
        values = [v for k, v in meta.items() if k.endswith(".context_length")]
        return int(values[0]) if values else None
    for name in (MANIFEST, "config.json"):
        try:
            data = json.loads((path / name).read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError):
            continue
        if not isinstance(data, dict):  # a damaged manifest: the manifest check reports it
            continue
        for key in ("context_length", "max_position_embeddings"):
            if isinstance(data.get(key), int):
                return data[key]
    return None


def read_gguf_metadata(path: Path, *, keys_ending: tuple = ()) -> Dict[str, Any]:
    """Read GGUF key/values (arrays are skipped). ``keys_ending`` limits which keys are kept."""
    from ovchat.gguffile import FormatError, GGUFFile

    try:
        gguf = GGUFFile(path, arrays=False, tensors=False)
    except FormatError as e:
        raise ModelNotFoundError(f"{e}; download it again") from None
    except OSError as e:
        raise ModelNotFoundError(f"{path} cannot be read ({e.strerror})") from None
    gguf.close()
    return {k: v for k, v in gguf.fields.items() if v is not None and (not keys_ending or k.endswith(keys_ending))}
