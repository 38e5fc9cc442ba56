"""Who is calling: the principal the gateway authenticated, for ownership, quotas and fairness.

The gateway removes any copy of `PRINCIPAL_HEADER` a client sends and, when it authenticated the
caller, sets it to the caller's name (an API key's client name, or a JWT's subject). The servers
trust the header because only the gateway reaches them (Kubernetes NetworkPolicies, optionally
mutual TLS: ARCHITECTURE.md, "Edge security"). Without the header, the caller is `ANONYMOUS`:
a gateway running without authentication, or a direct call on a trusted network.

The request interceptor stores the principal in a context variable for the whole call; tasks
started by the call (a job's pump) inherit it, so the admission queue and the job table read it
without threading it through every signature.
"""

from __future__ import annotations

import contextvars

#: The request header (gRPC metadata) naming the authenticated principal.
PRINCIPAL_HEADER = "x-kiln-principal"
#: The one principal of a gateway without authentication (and of calls without the header).
ANONYMOUS = "anonymous"

_principal: contextvars.ContextVar[str] = contextvars.ContextVar("kiln_principal", default=ANONYMOUS)


def current_principal() -> str:
    """The principal of the call being served (ANONYMOUS outside one)."""
    return _principal.get()


def set_principal(principal: str) -> contextvars.Token[str]:
    """Set the current call's principal; an empty value means ANONYMOUS."""
    return _principal.set(principal or ANONYMOUS)


def reset_principal(token: contextvars.Token[str]) -> None:
    _principal.reset(token)
