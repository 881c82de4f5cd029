"""The optional API keys: when ``api_key`` or ``api_keys`` is set, the /v1 routes need
``Authorization: Bearer <key>``, and the key names the request's tenant.

Health, readiness and metrics stay open, as probes and scrapers expect. A key is compared with
``hmac.compare_digest`` so that the time taken says nothing about how much of a guess was right; every
tenant's key is compared, so neither does it say which tenant's key came close.
"""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import SecretStr

from server.errors import Unauthorized
from server.settings import Settings

# auto_error=False: a missing header is answered by require_api_key in the envelope, not by FastAPI.
_bearer = HTTPBearer(auto_error=False, description="one of the server's API keys, when it has any")


def require_api_key(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> None:
    """Let the request through with a tenant's key (or on a server without keys), and note its tenant on
    ``request.state.tenant`` ("" for ``api_key``, and on a server without keys)."""
    settings: Settings = request.app.state.runtime.settings
    request.state.tenant = ""
    keys = settings.tenant_keys
    if not keys:
        return
    if credentials is None:
        raise Unauthorized("this server needs an API key: send 'Authorization: Bearer <key>'")
    tenant = tenant_of(credentials.credentials, keys)
    if tenant is None:
        raise Unauthorized("the API key is not valid")
    request.state.tenant = tenant


def tenant_of(given: str, keys: dict[str, SecretStr]) -> str | None:
    """The tenant whose key ``given`` is; None when it is nobody's."""
    found = None
    for tenant, secret in keys.items():
        if hmac.compare_digest(given.encode(), secret.get_secret_value().encode()):
            found = tenant
    return found


def bearer_matches(credentials: HTTPAuthorizationCredentials | None, secret: SecretStr) -> bool:
    """Whether the bearer token is ``secret``, compared in time that says nothing of a near guess."""
    if credentials is None:
        return False
    return hmac.compare_digest(credentials.credentials.encode(), secret.get_secret_value().encode())
