"""What a call to the Clado API can fail with: the typed errors callers catch, and `Transient`,
the client's own signal that an attempt may be retried."""

from __future__ import annotations


class CladoError(Exception):
    """Anything the API call could not do. Messages never contain the API key."""

    # True when a call that is never repeated (initiate, continue) failed after it may have
    # reached the API: whatever it started may be running and billing.
    maybe_sent = False


class InvalidJobId(CladoError, ValueError):
    pass


class ApiKeyRejected(CladoError):
    pass


class JobNotFound(CladoError):
    pass


class CreditsUnavailable(CladoError):
    """404 from /api/credits: the API could not say (not a job that is missing)."""


class OutOfCredits(CladoError):
    pass


class RequestRejected(CladoError):
    """A 4xx other than 401/402/404/409/429: retrying the same request will not help."""

    def __init__(self, status_code: int, message: str) -> None:
        super().__init__(f"HTTP {status_code}: {message}")
        self.status_code = status_code


class ApiUnavailable(CladoError):
    """Transient failures outlasted the retries (API down, throttling, garbage)."""


class UnreadableBody(ApiUnavailable):
    """The API answered, but not with anything the docs describe (worth an alert: the API
    may have changed under us). Retried like any transient failure first."""


class BodyTooLarge(UnreadableBody):
    """An answer over the client's body bound (refused unread): a smaller page may fit."""


class NoStatus(UnreadableBody):
    """A status answer that is JSON but carries no readable `status` field."""


class RateLimited(ApiUnavailable):
    """The client is held off by the API's rate limit for longer than this call may wait."""

    def __init__(self, message: str, retry_in: float) -> None:
        super().__init__(message)
        self.retry_in = retry_in


class Transient(Exception):
    """A failure worth retrying. `sent=False` when the server certainly did not act on it;
    `held` when it started a client-wide hold-off (which is then the wait before a retry);
    `error` is what it becomes once the retries are used up."""

    def __init__(
        self,
        reason: str,
        *,
        sent: bool = True,
        held: bool = False,
        throttled: bool = False,
        error: type[ApiUnavailable] = ApiUnavailable,
    ) -> None:
        super().__init__(reason)
        self.sent = sent
        self.held = held
        self.throttled = throttled
        self.error = error


def unreadable(reason: str, error: type[UnreadableBody] = UnreadableBody) -> Transient:
    """An answer the docs do not describe: retried, then an `UnreadableBody` (or `error`)."""
    return Transient(reason, error=error)
