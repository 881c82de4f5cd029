"""The optional API key: when ``api_key`` is set, the /v1 routes need ``Authorization: Bearer <key>``.

Health, readiness and metrics stay open, as probes and scrapers expect. The key is compared with
``hmac.compare_digest`` so that the time taken says nothing about how much of a guess was right.
"""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import SecretStr

from server.errors import Unauthorized

# auto_error=False: a missing header is answered by require_api_key in the envelope, not by FastAPI.
_bearer = HTTPBearer(auto_error=False, description="the server's api_key, when it has one")


def require_api_key(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> None:
    secret = request.app.state.runtime.settings.api_key
    if secret is None:
        return
    if credentials is None:
        raise Unauthorized("this server needs an API key: send 'Authorization: Bearer <key>'")
    if not bearer_matches(credentials, secret):
        raise Unauthorized("the API key is not valid")


def bearer_matches(credentials: HTTPAuthorizationCredentials | None, secret: SecretStr) -> bool:
    """Whether the bearer token is ``secret``, compared in time that says nothing of a near guess."""
    if credentials is None:
        return False
    return hmac.compare_digest(credentials.credentials.encode(), secret.get_secret_value().encode())
