"""The one client of the RabbitMQ management HTTP API.

Provisioning (users, permissions, the topology as an administrator), the benchmark (scratch
vhosts, consumer counts) and the tests (inspection, vhosts of their own) all talk to the broker's
management plugin through ``Management``; nothing else in the code base speaks HTTP to it.
"""

from __future__ import annotations

import base64
import json
import re
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from messaging.errors import SagabusError

#: the management plugin's port when a URL or the caller names none
DEFAULT_PORT = 15672
#: an administrator's URL on a local broker with its default user
LOCAL_ADMIN_URL = f"http://guest:guest@127.0.0.1:{DEFAULT_PORT}"

EXIT_FAILED = 1
EXIT_UNREACHABLE = 3


class ManagementError(SagabusError):
    """The management API answered with an error status (``status``)."""

    exit_code = EXIT_FAILED

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class ManagementUnreachable(ManagementError):
    """The management API did not answer at all."""

    exit_code = EXIT_UNREACHABLE


def quote(name: str) -> str:
    """A vhost, user, exchange or queue name as one path segment of the API."""
    return urllib.parse.quote(name, safe="")


def redact(url: str) -> str:
    """``scheme://user:***@host``: a URL fit to print."""
    return re.sub(r"//([^:/@]+):([^@]+)@", r"//\1:***@", url)


class Management:
    """A small client of the management HTTP API, authenticated from the URL
    (``http://USER:PASSWORD@HOST:PORT``). A URL that is not one raises ``ValueError``."""

    def __init__(self, url: str, *, timeout: float = 10) -> None:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"must be an http(s):// URL, got {redact(url)!r}")
        if not parts.username:
            raise ValueError("needs credentials: http://USER:PASSWORD@HOST:PORT")
        self.user = urllib.parse.unquote(parts.username)
        password = urllib.parse.unquote(parts.password or "")
        netloc = parts.hostname if parts.port is None else f"{parts.hostname}:{parts.port}"
        if ":" in parts.hostname:
            netloc = f"[{parts.hostname}]" + (f":{parts.port}" if parts.port else "")
        path = parts.path.rstrip("/")
        self.base = f"{parts.scheme}://{netloc}{path}" + ("" if path.endswith("/api") else "/api")
        self.hostname = parts.hostname
        self.timeout = timeout
        token = base64.b64encode(f"{self.user}:{password}".encode()).decode()
        self._auth = f"Basic {token}"

    @classmethod
    def for_amqp_url(cls, amqp_url: str, *, port: int = DEFAULT_PORT) -> Management:
        """The management API of the broker of ``amqp_url``, as that URL's user (guest if it
        names none)."""
        parts = urllib.parse.urlsplit(amqp_url)
        user = quote(urllib.parse.unquote(parts.username or "guest"))
        password = quote(urllib.parse.unquote(parts.password or "guest"))
        host = parts.hostname or "127.0.0.1"
        if ":" in host:
            host = f"[{host}]"
        return cls(f"http://{user}:{password}@{host}:{port}")

    def call(self, method: str, path: str, body: Any = None, *, missing_ok: bool = False) -> Any:
        """Returns the decoded JSON answer, or None for an empty one (or a 404 if missing_ok)."""
        request = urllib.request.Request(
            f"{self.base}/{path}",
            method=method,
            data=None if body is None else json.dumps(body).encode(),
            headers={"Authorization": self._auth, "content-type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as answer:
                raw = answer.read()
        except urllib.error.HTTPError as e:
            if e.code == 404 and missing_ok:
                return None
            raise ManagementError(
                f"RabbitMQ management API: {method} /api/{urllib.parse.unquote(path)} "
                f"answered {e.code} {e.reason}{_reason(e)}",
                e.code,
            ) from None
        except (urllib.error.URLError, OSError) as e:
            why = getattr(e, "reason", e)
            raise ManagementUnreachable(
                f"cannot reach the RabbitMQ management API at {self.base} ({why})"
            ) from None
        return json.loads(raw) if raw.strip() else None

    # -- what more than one caller asks ------------------------------------------------------

    def user_exists(self, name: str) -> bool:
        return self.call("GET", f"users/{quote(name)}", missing_ok=True) is not None

    def vhost_exists(self, vhost: str) -> bool:
        return self.call("GET", f"vhosts/{quote(vhost)}", missing_ok=True) is not None

    def create_vhost(self, vhost: str, *, user: str | None = None) -> None:
        """Create ``vhost`` (if missing) and give ``user`` (default: this client's) every
        permission there: a vhost is created without any."""
        v = quote(vhost)
        self.call("PUT", f"vhosts/{v}", {})
        self.call(
            "PUT",
            f"permissions/{v}/{quote(user or self.user)}",
            {"configure": ".*", "write": ".*", "read": ".*"},
        )

    def delete_vhost(self, vhost: str) -> None:
        """Delete ``vhost`` and everything in it; a missing one is fine."""
        self.call("DELETE", f"vhosts/{quote(vhost)}", missing_ok=True)

    def queue(self, vhost: str, name: str) -> dict[str, Any] | None:
        """The API's view of one queue (messages, consumers, arguments), or None: no such."""
        found: dict[str, Any] | None = self.call(
            "GET", f"queues/{quote(vhost)}/{quote(name)}", missing_ok=True
        )
        return found


def _reason(e: urllib.error.HTTPError) -> str:
    try:
        reason = json.loads(e.read()).get("reason")
    except Exception:
        return ""
    return f": {reason}" if reason else ""


__all__ = [
    "DEFAULT_PORT",
    "LOCAL_ADMIN_URL",
    "Management",
    "ManagementError",
    "ManagementUnreachable",
    "quote",
    "redact",
]
