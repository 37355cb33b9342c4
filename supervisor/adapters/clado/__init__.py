"""The Clado deep research API client, in five parts:

- `client`: `CladoClient`, the endpoints and what each asks of the API;
- `session`: sending, the retry rules, the rate-limit hold-off and the rejected key's backoff;
- `shapes`: reading the answers (pure): every shape the docs show, the typed results;
- `transport`: the HTTP transport and which of its failures mean "not sent";
- `errors`: the typed errors callers catch.

Callers import from here: `from supervisor.adapters.clado import CladoClient`.
"""

from supervisor.adapters.clado.client import CladoClient
from supervisor.adapters.clado.errors import (
    ApiKeyRejected,
    ApiUnavailable,
    BodyTooLarge,
    CladoError,
    CreditsUnavailable,
    InvalidJobId,
    JobNotFound,
    NoStatus,
    OutOfCredits,
    RateLimited,
    RequestRejected,
    UnreadableBody,
)
from supervisor.adapters.clado.session import MAX_BODY
from supervisor.adapters.clado.shapes import CancelResult, Credits, JobStatus, ResultsPage, validate_job_id
from supervisor.adapters.clado.transport import TransportName, make_transport
from supervisor.adapters.clado.transport import _unsent_or_not as _unsent_or_not  # for its test

__all__ = [
    "MAX_BODY",
    "ApiKeyRejected",
    "ApiUnavailable",
    "BodyTooLarge",
    "CancelResult",
    "CladoClient",
    "CladoError",
    "Credits",
    "CreditsUnavailable",
    "InvalidJobId",
    "JobNotFound",
    "JobStatus",
    "NoStatus",
    "OutOfCredits",
    "RateLimited",
    "RequestRejected",
    "ResultsPage",
    "TransportName",
    "UnreadableBody",
    "make_transport",
    "validate_job_id",
]
