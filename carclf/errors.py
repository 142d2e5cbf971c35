"""One error hierarchy for the whole product.

Model logic raises these; each transport maps them once (``serving.rest`` to HTTP codes,
``serving.grpc_service`` to gRPC codes, the clients back from both). Codes follow
``google.rpc.Code`` names, as TF Serving's own errors do.
"""

from __future__ import annotations

import re


class CarClfError(Exception):
    """Base class. ``code`` is the canonical status name shared by gRPC and REST."""

    code = "INTERNAL"

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class InvalidInput(CarClfError):
    """The request (or a file, or a value) is malformed: the caller must change it."""

    code = "INVALID_ARGUMENT"


class ConfigError(InvalidInput):
    """A configuration file or value is invalid. The message names the file, field and value."""

    def __init__(self, message: str, *, source: str | None = None, field: str | None = None):
        prefix = ""
        if source:
            prefix += f"{source}: "
        if field:
            prefix += f"field '{field}': "
        super().__init__(prefix + message)
        self.source = source
        self.field = field
        self.detail = message  # without the source and field, for a caller that names them itself


class NotFound(CarClfError):
    """An unknown model, version, label or signature."""

    code = "NOT_FOUND"


class FailedPrecondition(CarClfError):
    """The system is not in a state that allows the request (e.g. label on an unloaded version)."""

    code = "FAILED_PRECONDITION"


class Unavailable(CarClfError):
    """Nothing can answer right now (no version loaded, server draining, member down); retry later."""

    code = "UNAVAILABLE"


class ResourceExhausted(CarClfError):
    """A queue or size limit was hit."""

    code = "RESOURCE_EXHAUSTED"


class RequestTooLarge(ResourceExhausted):
    """A request over the server's size limit (``--max_request_bytes``; REST 413): unlike a full queue,
    sending it again will not help, sending less at once will."""


class DeadlineExceeded(CarClfError):
    """The request ran out of time."""

    code = "DEADLINE_EXCEEDED"


class Unimplemented(CarClfError):
    """The server does not offer this method for this model."""

    code = "UNIMPLEMENTED"


class Cancelled(CarClfError):
    code = "CANCELLED"


class Internal(CarClfError):
    code = "INTERNAL"


ERRORS_BY_CODE: dict[str, type[CarClfError]] = {
    cls.code: cls
    for cls in (
        InvalidInput,
        NotFound,
        FailedPrecondition,
        Unavailable,
        ResourceExhausted,
        DeadlineExceeded,
        Unimplemented,
        Cancelled,
        Internal,
    )
}


def error_for_code(code: str, message: str) -> CarClfError:
    """Build the typed error for a canonical code name (unknown names become Internal)."""
    return ERRORS_BY_CODE.get(code, Internal)(message)


def runtime_message(message: str) -> str:
    """The line of a TensorFlow runtime error that says what went wrong, without the "Detected at node"
    stack, the node lines, the ``{{function_node ...}}`` prefix and the ``[Op:...]`` / empty ``name:`` suffix
    (those name server files and devices, not the caller's mistake)."""
    lines = [line.strip() for line in message.splitlines()]
    node = next((i for i, line in enumerate(lines) if line.startswith("[[")), len(lines))
    text = next((line for line in reversed(lines[:node]) if line), "") or next((x for x in lines if x), "")
    text = re.sub(r"\{\{function_node [^}]*\}\}\s*", "", text)  # the eager op's wrapper and device
    return re.sub(r"\s*\[Op:[^\]]*\]|\s*\bname:\s*$", "", text)


def os_error_line(exc: OSError) -> str:
    """One line for an OSError a command could not foresee (a folder where a file was expected, no
    permission, a full disk): what failed, and on which path."""
    if isinstance(exc, FileNotFoundError):
        return f"no such file or folder: {exc.filename}"
    where = f": {exc.filename}" if exc.filename else ""
    return f"{exc.strerror or exc}{where}"
