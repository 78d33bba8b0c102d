"""Typed errors of mesh. Every error carries a one-line message and a hint for the user."""

from __future__ import annotations

__all__ = ["MeshError", "ModelNotFound", "ModelLoadError", "UnsupportedArchitecture", "SpanOutOfRange",
           "MaxLengthExceeded", "BadRequest", "CacheTrimmed", "Rewind"]


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
    """The model reference resolves to nothing (no folder, file, alias or reachable repo)."""

    code = "not_found"


class ModelLoadError(MeshError):
    """The model was found but its files cannot be read as a model."""

    code = "load_error"


class UnsupportedArchitecture(MeshError):
    """A model family mesh has no layer adapter for (see model/compat.py)."""

    code = "unsupported"


class SpanOutOfRange(MeshError):
    """Blocks outside the model's 0..num_blocks."""

    code = "bad_request"


class MaxLengthExceeded(MeshError):
    """A session would hold more tokens than it was opened for."""

    code = "max_length"


class BadRequest(MeshError):
    """Input that breaks the rules: a peer's frame, a user's option or file row."""

    code = "bad_request"


class CacheTrimmed(MeshError):
    """A rollback deeper than a windowed layer's cache still holds: the tokens must be replayed instead."""

    code = "cache_trimmed"


class Rewind(MeshError):
    """The blocks' outputs from cache position `position` on were found wrong (a server lied) and the
    caches are being rebuilt: whoever runs the blocks feeds again from there."""

    code = "rewind"

    def __init__(self, position: int, message: str = "") -> None:
        super().__init__(message or f"outputs from position {position} on were wrong; feeding again from there")
        self.position = position
