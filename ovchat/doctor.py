"""Health checks for `ovchat doctor`: package versions, devices, the store and the cache."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

from ovchat import store
from ovchat.machine import installed_versions
from ovchat.units import human_size

RUNTIME = ("openvino", "openvino-genai", "openvino-tokenizers")
OPTIONAL = ("nncf", "gguf", "transformers", "huggingface-hub")
MIN_FREE_BYTES = 1 << 30


@dataclass(frozen=True)
class Check:
    """One line of the report; ``ok`` False makes `ovchat doctor` exit non-zero, None is informative."""

    name: str
    detail: str
    ok: Optional[bool] = True


def release_line(version: str) -> str:
    """'2026.4.1.0' and '2026.4.1' are one release: compare the first three numbers."""
    return ".".join(version.split(".")[:3])


def run_checks() -> List[Check]:
    checks: List[Check] = []
    versions = installed_versions(RUNTIME)
    missing = [d for d, v in versions.items() if v is None]
    lines = {release_line(v) for v in versions.values() if v}
    detail = ", ".join(f"{d} {v or 'missing'}" for d, v in versions.items())
    if missing:
        checks.append(Check("runtime", f"{detail}; reinstall ovchat", False))
    elif len(lines) > 1:
        checks.append(Check("runtime", f"{detail}: different releases; reinstall ovchat so they match", False))
    else:
        checks.append(Check("runtime", f"{detail} (one release)"))
    extras = ", ".join(f"{d} {v or 'not installed'}" for d, v in installed_versions(OPTIONAL).items())
    checks.append(Check("extras", extras, None))
    try:
        import openvino as ov

        devices = list(ov.Core().available_devices)
        checks.append(Check("devices", ", ".join(devices) or "none", bool(devices)))
    except (ImportError, RuntimeError) as e:
        checks.append(Check("devices", f"OpenVINO could not start: {e}", False))
    home = store.home()
    existing = next((p for p in (home, *home.parents) if p.exists()), Path("/"))
    free = shutil.disk_usage(existing).free
    writable = os.access(existing, os.W_OK)
    entries = store.list_entries()
    checks.append(Check("store", f"{home} ({len(entries)} model{'s' if len(entries) != 1 else ''}, "
                                 f"{human_size(free)} free)", writable and free >= MIN_FREE_BYTES))
    if not writable:
        checks.append(Check("store", f"{existing} is not writable; set OVCHAT_HOME to a writable directory", False))
    elif free < MIN_FREE_BYTES:
        checks.append(Check("store", f"less than {human_size(MIN_FREE_BYTES)} free: pulls will fail", False))
    for entry in entries:
        problems = store.entry_problems(entry, full=True)
        if problems:
            checks.append(Check(f"model {entry.name}", f"damaged: {problems[0]}; repair: {entry.repair}", False))
    total, unused = store.downloads_size()
    checks.append(Check("downloads", f"{store.downloads_dir()} ({human_size(total)}"
                        + (f", {human_size(unused)} used by no model: ovchat prune)" if unused else ")"), None))
    cache = store.compile_cache_dir()
    cache_size = sum(f.stat().st_size for f in cache.rglob("*") if f.is_file()) if cache.is_dir() else 0
    checks.append(Check("compile cache", f"{cache} ({human_size(cache_size)})", None))
    checks.append(Check("default model", store.default_model(), None))
    return checks

