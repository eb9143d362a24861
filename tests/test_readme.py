"""Every code example of the README, run as written (a doctest-style runner over its ```bash and
```python blocks), on the demo model and the other models of the known-names table.

A block is run unless the HTML comment right above it says otherwise; each block must have one,
so a new example cannot slip by unrun:

    <!-- readme-test: run -->                 run it as it is
    <!-- readme-test: skip: REASON -->        not run, and why (the install, servers that run until
                                              stopped, benchmarks of hours)
    <!-- readme-test: server -->              run with `ovchat serve --api-key change-me` up; its
                                              address replaces http://127.0.0.1:8000
    <!-- readme-test: continue -->            a Python block run after the one before, in its process
    <!-- readme-test: expect: TEXT -->        its output must contain TEXT (repeatable, with |)

Blocks run in a scratch directory holding what the examples name: ``notes.txt`` (three household
notes, one a line), ``hf-checkpoint/`` (a tiny random llama with the demo's tokenizer) and the
demo's GGUF. The `python` and `ovchat` on PATH are this test run's.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

import pytest

from convert_helpers import demo_gguf  # noqa: F401
from server_helpers import start_server

pytestmark = pytest.mark.slow

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCK = re.compile(r"(?:<!-- readme-test: (?P<directive>.*?) -->\n)?```(?P<lang>bash|python)\n(?P<code>.*?)```", re.S)
NOTES = ("The boiler's pressure should read between 1 and 1.5 bar when it is cold.\n"
         "The wifi password is printed on the underside of the router.\n"
         "The recycling bins go out on Tuesday evening, the general waste on Friday.\n")


@dataclass
class Example:
    line: int
    lang: str
    code: str
    directive: Optional[str]
    expect: List[str] = field(default_factory=list)

    @property
    def skip(self) -> Optional[str]:
        d = self.directive or ""
        return d.split(":", 1)[1].strip() if d.startswith("skip:") else None

    def has(self, word: str) -> bool:
        return word in [part.strip() for part in (self.directive or "").split("|")]


def examples() -> List[Example]:
    text = README.read_text(encoding="utf-8")
    found = []
    for m in BLOCK.finditer(text):
        directive = m.group("directive")
        expect = [p.split(":", 1)[1].strip() for p in (directive or "").split("|") if p.strip().startswith("expect:")]
        found.append(Example(text[:m.start("lang")].count("\n"), m.group("lang"), m.group("code"), directive, expect))
    return found


def test_every_example_says_how_it_is_tested():
    missing = [e.line for e in examples() if e.directive is None]
    assert not missing, f"README code blocks at lines {missing} have no <!-- readme-test: ... --> comment"
    assert all(e.skip for e in examples() if (e.directive or "").startswith("skip")), "a skip needs a reason"


@pytest.fixture(scope="module")
def scratch(tmp_path_factory, demo_gguf, demo_model, qwen_model):  # noqa: F811
    from convert_helpers import llama_tensors, tiny_llama_config, write_hf_checkpoint

    from ovchat.store import pull

    pull("all-mpnet-base-v2", receipt=False)  # the server examples embed with it (the README pulls it by then)
    directory = tmp_path_factory.mktemp("readme")
    (directory / "notes.txt").write_text(NOTES)
    config = tiny_llama_config()
    write_hf_checkpoint(directory / "hf-checkpoint", config, llama_tensors(config), tokenizer_from=demo_gguf)
    shutil.copyfile(demo_gguf, directory / demo_gguf.name)
    return directory


@pytest.fixture(scope="module")
def server(scratch):
    s = start_server(None, "--api-key", "change-me")
    yield s
    s.proc.kill()


def _run(example: Example, code: str, directory: Path, url: Optional[str]) -> str:
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""),
               OVCHAT_API_KEY="change-me", PYTHONUNBUFFERED="1")
    env.pop("OVCHAT_NO_SERVER", None)
    if url is not None:
        code = code.replace("http://127.0.0.1:8000", url)
    command = ["bash", "-e", "-o", "pipefail", "-c", code] if example.lang == "bash" else [sys.executable, "-c", code]
    done = subprocess.run(command, cwd=directory, env=env, capture_output=True, timeout=900)
    out, err = done.stdout.decode("utf-8", "replace"), done.stderr.decode("utf-8", "replace")
    assert done.returncode == 0 and "Traceback" not in err, f"README line {example.line}:\n{code}\n{out}\n{err}"
    for text in example.expect:
        assert text in out, f"README line {example.line}: {text!r} not in the output:\n{out}\n{err}"
    return out


def _runnable() -> List[Example]:
    found = examples()
    return [e for i, e in enumerate(found) if not e.skip
            and not any(later.has("continue") for later in found[i + 1:i + 2])]


@pytest.mark.parametrize("example", _runnable(), ids=lambda e: f"line{e.line}")
def test_the_example_runs(example, scratch, request):
    found = examples()
    at = next(i for i, e in enumerate(found) if e.line == example.line)
    # A block followed by "continue" blocks runs with them, in one process.
    code = example.code
    chain = [example]
    while at > 0 and found[at].has("continue"):
        at -= 1
        code = found[at].code + "\n" + code
        chain.insert(0, found[at])
    expected = Example(example.line, example.lang, code, example.directive,
                       [t for e in chain for t in e.expect])
    url = request.getfixturevalue("server").url if any(e.has("server") for e in chain) else None
    _run(expected, code, scratch, url)
