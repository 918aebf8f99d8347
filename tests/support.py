"""Helpers for tests against the real RabbitMQ and PostgreSQL: isolation and polling."""

from __future__ import annotations

import asyncio
import base64
import json
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import asyncpg

from schemas.checkout import StartCheckout
from schemas.common import LineItem, ShippingAddress

T = TypeVar("T")

ADDRESS = ShippingAddress(line1="1 Test Street", city="Utrecht", postal_code="3511AA", country="NL")


async def wait_for(
    probe: Callable[[], Awaitable[T]],
    *,
    timeout: float = 30,
    interval: float = 0.05,
    what: str = "condition",
) -> T:
    """Poll ``probe`` until it returns something truthy, or fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        last = await probe()
        if last:
            return last
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}; last: {last!r}")
        await asyncio.sleep(interval)


def checkout(
    order_id: str | None = None,
    *,
    sku: str = "SKU-T",
    quantity: int = 1,
    price: int = 1500,
    token: str = "tok_visa",
    postal_code: str = "3511AA",
) -> StartCheckout:
    return StartCheckout(
        order_id=order_id or f"t-{uuid.uuid4().hex[:12]}",
        customer_id="cus_test",
        currency="EUR",
        items=(LineItem(sku=sku, quantity=quantity, unit_price_minor=price),),
        payment_token=token,
        shipping_address=ADDRESS.model_copy(update={"postal_code": postal_code}),
    )


# -- RabbitMQ vhosts -------------------------------------------------------------------------


def _mgmt(method: str, path: str, body: dict[str, Any] | None = None) -> int:
    req = urllib.request.Request(
        f"http://127.0.0.1:15672/api/{path}",
        method=method,
        data=json.dumps(body).encode() if body is not None else None,
        headers={
            "Authorization": "Basic " + base64.b64encode(b"guest:guest").decode(),
            "content-type": "application/json",
        },
    )
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return int(r.status)
    except urllib.error.HTTPError as e:
        return int(e.code)


def _ctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", "-q", *args], check=True, capture_output=True, timeout=60)


def create_vhost(name: str) -> None:
    q = urllib.parse.quote(name, safe="")
    try:
        if _mgmt("PUT", f"vhosts/{q}", {}) in (201, 204):
            _mgmt("PUT", f"permissions/{q}/guest", {"configure": ".*", "write": ".*", "read": ".*"})
            return
    except OSError:
        pass
    if shutil.which("rabbitmqctl") is None:
        raise RuntimeError("cannot create a RabbitMQ vhost: no management API and no rabbitmqctl")
    _ctl("add_vhost", name)
    _ctl("set_permissions", "-p", name, "guest", ".*", ".*", ".*")


def delete_vhost(name: str) -> None:
    q = urllib.parse.quote(name, safe="")
    try:
        if _mgmt("DELETE", f"vhosts/{q}") in (204, 404):
            return
    except OSError:
        pass
    _ctl("delete_vhost", name)


async def drop_database(admin_url: str, name: str) -> None:
    conn = await asyncpg.connect(admin_url)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()
