"""A model's chat template vetted in a child process before ovchat renders it.

A chat template is a program (Jinja) that comes with the model file, and OpenVINO GenAI renders
it in C++ without limits: a macro that calls itself is a SIGSEGV of the whole process (the REPL,
the server), ``{{ 'x' * 10000000000 }}`` or nested ``range(100000)`` loops run for minutes and
take gigabytes. So before a model's template is used, it is rendered on a few short sample
conversations in a child process, with GenAI's own renderer and the model's own tokenizer, under
a time and a memory limit; a template that crashes it or breaks a limit is refused with one line
naming the model. A template that passed is remembered by its sha256 (``OVCHAT_HOME/cache``), so
the check costs about a second once per template, not per run.

What a sample conversation cannot reveal (a template that explodes only on some other input)
is not caught; the samples cover the shapes ovchat sends: a system prompt, turns, tools.

Run as ``python -m ovchat.templatecheck MODEL`` with the template on stdin, it is the child.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

from ovchat.errors import ModelLoadError

log = logging.getLogger(__name__)

TIME_LIMIT_S = 10.0  # the demo's check takes 0.4 s, tokenizer load included; a busy box, a few seconds
MEMORY_LIMIT = 1536 << 20  # resident bytes of the child, tokenizer included
_SAMPLES = [
    [{"role": "user", "content": "Hello!"}],
    [{"role": "system", "content": "You are helpful."}, {"role": "user", "content": "What is 2 + 2?"},
     {"role": "assistant", "content": "4."}, {"role": "user", "content": "And 3 + 3?"}],
]
_TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                            "parameters": {"type": "object", "properties": {
                                                "city": {"type": "string"}}, "required": ["city"]}}}]


def vet(model: Path, template: str, *, cache_dir: Optional[Path] = None, name: Optional[str] = None) -> None:
    """ModelLoadError unless ``template`` renders the sample conversations within the limits with
    ``model``'s tokenizer (``name``: what the message calls the model). Templates that passed
    before (by sha256, in ``cache_dir``) are not rendered again."""
    if not template:
        return
    digest = hashlib.sha256(template.encode("utf-8", "surrogatepass")).hexdigest()
    mark = cache_dir / f"{digest}.ok" if cache_dir is not None else None
    if mark is not None and mark.is_file():
        return
    problem = _render_in_child(Path(model), template)
    if problem is not None:
        raise ModelLoadError(f"the chat template of {name or model} {problem}; ovchat will not render it (fix or "
                             "remove tokenizer.chat_template, or use another copy of the model)")
    if mark is not None:
        try:
            mark.parent.mkdir(parents=True, exist_ok=True)
            mark.touch()
        except OSError as e:  # only the next check's second is lost
            log.info("could not remember the vetted template at %s: %s", mark, e.strerror)


def vet_model(model: Path, *, name: Optional[str] = None) -> None:
    """``vet`` the template a model carries (a store directory or a GGUF), if it has one."""
    from ovchat.store import chat_template, home

    vet(model, chat_template(model), cache_dir=home() / "cache" / "templates", name=name)


def _render_in_child(model: Path, template: str) -> Optional[str]:
    """None if the child rendered every sample; else what went wrong, as the end of a sentence."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    started = time.monotonic()
    try:
        child = subprocess.Popen([sys.executable, "-m", "ovchat.templatecheck", str(model)], stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    except OSError as e:
        raise ModelLoadError(f"could not start a process to check the chat template of {model} ({e.strerror})") \
            from None
    try:
        child.stdin.write(template.encode("utf-8", "surrogatepass"))
        child.stdin.close()
    except BrokenPipeError:
        pass
    peak = 0
    while child.poll() is None:
        peak = max(peak, _resident(child.pid))
        elapsed = time.monotonic() - started
        if peak > MEMORY_LIMIT or elapsed > TIME_LIMIT_S:
            child.kill()
            child.wait()
            if peak > MEMORY_LIMIT:
                return f"takes more than {MEMORY_LIMIT >> 20} MB to render a short conversation"
            return f"takes more than {TIME_LIMIT_S:.0f} s to render a short conversation"
        time.sleep(0.02)
    out, err = child.stdout.read(), child.stderr.read()
    child.stdout.close()
    child.stderr.close()
    if child.returncode < 0:
        import signal

        name = signal.Signals(-child.returncode).name if -child.returncode in signal.valid_signals() else \
            str(-child.returncode)
        return f"crashes the renderer ({name})"
    if child.returncode != 0:
        lines = err.decode("utf-8", "replace").strip().splitlines()
        return f"cannot be rendered ({lines[-1][:200] if lines else 'exit status ' + str(child.returncode)})"
    log.debug("chat template rendered: %s", out[:200])
    return None


def _resident(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0  # not Linux (the time limit still holds), or already gone


def _child(model: str) -> int:
    import openvino_genai

    template = sys.stdin.buffer.read().decode("utf-8", "surrogatepass")
    tokenizer = openvino_genai.Tokenizer(model)
    tokenizer.set_chat_template(template)
    lengths = []
    for sample in _SAMPLES:
        lengths.append(len(tokenizer.apply_chat_template(sample, add_generation_prompt=True)))
    try:
        lengths.append(len(tokenizer.apply_chat_template(_SAMPLES[0], add_generation_prompt=True, tools=_TOOLS)))
    except TypeError:  # a GenAI without tools in apply_chat_template
        pass
    print(json.dumps(lengths))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(_child(sys.argv[1]))
    except (RuntimeError, ValueError) as e:  # GenAI's errors: a template that does not parse or render
        print(next((line for line in str(e).splitlines() if line.strip()), type(e).__name__), file=sys.stderr)
        sys.exit(1)
