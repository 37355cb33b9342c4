"""Every failure a user can see, and its one mapping to exit codes and HTTP answers.

A failure ends as a SupervisorError: its class gives the CLI's exit code (1 runtime failure,
2 bad usage, config or input), the admin API's status, its stable `code` and the `title` of
its RFC 9457 problem type; `str()` is the CLI's one line and `public` the admin API's
`detail` (which names no database detail).
The failures of the layers below (config, job ids, admission, the Clado API, the database)
are translated by the one table, RULES; the CLI and the admin API both call `translate`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar


class SupervisorError(Exception):
    exit_code: ClassVar[int] = 1
    status: ClassVar[int] = 500
    code: ClassVar[str] = "internal_error"
    title: ClassVar[str] = "Internal error"  # the same for every answer of this code

    def __init__(self, message: str, *, public: str | None = None) -> None:
        super().__init__(message)
        self.public = message if public is None else public


class BadInput(SupervisorError):
    """The request or the command line is wrong; `field` names what, `problem` says why."""

    exit_code, status, code, title = 2, 422, "invalid_request", "Invalid request"

    def __init__(self, problem: str, *, field: str | None = None, public: str | None = None) -> None:
        super().__init__(f"{field}: {problem}" if field else problem, public=public)
        self.field, self.problem = field, problem


class InvalidJson(BadInput):
    status, code, title = 400, "invalid_json", "The body is not valid JSON"


class PayloadTooLarge(BadInput):
    status, code, title = 413, "payload_too_large", "Payload too large"


class UnsupportedMediaType(BadInput):
    """A request body that does not say it is JSON (Content-Type)."""

    status, code, title = 415, "unsupported_media_type", "Unsupported media type"


class MethodNotAllowed(BadInput):
    status, code, title = 405, "method_not_allowed", "Method not allowed"


class RequestTimeout(BadInput):
    """A body too slow to arrive (the admin server's own answer, not a use case's)."""

    status, code, title = 408, "request_timeout", "Request timeout"


class Unauthorized(SupervisorError):
    exit_code, status, code, title = 2, 401, "unauthorized", "Unauthorized"


class AdminApiDisabled(SupervisorError):
    exit_code, status, code, title = 2, 403, "admin_api_disabled", "The admin API has no token configured"


class NotFound(SupervisorError):
    exit_code, status, code, title = 2, 404, "not_found", "Not found"


class JobNotTracked(NotFound):
    code, title = "job_not_found", "Job not tracked"

    def __init__(self, job_id: str) -> None:
        super().__init__(f"job {job_id} is not tracked")


class Refused(SupervisorError):
    """Admission said no (a budget or the account floor); the message has the numbers."""

    exit_code, status, code, title = 2, 409, "admission_refused", "Admission refused"


class Unavailable(SupervisorError):
    """Something this process depends on is down; trying again later may work."""

    exit_code, status, code, title = 1, 503, "unavailable", "Service unavailable"


class DatabaseUnavailable(Unavailable):
    code, title = "database_unavailable", "Database unavailable"


class SchedulerStopped(Unavailable):
    code, title = "scheduler_stopped", "The scheduler is not running"


class UpstreamFailed(SupervisorError):
    """The Clado API could not do what was asked (a gateway failure for the admin API)."""

    exit_code, status, code, title = 1, 502, "api_unavailable", "The Clado API failed"


class UpstreamKeyRejected(UpstreamFailed):
    code, title = "api_key_rejected", "The Clado API rejected the API key"


class UpstreamOutOfCredits(UpstreamFailed):
    status, code, title = 402, "out_of_credits", "The Clado account is out of credits"


class UpstreamRejected(UpstreamFailed):
    """The API refused this request (a 4xx): the caller's problem, not a gateway fault."""

    status, code, title = 422, "request_rejected", "The Clado API rejected the request"


class Internal(SupervisorError):
    """A bug or an unexpected failure: the admin API says only where to look."""

    exit_code, status, code, title = 1, 500, "internal_error", "Internal error"

    def __init__(self, message: str, *, public: str | None = None) -> None:
        super().__init__(message, public=public or "the request failed; see the supervisor's log")


