"""The console's login session and CSRF tokens, stateless and signed.

The signing key is derived from the admin token (HMAC-SHA256 under a fixed label), so every
replica behind one token accepts the same cookie, a changed token ends every session, and
the token itself is never stored in the cookie or rendered. A session cookie is
`<payload>.<signature>`, the payload holding a random session id and an expiry; a CSRF token is
the HMAC of that session id (or, on the login form, of a random nonce in a short-lived cookie):
a form posted from another site cannot know it.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta

SESSION_COOKIE = "clado_console"
LOGIN_COOKIE = "clado_console_login"
SESSION_TTL = timedelta(hours=12)
LOGIN_TTL = timedelta(minutes=15)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@dataclass(frozen=True)
class Session:
    sid: str
    expires: datetime


class Signer:
    """Signs and checks the console's cookies and CSRF tokens under a key made from the admin token."""

    def __init__(self, admin_token: bytes) -> None:
        self._token = admin_token
        self._key = hmac.new(admin_token, b"clado-supervisor console session v1", hashlib.sha256).digest()

    def token_matches(self, given: str) -> bool:
        return hmac.compare_digest(given.strip().encode(), self._token)

    def _mac(self, purpose: str, value: str) -> str:
        return _b64(hmac.new(self._key, f"{purpose}:{value}".encode(), hashlib.sha256).digest())

    # -- the session cookie ---------------------------------------------------------------

    def new_session(self, now: datetime) -> tuple[Session, str]:
        session = Session(secrets.token_urlsafe(18), now + SESSION_TTL)
        payload = _b64(json.dumps({"sid": session.sid, "exp": int(session.expires.timestamp())}).encode())
        return session, f"{payload}.{self._mac('session', payload)}"

    def session(self, cookie: str | None, now: datetime) -> Session | None:
        """The session a cookie holds, or None if it is missing, forged, malformed or expired."""
        if not cookie or cookie.count(".") != 1:
            return None
        payload, signature = cookie.split(".")
        if not hmac.compare_digest(signature, self._mac("session", payload)):
            return None
        try:
            data = json.loads(_unb64(payload))
            session = Session(str(data["sid"]), datetime.fromtimestamp(int(data["exp"]), tz=now.tzinfo))
        except (ValueError, KeyError, TypeError):
            return None
        return session if session.expires > now else None

    # -- CSRF -------------------------------------------------------------------------------

    def csrf(self, binding: str) -> str:
        """The CSRF token of forms posted within a session (its id) or to the login form (its nonce)."""
        return self._mac("csrf", binding)

    def csrf_ok(self, binding: str | None, given: str | None) -> bool:
        return bool(binding and given) and hmac.compare_digest(str(given), self.csrf(str(binding)))

    @staticmethod
    def login_nonce() -> str:
        return secrets.token_urlsafe(18)
