"""The typed errors of qwen3cli. Library code raises them; only the CLI renders them."""

from quant.errors import GGUFFormatError, QuantError, UnsupportedQuantType  # noqa: F401


class Qwen3CliError(Exception):
    """Base class: a problem with the user's input, worth one line and a non-zero exit."""


class ConfigError(Qwen3CliError):
    """config.json (or GGUF metadata) is missing, unreadable or describes an unsupported model."""


class CheckpointError(Qwen3CliError):
    """A Hugging Face checkpoint directory is missing files or holds wrong tensors."""


class OutputError(Qwen3CliError):
    """The output file cannot be written (exists, unwritable directory, ...)."""


USER_ERRORS = (Qwen3CliError, QuantError)
