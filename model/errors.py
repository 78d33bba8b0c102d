"""Typed errors of mesh. Every error carries a one-line message and a hint for the user."""

from __future__ import annotations

__all__ = ["MeshError", "ModelNotFound", "ModelLoadError", "UnsupportedArchitecture", "SpanOutOfRange",
           "MaxLengthExceeded", "BadRequest"]


class MeshError(Exception):
    """Base of every error mesh raises on purpose; `code` travels on the wire."""

    code = "internal"

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.hint = hint

    def one_line(self) -> str:
        text = str(self).splitlines()[0] if str(self) else type(self).__name__
        return f"{text} ({self.hint})" if self.hint else text


class ModelNotFound(MeshError):
    code = "not_found"


class ModelLoadError(MeshError):
    code = "load_error"


class UnsupportedArchitecture(MeshError):
    code = "unsupported"


class SpanOutOfRange(MeshError):
    code = "bad_request"


class MaxLengthExceeded(MeshError):
    code = "max_length"


class BadRequest(MeshError):
    code = "bad_request"
