"""One table from failures to what users see: the CLI's exit code and line, the admin API's
status, error code and message. The codes are the documented ones (README, DESIGN.md)."""

from __future__ import annotations

import importlib

import httpx
import pytest
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from supervisor.adapters.clado import (
    ApiKeyRejected,
    ApiUnavailable,
    InvalidJobId,
    JobNotFound,
    OutOfCredits,
    RequestRejected,
)
from supervisor.app import errors
from supervisor.config import ConfigError
from supervisor.core.budgets import AdmissionRefused
from supervisor.service.wiring import RuntimeFailure

DB_DOWN = "the database is not reachable; try again later"

# failure → (exit code, HTTP status, error code, the CLI's line, the admin API's message)
CASES = [
    (ConfigError("supervisor.toml: api.timeout: bad"), 2, 422, "invalid_request",
     "supervisor.toml: api.timeout: bad", "supervisor.toml: api.timeout: bad"),
    (InvalidJobId("invalid job id 'a b'"), 2, 422, "invalid_request", "invalid job id 'a b'", "invalid job id 'a b'"),
    (AdmissionRefused("budget 'pool' is exhausted"), 2, 409, "admission_refused",
     "submission refused: budget 'pool' is exhausted", "budget 'pool' is exhausted"),
    (ApiKeyRejected("HTTP 401"), 1, 502, "api_key_rejected",
     "Clado API: HTTP 401", "the Clado API rejected the API key"),
    (OutOfCredits("HTTP 402: insufficient credits"), 1, 402, "out_of_credits",
     "Clado API: HTTP 402: insufficient credits", "HTTP 402: insufficient credits"),
    (RequestRejected(400, "bad paging"), 1, 422, "request_rejected",
     "Clado API: HTTP 400: bad paging", "the Clado API rejected the request: HTTP 400: bad paging"),
    (ApiUnavailable("timed out after 4 attempts"), 1, 502, "api_unavailable",
     "Clado API: timed out after 4 attempts", "timed out after 4 attempts"),
    (JobNotFound("HTTP 404"), 1, 502, "api_unavailable", "Clado API: HTTP 404", "HTTP 404"),
    (RuntimeFailure("cannot open the database: refused"), 1, 503, "unavailable",
     "cannot open the database: refused", "cannot open the database: refused"),
    (OperationalError("SELECT 1", {}, Exception("connection refused\nDETAIL: more")), 1, 503, "database_unavailable",
     "database: connection refused", DB_DOWN),
    (PoolTimeout("QueuePool limit of size 5 overflow 10 reached"), 1, 503, "database_unavailable",
     "database: QueuePool limit of size 5 overflow 10 reached", DB_DOWN),
    (IntegrityError("INSERT", {}, Exception("UNIQUE constraint failed")), 1, 500, "internal_error",
     "database: UNIQUE constraint failed", "the request failed; see the supervisor's log"),
    (errors.JobNotTracked("j-1"), 2, 404, "job_not_found", "job j-1 is not tracked", "job j-1 is not tracked"),
    (errors.BadInput("must not be blank", field="query"), 2, 422, "invalid_request",
     "query: must not be blank", "query: must not be blank"),
    (errors.PayloadTooLarge("at most 1024 bytes"), 2, 413, "payload_too_large", "at most 1024 bytes",
     "at most 1024 bytes"),
]  # fmt: skip


@pytest.mark.parametrize(("failure", "exit_code", "status", "code", "line", "public"), CASES)
def test_each_failure_has_one_exit_code_status_and_code(
    failure: Exception, exit_code: int, status: int, code: str, line: str, public: str
) -> None:
    error = errors.translate(failure)
    assert error is not None
    assert (error.exit_code, error.status, error.code) == (exit_code, status, code)
    assert (str(error), error.public) == (line, public)


def test_an_unknown_failure_is_not_dressed_up() -> None:
    assert errors.translate(ValueError("a bug")) is None
    assert errors.translate(httpx.ConnectError("refused")) is None


def test_every_rule_names_a_real_exception_class() -> None:
    """The table names classes by their dotted path: a moved or renamed one must fail here."""
    for name in errors.RULES:
        module, _, qualname = name.rpartition(".")
        cls = getattr(importlib.import_module(module), qualname)
        assert isinstance(cls, type), name
        assert issubclass(cls, Exception), name
        assert f"{cls.__module__}.{cls.__qualname__}" == name


def test_exit_codes_are_the_documented_three() -> None:
    def subclasses(cls: type[errors.SupervisorError]) -> list[type[errors.SupervisorError]]:
        return [cls, *(sub for child in cls.__subclasses__() for sub in subclasses(child))]

    every = subclasses(errors.SupervisorError)
    assert {cls.exit_code for cls in every} == {1, 2}
    # Bad input is the user's to fix (2); the rest failed around them (1).
    assert all(
        cls.exit_code == 2 for cls in every if 400 <= cls.status < 500 and not issubclass(cls, errors.UpstreamFailed)
    )
    assert all(cls.exit_code == 1 for cls in every if cls.status >= 500)
