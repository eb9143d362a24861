"""The one error hierarchy of ovchat.

Every expected failure is an ``OvchatError``: its message is a single line that says what went
wrong and how to fix it. The CLI turns these into a one-line error and a non-zero exit; anything
else is a bug.
"""


class OvchatError(Exception):
    """Base of every error ovchat raises on purpose."""


class ModelNotFoundError(OvchatError):
    """A model name, directory or file does not exist or is incomplete."""


class ModelLoadError(OvchatError):
    """OpenVINO could not read or compile a model that looked complete."""


class DeviceError(OvchatError):
    """A requested device is absent or unusable."""


class OptionError(OvchatError):
    """An invalid generation or command option."""


class InputError(OvchatError):
    """Unusable user input: an empty prompt, undecodable bytes, a bad conversation file."""


class ContextOverflowError(OvchatError):
    """A message cannot fit in the model's context window even on its own."""


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
