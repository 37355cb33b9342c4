"""The admin API, on the daemon's own event loop (starlette + uvicorn).

/v1 routes need `Authorization: Bearer <token>` (compared in constant time); with no
token configured they are refused, not open. Health, readiness, metrics and the OpenAPI
document are public: they reveal no job data and no secret.

The conventions an HTTP client expects: errors are RFC 9457 problem details
(`application/problem+json`, with the stable `code`), never a stack trace; a 401 says
`WWW-Authenticate: Bearer`, a 405 `Allow`, a 201 the `Location` of what it created; request
bodies must say they are JSON (415 otherwise); `GET /v1/jobs` is paginated by an opaque
cursor (`limit`, `cursor`; the answer's `next_cursor`).

endpoints.py is the route table (openapi.py builds the document from it), api.py the app and
its handlers, guards.py the token, error translation and body limits, responses.py the
answers' shapes, server.py the uvicorn server and its connection guards.
"""

from supervisor.app.http.api import AdminApi
from supervisor.app.http.openapi import openapi_document
from supervisor.app.http.server import AdminServer

__all__ = ["AdminApi", "AdminServer", "openapi_document"]
