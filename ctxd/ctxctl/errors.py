"""ctxctl's errors and exit codes: every failure ends as one line and an exit code."""

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_TIMEOUT = 3
EXIT_INTERRUPTED = 130


class CliError(Exception):
    """A failure reported as one ``ctxctl: error: ...`` line with ``exit_code``."""

    def __init__(self, message: str, exit_code: int = EXIT_ERROR) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class BrokerRefusal(CliError):
    """The broker answered with an error object (``{"error": code, "message": ...}``)."""

    def __init__(self, status: int, code: str, message: str, hint: str = "") -> None:
        super().__init__(f"broker: {message} ({code}, HTTP {status}){hint}")
        self.status = status
        self.code = code


class BrokerUnavailable(CliError):
    """No usable answer (connection refused, timeout, 5xx): ``wait`` retries these."""


def reason(e: BaseException) -> str:
    """Why an operation failed, in a few words (an OSError's strerror)."""
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return " ".join(str(e).split()) or type(e).__name__
