"""The one error hierarchy of ovchat.

Every expected failure is an ``OvchatError``: its message is a single line that says what went
wrong and how to fix it. The CLI turns these into a one-line error and a non-zero exit; anything
else is a bug.
"""


class OvchatError(Exception):
    """Base of every error ovchat raises on purpose."""


class ModelNotFoundError(OvchatError):
    """A model name, directory or file does not exist or is incomplete."""


class DamagedModelError(ModelNotFoundError):
    """A model directory whose manifest is unreadable or whose files no longer match it.
    ``problem`` is the short description of what is wrong (for lists of damaged models)."""

    def __init__(self, message: str, *, problem: str = ""):
        super().__init__(message)
        self.problem = problem or message


class ModelLoadError(OvchatError):
    """OpenVINO could not read or compile a model that looked complete."""


class GenerationError(OvchatError):
    """A loaded model failed while generating a reply, or the server generating it stopped it."""


class DeviceError(OvchatError):
    """A requested device is absent or unusable."""


class OptionError(OvchatError):
    """An invalid generation or command option."""


class InputError(OvchatError):
    """Unusable user input: an empty prompt, undecodable bytes, a bad conversation file."""


class ContextOverflowError(OvchatError):
    """A message cannot fit in the model's context window even on its own."""


class StorageError(OvchatError):
    """A file or directory could not be written or replaced: a full disk, no permission."""


class FetchError(OvchatError):
    """A model could not be downloaded from the package index or a hub."""


class ConversionError(OvchatError):
    """A checkpoint could not be converted."""


class CheckpointError(ConversionError):
    """A checkpoint is missing pieces, truncated, or of an unsupported kind."""


class UnsupportedArchitectureError(ConversionError):
    """The checkpoint's architecture has no builder in ovchat.convert.models."""


class OutputExistsError(ConversionError):
    """The output path exists and --force was not given."""


class RequestError(OvchatError):
    """A request to `ovchat serve` that cannot be served as sent, in domain terms: ``param`` names
    the request field at fault (or None), ``code`` is a short machine-readable reason. The
    server's engine and request schema raise these; only its HTTP layer knows status codes."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.param = param
        self.code = code


class InvalidRequestError(RequestError, InputError):
    """Malformed, out of range, unsupported, or too long for the context window (unusable input,
    whether it came from a client of the server or a caller of ChatSession)."""


class NoChatTemplateError(InvalidRequestError):
    """The model has no chat template (a base model), so it can continue text but not chat."""

    def __init__(self, model: str):
        super().__init__(f"{model} has no chat template (a base model?), so it cannot chat; continue a text "
                         "instead: ovchat run --raw, ChatSession.complete() or /v1/completions",
                         param="messages", code="no_chat_template")


class ServerBusyError(RequestError):
    """Every slot and every queue place is taken; retry shortly."""


class EngineUnavailableError(RequestError):
    """The model is loading, restarting after a crash, or the server is shutting down."""


class InsufficientMemoryError(RequestError):
    """A model cannot be loaded within the server's memory budget, even with every other model
    unloaded."""


class APIError(OvchatError):
    """An HTTP answer of `ovchat serve` other than a success, in OpenAI's error terms (the HTTP
    layer turns RequestErrors into these).

    ``status`` is the HTTP status, ``param`` the request field at fault (or None), ``code`` a
    short machine-readable reason and ``kind`` OpenAI's error ``type``.
    """

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error", headers: dict | None = None):
        super().__init__(message)
        self.status = status
        self.param = param
        self.code = code
        self.kind = kind
        self.headers = headers or {}


def summary(error: BaseException) -> str:
    """The informative line of an OpenVINO exception (they carry source paths and check lines)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    informative = [line for line in lines if not line.startswith(("Exception from", "Check ", "["))]
    return (informative or lines or [type(error).__name__])[-1][:300]
