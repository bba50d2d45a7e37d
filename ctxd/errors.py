"""Domain errors of the broker, each mapped to an HTTP status and a stable code."""


class BrokerError(Exception):
    """A request the broker refuses; ``status``/``code`` go to the client."""

    status = 400
    code = "bad_request"

    def __init__(self, message: str, code: str = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code


class BadRequest(BrokerError):
    status = 400
    code = "bad_request"


class InvalidName(BrokerError):
    status = 400
    code = "invalid_name"


class InvalidCluster(BrokerError):
    status = 400
    code = "invalid_cluster"


class Unauthorized(BrokerError):
    status = 401
    code = "unauthorized"


class Forbidden(BrokerError):
    status = 403
    code = "forbidden"


class NotFound(BrokerError):
    status = 404
    code = "not_found"


class MethodNotAllowed(BrokerError):
    status = 405
    code = "method_not_allowed"


class Conflict(BrokerError):
    status = 409
    code = "conflict"


class QuotaExceeded(BrokerError):
    status = 409
    code = "quota_exceeded"


class TooManyRequests(BrokerError):
    status = 429
    code = "rate_limited"

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class Gone(BrokerError):
    status = 410
    code = "join_token_expired"


class TooLarge(BrokerError):
    status = 413
    code = "body_too_large"


class UnsupportedMediaType(BrokerError):
    status = 415
    code = "unsupported_media_type"


class Unavailable(BrokerError):
    status = 503
    code = "unavailable"
