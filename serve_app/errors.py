"""Exceptions that carry meaning. One handler in the HTTP layer maps them to status codes.

They are plain Python (no Ray, no FastAPI) so the generator and persistence deployments can
raise them; Ray re-raises a replica's exception at the caller as a subclass of the original
class, so `except ServeError` works across a `DeploymentHandle` call.
"""

from __future__ import annotations


class ServeError(Exception):
    """Base of every error the API reports on purpose."""

    status_code: int = 500
    error_type: str = "internal_error"

    def __init__(self, message: str, **details: object) -> None:
        super().__init__(message)
        self.message = message
        self.details = details

    def __reduce__(self):  # keep details across Ray's pickling
        return (_rebuild, (type(self), self.message, self.details))


def _rebuild(cls: type[ServeError], message: str, details: dict) -> ServeError:
    return cls(message, **details)


class InvalidRequestError(ServeError):
    status_code = 400
    error_type = "invalid_request"


class ForbiddenContentError(ServeError):
    status_code = 400
    error_type = "forbidden_content"


class InvalidCursorError(ServeError):
    status_code = 400
    error_type = "invalid_cursor"


class UnauthorizedError(ServeError):
    status_code = 401
    error_type = "unauthorized"


class ForbiddenError(ServeError):
    status_code = 403
    error_type = "forbidden"


class UnknownModelError(ServeError):
    status_code = 404
    error_type = "unknown_model"


class NotFoundError(ServeError):
    status_code = 404
    error_type = "not_found"


class PromptTooLongError(ServeError):
    """The prompt and the tokens asked for do not fit the model's context (counts in the
    message): bad input, so a 400."""

    status_code = 400
    error_type = "prompt_too_long"


class RecordRefusedError(ServeError):
    """The database refused to store this one answer (a constraint or a value it cannot hold):
    only its own request fails, with a 4xx; the rows committed with it are unaffected."""

    status_code = 422
    error_type = "unstorable"


class ModelUnavailableError(ServeError):
    """The model's source cannot be loaded and no stand-in is allowed."""

    status_code = 503
    error_type = "model_unavailable"


class GenerationFailedError(ServeError):
    """An unexpected failure while generating: logged in full where it happened, reported to
    the client without internals."""

    status_code = 500
    error_type = "internal_error"


class GeneratorUnavailableError(ServeError):
    """The generator replica cannot take the request (its decode loop has stopped): Ray replaces
    the replica; the client may retry."""

    status_code = 503
    error_type = "generator_unavailable"


class OverloadedError(ServeError):
    """Refused before any model work because the generator's queue is full: the client should
    retry after `retry_after_s` (sent as the Retry-After header)."""

    status_code = 503
    error_type = "overloaded"


class RateLimitedError(ServeError):
    """The caller spent its request budget; `retry_after_s` says when a request is allowed."""

    status_code = 429
    error_type = "rate_limited"


class UpstreamTimeoutError(ServeError):
    """A deployment the ingress called did not answer within its timeout."""

    status_code = 504
    error_type = "timeout"


class DependencyUnavailableError(ServeError):
    status_code = 503
    error_type = "dependency_unavailable"
