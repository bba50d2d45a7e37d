"""Why the broker refuses a request: domain errors, each with a stable ``code``.

The codes are part of the API (docs/api.md). Which HTTP status answers each error is
decided in one place, :data:`ctxd.api.STATUS`.
"""

from typing import Optional


class RequestError(Exception):
    """A request the broker refuses; ``code`` and ``message`` go to the client."""

    code = "bad_request"

    def __init__(self, message: str, code: Optional[str] = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code


class BadRequest(RequestError):
    code = "bad_request"


class InvalidName(RequestError):
    code = "invalid_name"


class InvalidCluster(RequestError):
    code = "invalid_cluster"


class Unauthorized(RequestError):
    code = "unauthorized"


class Forbidden(RequestError):
    code = "forbidden"


class NotFound(RequestError):
    code = "not_found"


class MethodNotAllowed(RequestError):
    code = "method_not_allowed"


class Conflict(RequestError):
    code = "conflict"


class QuotaExceeded(RequestError):
    code = "quota_exceeded"


class IdentityConflict(RequestError):
    """A node claims a name, address or key that another node of its context holds."""

    code = "identity_conflict"


class IdentityRefused(RequestError):
    """A node claims what it may not: an address it does not speak from, a name outside the domain."""

    code = "identity_refused"


class CertificateRefused(RequestError):
    """A node asked for a certificate it may not have (a name not its own, a bad signature)."""

    code = "certificate_refused"


class JoinTokenExpired(RequestError):
    code = "join_token_expired"


class TooLarge(RequestError):
    code = "body_too_large"


class UnsupportedMediaType(RequestError):
    code = "unsupported_media_type"


class TooManyRequests(RequestError):
    code = "rate_limited"

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class InternalError(RequestError):
    """Anything unexpected: logged with its traceback, answered without one."""

    code = "internal_error"


class Unavailable(RequestError):
    code = "unavailable"