@dataclass(frozen=True)
class Rule:
    error: type[SupervisorError]
    cli: str = "{}"  # the CLI's line, around the original message
    public: str | None = None  # the admin API's message, if not the CLI's


_DB_DOWN = "the database is not reachable; try again later"

# The failures of the layers below, by the dotted name of their class. The most specific
# class of a failure's MRO that is listed wins. By name, so that translating imports nothing
# (`check-config` loads no database driver; the modules that raise these need not be loaded);
# tests/unit/test_app_errors.py resolves every name, so a moved class fails a test.
RULES: Mapping[str, Rule] = {
    "supervisor.config.errors.ConfigError": Rule(BadInput),
    "supervisor.adapters.clado.errors.InvalidJobId": Rule(BadInput),
    "supervisor.core.budgets.AdmissionRefused": Rule(Refused, "submission refused: {}", "{}"),
    "supervisor.adapters.clado.errors.ApiKeyRejected": Rule(
        UpstreamKeyRejected, "Clado API: {}", "the Clado API rejected the API key"
    ),
    "supervisor.adapters.clado.errors.OutOfCredits": Rule(UpstreamOutOfCredits, "Clado API: {}", "{}"),
    "supervisor.adapters.clado.errors.RequestRejected": Rule(
        UpstreamRejected, "Clado API: {}", "the Clado API rejected the request: {}"
    ),
    "supervisor.adapters.clado.errors.CladoError": Rule(UpstreamFailed, "Clado API: {}", "{}"),
    "supervisor.service.wiring.RuntimeFailure": Rule(Unavailable),
    "supervisor.adapters.results.ResultsFileError": Rule(
        Unavailable, "results: {}", "the results file cannot be written"
    ),
    "supervisor.adapters.migrate.SchemaUnknown": Rule(Unavailable, "database: {}"),
    "supervisor.adapters.store.database.SqliteFileUnwritable": Rule(
        DatabaseUnavailable, "database: {}", "the database file cannot be written"
    ),
    "sqlalchemy.exc.OperationalError": Rule(DatabaseUnavailable, "database: {}", _DB_DOWN),
    "sqlalchemy.exc.InterfaceError": Rule(DatabaseUnavailable, "database: {}", _DB_DOWN),
    "sqlalchemy.exc.TimeoutError": Rule(DatabaseUnavailable, "database: {}", _DB_DOWN),  # the pool's
    "sqlalchemy.exc.SQLAlchemyError": Rule(Internal, "database: {}"),
}


# psycopg is the `[postgres]` extra: a PostgreSQL URL without it is an install to complete.
_MISSING_DRIVER = "database.url: PostgreSQL needs its driver: pip install 'clado-supervisor[postgres]'"


def translate(exc: BaseException) -> SupervisorError | None:
    """The SupervisorError a failure shows as, or None for one no rule knows (a bug)."""
    if isinstance(exc, SupervisorError):
        return exc
    if isinstance(exc, ModuleNotFoundError) and (exc.name or "").partition(".")[0] == "psycopg":
        missing = BadInput(_MISSING_DRIVER)
        missing.__cause__ = exc
        return missing
    for cls in type(exc).__mro__:
        rule = RULES.get(f"{cls.__module__}.{cls.__qualname__}")
        if rule is not None:
            detail = _detail(exc)
            public = None if rule.public is None else rule.public.format(detail)
            error = rule.error(rule.cli.format(detail), public=public)
            error.__cause__ = exc
            return error
    return None


def _detail(exc: BaseException) -> str:
    """The original message; for a database error the driver's first line (SQLAlchemy adds
    the statement and a link, which say nothing to the user)."""
    if type(exc).__module__.startswith("sqlalchemy"):
        text = str(getattr(exc, "orig", None) or exc)
        return text.splitlines()[0][:300] if text.strip() else type(exc).__name__
    return str(exc)
