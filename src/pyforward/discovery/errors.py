"""What went wrong with the API server, as exceptions and one-line descriptions (never a response body)."""

from __future__ import annotations

import json
from typing import Any


class Gone(Exception):
    """The resourceVersion we watch from is too old (410): list again."""


class Reconnect(Exception):
    """Rebuild the API client and restart the watches: the kubeconfig changed, or credentials were refused
    (an exec plugin, OIDC or a token file yields fresh ones only when the configuration is loaded again)."""


class APIStatus(Exception):
    """A non-success answer of the API server (HTTP status or ERROR event), with its Status reason."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(f"{status} {reason}".strip())
        self.status = status
        self.reason = reason


def status_of(exc: BaseException) -> int | None:
    # Our own APIStatus, and kubernetes_asyncio's ApiException (auth hooks may raise it), both carry .status.
    status = getattr(exc, "status", None)
    return status if isinstance(status, int) else None


def describe(exc: BaseException) -> str:
    """One line about an error, never a response body (it could quote an object)."""
    if isinstance(exc, APIStatus):
        hint = ""
        if exc.status in (401, 403):
            hint = " (check the credentials and RBAC of the kubeconfig or service account)"
        return f"API answered {exc}{hint}"
    status = status_of(exc)
    if status is not None:
        return f"API answered {status} {getattr(exc, 'reason', '') or ''}".rstrip()
    if isinstance(exc, TimeoutError):
        return "timed out"
    text = str(exc).splitlines()[0][:200] if str(exc) else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def status_reason(status: dict[str, Any]) -> str:
    reason = str(status.get("reason") or "")
    message = str(status.get("message") or "")
    text = f"{reason}: {message}" if reason and message else reason or message
    return text.splitlines()[0][:200] if text else ""


async def status_error(response: Any) -> APIStatus:
    """The API's Status object from a failed response, reduced to one line (reason and message only)."""
    reason = str(getattr(response, "reason", "") or "")
    try:
        body = json.loads(await response.content.read(64 * 1024))
        if isinstance(body, dict) and body.get("kind") == "Status":
            reason = status_reason(body) or reason
    except Exception:
        pass
    return APIStatus(int(response.status), reason)
