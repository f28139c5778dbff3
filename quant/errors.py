"""Typed errors of the quant package. Messages name the file, tensor and problem."""


class QuantError(Exception):
    """Base class for every error raised by the quant package."""


class GGUFFormatError(QuantError):
    """A GGUF file is truncated, corrupt or not a GGUF file at all."""


class UnsupportedQuantType(QuantError):
    """A tensor uses a GGML type this project cannot encode or decode."""


class ImatrixError(QuantError):
    """An importance-matrix file is unreadable, malformed or does not fit the model."""
