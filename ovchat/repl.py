"""The interactive chat loop of ``ovchat chat``: terminal input and output only.

Everything about the conversation itself lives in ChatSession; this module reads lines, runs the
/commands and streams replies. Ctrl-C during a reply stops it (the partial reply stays in the
conversation); Ctrl-C or Ctrl-D at an empty prompt ends the loop.
"""

from __future__ import annotations

import sys
from typing import Callable, Dict, List, Optional, TextIO

from ovchat.session import ChatSession
from ovchat.errors import OvchatError
from ovchat.render import format_metrics
from ovchat.store import history_file

MULTILINE = '"""'
HELP = """\
/help              show this help
/clear             forget the conversation (the system prompt stays)
/system [TEXT]     show, or set, the system prompt
/set [KEY VALUE]   show the options, or set one (e.g. /set temperature 0.7)
/stats             metrics of the last reply and context window usage
/save FILE         save the conversation as JSON
/load FILE         load a conversation saved with /save
/bye               exit (also Ctrl-D, or Ctrl-C at an empty prompt)
Enclose multi-line input in \"\"\" lines. Ctrl-C stops a reply."""


class Repl:
    """Read-eval-print loop over a ChatSession. ``run()`` returns the exit status."""

    def __init__(self, session: ChatSession, *, notice: Callable[[str], None],
                 stdin: TextIO = sys.stdin, stdout: TextIO = sys.stdout):
        self.session = session
        self.notice = notice
        self.stdin = stdin
        self.stdout = stdout
        self.interactive = stdin.isatty()
        self._commands: Dict[str, Callable[[str], Optional[bool]]] = {
            "/help": self._help, "/?": self._help, "/clear": self._clear, "/system": self._system,
            "/set": self._set, "/stats": self._stats, "/save": self._save, "/load": self._load,
            "/bye": self._bye, "/exit": self._bye, "/quit": self._bye,
        }

    def run(self) -> int:
        self._setup_history()
        if self.interactive:
            self.stdout.write("Type a message, /help for commands, /bye to leave.\n")
        try:
            while True:
                try:
                    text = self._read_message()
                except (EOFError, KeyboardInterrupt):
                    if self.interactive:
                        self.stdout.write("\n")
                    return 0
                if text is None:
                    continue
                if text.startswith("/"):
                    if self._command(text):
                        return 0
                    continue
                self._reply(text)
        finally:
            self._save_history()

    # -- input ----------------------------------------------------------------------------

    def _readline(self, prompt: str) -> str:
        if self.interactive:
            return input(prompt)  # readline editing and history
        line = self.stdin.readline()
        if not line:
            raise EOFError
        return line.rstrip("\n")

    def _read_message(self) -> Optional[str]:
        """One message: a line, or the lines between two \"\"\" lines. None for a blank line."""
        line = self._readline(">>> ")
        if not line.lstrip().startswith(MULTILINE):
            return line.strip() or None
        first = line.lstrip()[len(MULTILINE):]
        if first.rstrip().endswith(MULTILINE):
            return first.rstrip()[:-len(MULTILINE)].strip() or None
        lines: List[str] = [first] if first else []
        while True:
            line = self._readline("... ")
            if line.rstrip().endswith(MULTILINE):
                lines.append(line.rstrip()[:-len(MULTILINE)])
                break
            lines.append(line)
        return "\n".join(lines).strip() or None

    # -- replies --------------------------------------------------------------------------

    def _reply(self, text: str) -> None:
        try:
            chunks = self.session.stream(text)
        except OvchatError as e:
            self.notice(f"error: {e}")
            return
        ended_with_newline = True
        try:
            for chunk in chunks:
                self.stdout.write(chunk)
                self.stdout.flush()
                ended_with_newline = chunk.endswith("\n")
        except KeyboardInterrupt:
            chunks.close()  # stops generation; the partial reply stays in the conversation
            self.stdout.write("\n")
            self.stdout.flush()
            self.notice("reply stopped")
            return
        except OvchatError as e:
            self.notice(f"error: {e}")
        if not ended_with_newline:
            self.stdout.write("\n")
        self.stdout.write("\n")
        self.stdout.flush()

    # -- commands -------------------------------------------------------------------------

    def _command(self, text: str) -> bool:
        """Run a /command; True means leave the loop."""
        name, _, arg = text.partition(" ")
        handler = self._commands.get(name.lower())
        if handler is None:
            self.notice(f"unknown command {name}; /help lists the commands")
            return False
        try:
            return bool(handler(arg.strip()))
        except OvchatError as e:
            self.notice(f"error: {e}")
            return False

    def _say(self, text: str) -> None:
        self.stdout.write(text + "\n")
        self.stdout.flush()

    def _help(self, _: str) -> None:
        self._say(HELP)

    def _clear(self, _: str) -> None:
        self.session.reset()
        self._say("Conversation cleared.")

    def _system(self, arg: str) -> None:
        if not arg:
            self._say(f"System prompt: {self.session.system or '(none)'}")
            return
        self.session.set_system(arg)
        self._say("System prompt set.")

    def _set(self, arg: str) -> None:
        if not arg:
            for key, value in self.session.options.as_dict().items():
                self._say(f"{key} = {value}")
            return
        key, _, value = arg.partition(" ")
        if not value.strip():
            self.notice("usage: /set KEY VALUE (/set alone shows the options)")
            return
        self.session.options = self.session.options.with_text_value(key, value.strip())
        self._say(f"Set {key.replace('-', '_')} = {getattr(self.session.options, key.replace('-', '_'))}")

    def _stats(self, _: str) -> None:
        self._say(format_metrics(self.session.last_metrics, context_used=self.session.context_used(),
                                 context_limit=self.session.context_limit))

    def _save(self, arg: str) -> None:
        if not arg:
            self.notice("usage: /save FILE")
            return
        self.session.save(arg)
        self._say(f"Saved the conversation to {arg}.")

    def _load(self, arg: str) -> None:
        if not arg:
            self.notice("usage: /load FILE")
            return
        self.session.load(arg)
        turns = sum(1 for m in self.session.messages if m["role"] == "user")
        self._say(f"Loaded {turns} turn{'s' if turns != 1 else ''} from {arg}.")

    def _bye(self, _: str) -> bool:
        return True

    # -- readline history -----------------------------------------------------------------

    def _setup_history(self) -> None:
        if not self.interactive:
            return
        try:
            import readline
        except ImportError:  # not on every platform
            return
        readline.set_history_length(1000)
        try:
            readline.read_history_file(history_file())
        except OSError:
            pass  # no history yet

    def _save_history(self) -> None:
        if not self.interactive:
            return
        try:
            import readline

            history_file().parent.mkdir(parents=True, exist_ok=True)
            readline.write_history_file(history_file())
        except (ImportError, OSError):
            pass  # history is a convenience; never fail the session over it
