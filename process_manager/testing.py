"""A test kit for saga definition authors: the real engine, a fake clock and a fake bus.

A scenario test is a few lines::

    saga = SagaHarness(checkout.V2)                 # the clock starts at HARNESS_EPOCH
    saga.start()                                    # or saga.start(sample_checkout(...))
    saga.expect_sent("order.CreateOrder.v1")        # the commands the last decision sent
    saga.reply(OrderCreated)                        # a sample OrderCreated, right fence + token
    saga.answer(ok=False)                           # the sample failure of the awaited step
    saga.advance(seconds=31)                        # fires every deadline that falls due
    assert saga.status == "COMPENSATING"

Everything is the real thing except time and transport: ``decide`` of
``process_manager.engine``, the wire models of ``schemas``, command ids and reply tokens as the
engine derives them. Nonces, reply message ids and the clock are deterministic, so a failing
scenario replays the same way. Pure: nothing here does I/O.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from process_manager.engine import (
    Command,
    Decision,
    Definition,
    Expire,
    ForceCompensate,
    Input,
    Phase,
    Policy,
    Reply,
    Resume,
    SagaState,
    Start,
    Step,
    Timeout,
    decide,
)
from schemas.base import Message
from schemas.checkout import StartCheckout
from schemas.common import LineItem, ShippingAddress
from schemas.inventory import (
    InventoryBackordered,
    InventoryReleased,
    InventoryReserved,
    InventoryUnavailable,
    ItemsRestocked,
)
from schemas.order import (
    OrderBackordered,
    OrderCancelled,
    OrderCompleted,
    OrderCreated,
    OrderReturnCancelled,
    OrderReturned,
    OrderReturnPending,
    OrderReturnRefused,
)
from schemas.payment import (
    AuthorizationVoided,
    CreditNoteIssued,
    CreditNoteRefused,
    PaymentAuthorized,
    PaymentCaptured,
    PaymentCaptureFailed,
    PaymentDeclined,
    PaymentRefunded,
    PaymentRefundFailed,
    PaymentStatusReported,
)
from schemas.returns import StartReturn
from schemas.risk import RiskApproved, RiskRejected
from schemas.shipping import (
    PickupBooked,
    PickupCancelled,
    PickupFailed,
    ShipmentCancelled,
    ShipmentCreated,
    ShipmentFailed,
)

__all__ = [
    "HARNESS_EPOCH",
    "SAMPLE_REPLIES",
    "SAMPLE_STARTS",
    "FakeBus",
    "FakeClock",
    "SagaHarness",
    "sample_checkout",
    "sample_reply",
    "sample_return",
]

#: where every fake clock starts (a fixed instant: deadlines in assertions are exact)
HARNESS_EPOCH = datetime(2025, 3, 14, 9, 26, 53, tzinfo=UTC)
#: namespace of the message ids the harness gives its inputs
_INPUT_NS = uuid.UUID("00000000-0000-4000-8000-0000000000ff")

# ---------------------------------------------------------------------------------------------
# Samples


SAMPLE_ADDRESS = ShippingAddress(
    line1="1 Test Street", city="Utrecht", postal_code="3511AA", country="NL"
)
SAMPLE_ITEMS = (
    LineItem(sku="SKU-1", quantity=2, unit_price_minor=1500),
    LineItem(sku="SKU-2", quantity=1, unit_price_minor=500),
)


def sample_checkout(**overrides: Any) -> StartCheckout:
    """A valid StartCheckout (order ``ord-1``, 3500 EUR cents); any field can be overridden."""
    fields: dict[str, Any] = {
        "order_id": "ord-1",
        "customer_id": "cus_1",
        "currency": "EUR",
        "items": SAMPLE_ITEMS,
        "payment_token": "tok_visa",
        "shipping_address": SAMPLE_ADDRESS,
    }
    fields.update(overrides)
    return StartCheckout(**fields)


def sample_return(**overrides: Any) -> StartReturn:
    """A valid StartReturn (order ``ord-1``); any field can be overridden."""
    fields: dict[str, Any] = {"order_id": "ord-1", "reason": "does not fit"}
    fields.update(overrides)
    return StartReturn(**fields)


#: the default start message of each start type
SAMPLE_STARTS: dict[type[Message], Callable[[], Message]] = {
    StartCheckout: sample_checkout,
    StartReturn: sample_return,
}


def _oid(s: Message) -> str:
    return str(getattr(s, "order_id", "ord-1"))


def _amount(s: Message) -> int:
    return int(getattr(s, "amount_minor", 3500))


def _customer(s: Message) -> str:
    return str(getattr(s, "customer_id", "cus_1"))


def _currency(s: Message) -> str:
    return str(getattr(s, "currency", "EUR"))


#: a sample reply of every reply type of the registered definitions, built from the saga's
#: start message (so ids and amounts match the command it answers)
SAMPLE_REPLIES: dict[type[Message], Callable[[Message], Message]] = {
    # order
    OrderCreated: lambda s: OrderCreated(order_id=_oid(s)),
    OrderCompleted: lambda s: OrderCompleted(
        order_id=_oid(s),
        customer_id=_customer(s),
        amount_minor=_amount(s),
        currency=_currency(s),
        duration_ms=1234,
    ),
    OrderCancelled: lambda s: OrderCancelled(
        order_id=_oid(s),
        customer_id=_customer(s),
        amount_minor=_amount(s),
        currency=_currency(s),
        duration_ms=2345,
        reason="checkout_compensated",
    ),
    OrderBackordered: lambda s: OrderBackordered(
        order_id=_oid(s), customer_id=_customer(s), amount_minor=_amount(s), currency=_currency(s)
    ),
    OrderReturnPending: lambda s: OrderReturnPending(order_id=_oid(s)),
    OrderReturnRefused: lambda s: OrderReturnRefused(
        order_id=_oid(s), reason="order not completed"
    ),
    OrderReturnCancelled: lambda s: OrderReturnCancelled(order_id=_oid(s), had_return=True),
    OrderReturned: lambda s: OrderReturned(
        order_id=_oid(s), customer_id=_customer(s), amount_minor=_amount(s), currency=_currency(s)
    ),
    # risk
    RiskApproved: lambda s: RiskApproved(order_id=_oid(s), screening_id="scr_1"),
    RiskRejected: lambda s: RiskRejected(order_id=_oid(s), reason="customer_blocked"),
    # payment
    PaymentAuthorized: lambda s: PaymentAuthorized(
        order_id=_oid(s), authorization_id="auth_1", amount_minor=_amount(s)
    ),
    PaymentDeclined: lambda s: PaymentDeclined(order_id=_oid(s), reason="card declined"),
    PaymentCaptured: lambda s: PaymentCaptured(
        order_id=_oid(s), authorization_id="auth_1", amount_minor=_amount(s)
    ),
    PaymentCaptureFailed: lambda s: PaymentCaptureFailed(order_id=_oid(s), reason="expired"),
    AuthorizationVoided: lambda s: AuthorizationVoided(order_id=_oid(s), had_authorization=True),
    PaymentRefunded: lambda s: PaymentRefunded(order_id=_oid(s), amount_minor=_amount(s)),
    PaymentRefundFailed: lambda s: PaymentRefundFailed(order_id=_oid(s), reason="card closed"),
    CreditNoteIssued: lambda s: CreditNoteIssued(
        order_id=_oid(s), credit_note_id="cn_1", amount_minor=_amount(s)
    ),
    CreditNoteRefused: lambda s: CreditNoteRefused(order_id=_oid(s), reason="account closed"),
    PaymentStatusReported: lambda s: PaymentStatusReported(order_id=_oid(s), status="none"),
    # inventory
    InventoryReserved: lambda s: InventoryReserved(order_id=_oid(s), reservation_id="res-1"),
    InventoryUnavailable: lambda s: InventoryUnavailable(order_id=_oid(s), skus=("SKU-1",)),
    InventoryBackordered: lambda s: InventoryBackordered(order_id=_oid(s), skus=("SKU-1",)),
    InventoryReleased: lambda s: InventoryReleased(order_id=_oid(s), units_released=3),
    ItemsRestocked: lambda s: ItemsRestocked(order_id=_oid(s), units_restocked=3),
    # shipping
    ShipmentCreated: lambda s: ShipmentCreated(order_id=_oid(s), tracking_number="TRK-1"),
    ShipmentFailed: lambda s: ShipmentFailed(order_id=_oid(s), reason="carrier down"),
    ShipmentCancelled: lambda s: ShipmentCancelled(order_id=_oid(s), had_shipment=True),
    PickupBooked: lambda s: PickupBooked(order_id=_oid(s), pickup_id="PU-1"),
    PickupFailed: lambda s: PickupFailed(order_id=_oid(s), reason="nobody home"),
    PickupCancelled: lambda s: PickupCancelled(order_id=_oid(s), had_pickup=True),
}


def sample_reply(
    kind: type[Message],
    start: Message,
    builders: Mapping[type[Message], Callable[[Message], Message]] = SAMPLE_REPLIES,
    **overrides: Any,
) -> Message:
    """The sample ``kind`` reply for the saga started by ``start``, with fields overridden (and
    validated by the wire model)."""
    builder = builders.get(kind)
    if builder is None:
        raise AssertionError(
            f"no sample builder for {kind.__name__}: pass replies={{{kind.__name__}: ...}} "
            "to the harness, or build the reply yourself"
        )
    body = builder(start)
    if overrides:
        body = kind.model_validate({**body.model_dump(), **overrides})
    return body


# ---------------------------------------------------------------------------------------------
# Fakes


@dataclass
class FakeClock:
    """A clock that only moves when told to."""

    now: datetime = HARNESS_EPOCH

    def advance(self, delta: timedelta) -> datetime:
        if delta < timedelta(0):
            raise ValueError("a clock does not go back")
        self.now += delta
        return self.now


@dataclass
class FakeBus:
    """Every command the saga published, in order."""

    published: list[Command] = field(default_factory=list)

    def publish(self, commands: Iterable[Command]) -> None:
        self.published.extend(commands)

    def types(self) -> list[str]:
        return [c.body.TYPE for c in self.published]

    def to(self, participant: str) -> list[Command]:
        return [c for c in self.published if c.participant == participant]


class _Echo:
    """The default reply token: the one the answered dispatch carried."""


ECHO = _Echo()


def _type_name(t: str | type[Message]) -> str:
    return t if isinstance(t, str) else t.TYPE


# ---------------------------------------------------------------------------------------------
# The harness


class SagaHarness:
    """One saga of ``definition``, run by the real engine against a fake clock and bus.

    Every input goes through ``decide`` (twice: a decision that differs the second time is an
    impure definition, and fails the test). Commands of applied and ignored decisions are
    published on the fake bus; ``last`` is the latest decision.
    """

    def __init__(
        self,
        definition: Definition,
        *,
        policy: Policy | None = None,
        now: datetime = HARNESS_EPOCH,
        replies: Mapping[type[Message], Callable[[Message], Message]] | None = None,
        state: SagaState | None = None,
        nonce: Callable[[int], str] | None = None,
    ) -> None:
        self.definition = definition
        self.policy = policy
        self.clock = FakeClock(now)
        self.bus = FakeBus()
        self.replies: dict[type[Message], Callable[[Message], Message]] = {
            **SAMPLE_REPLIES,
            **(replies or {}),
        }
        self._state = state
        self._nonce = nonce or (lambda n: f"harness-nonce-{n}")
        self.history: list[Decision] = []
        self.inputs: list[Input] = []
        self._replies_sent = 0

    # -- what the saga looks like ------------------------------------------------------------

    @property
    def state(self) -> SagaState:
        if self._state is None:
            raise AssertionError("the saga has not started: call start() first")
        return self._state

    @property
    def status(self) -> str:
        return self.state.status

    @property
    def phase(self) -> Phase:
        return self.state.phase

    @property
    def awaiting(self) -> str | None:
        return self.state.awaiting

    @property
    def now(self) -> datetime:
        return self.clock.now

    @property
    def sent(self) -> tuple[Command, ...]:
        """Every command published so far."""
        return tuple(self.bus.published)

    @property
    def last(self) -> Decision:
        if not self.history:
            raise AssertionError("no decision yet: call start() first")
        return self.history[-1]

    def story(self) -> str:
        """The saga's history, one line per decision (for assertion messages)."""
        lines = []
        for msg, d in zip(self.inputs, self.history, strict=True):
            what = type(msg).__name__
            if isinstance(msg, Reply):
                what = f"{type(msg.body).__name__}@{msg.fence}"
            elif isinstance(msg, Timeout):
                what = f"Timeout@{msg.seq}"
            sent = ", ".join(f"{c.body.TYPE}@{c.fence}" for c in d.commands) or "nothing"
            lines.append(
                f"  {what}: {d.outcome} {d.event} [{d.transition[0]} -> {d.transition[1]}] "
                f"sent {sent}; {d.note}"
            )
        return "\n".join(lines) or "  (nothing yet)"

    def _fail(self, what: str) -> AssertionError:
        where = (
            f"{self._state.status} ({self._state.phase}), awaiting {self._state.awaiting}"
            if self._state is not None
            else "not started"
        )
        return AssertionError(f"{what}\nsaga {self.definition.ref} is {where}\n{self.story()}")

    # -- inputs ------------------------------------------------------------------------------

    def deliver(self, msg: Input) -> Decision:
        """Decide ``msg`` at the fake clock's now; record and publish what it decided."""
        nonce = self._nonce(len(self.history))
        now, policy = self.clock.now, self.policy
        d = decide(self.definition, self._state, msg, now=now, policy=policy, nonce=nonce)
        again = decide(self.definition, self._state, msg, now=now, policy=policy, nonce=nonce)
        if again != d:
            raise self._fail(f"decide is not deterministic for {msg!r}:\n{d}\n!=\n{again}")
        self.inputs.append(msg)
        self.history.append(d)
        self.bus.publish(d.commands)
        if d.state is not None:
            self._state = d.state
        return d

    def start(self, command: Message | None = None) -> Decision:
        """Start the saga with ``command`` (default: the sample start of the definition)."""
        if command is None:
            make = SAMPLE_STARTS.get(self.definition.start)
            if make is None:
                raise AssertionError(f"no sample {self.definition.start.__name__}: pass one")
            command = make()
        msg_id = uuid.uuid5(_INPUT_NS, f"start:{len(self.history)}")
        return self.deliver(Start(command, msg_id))

    def reply(
        self,
        body: Message | type[Message],
        *,
        fence: int | None = None,
        token: str | _Echo | None = ECHO,
        message_id: uuid.UUID | None = None,
        **overrides: Any,
    ) -> Decision:
        """Deliver a reply: a body, or a reply type (its sample, with ``overrides``). By default
        it answers the current fence and echoes that dispatch's token; ``fence=`` for a stale
        or late reply (it echoes that fence's token), ``token=None`` or a string to forge."""
        if isinstance(body, type):
            body = sample_reply(body, self.state.start, self.replies, **overrides)
        elif overrides:
            raise TypeError("field overrides need a reply type, not a built reply")
        f = self.state.seq if fence is None else fence
        echoed = self.state.token_for(f) if isinstance(token, _Echo) else token
        self._replies_sent += 1
        msg_id = message_id or uuid.uuid5(_INPUT_NS, f"reply:{self._replies_sent}")
        return self.deliver(Reply(body, fence=f, message_id=msg_id, token=echoed))

    def answer(self, ok: bool = True) -> Decision:
        """The sample reply of whatever is awaited: its first success (or failure) reply. For a
        status query, ``ok`` means "the step it asks about happened" (its first happened
        status, alphabetically) and not ok "nothing happened" (``none``)."""
        spec = self._awaited()
        d = self.definition
        if d.query(spec.name) is not None:
            asked = d.forward(self.state.reconciling or "")
            if asked is None or asked.reconcile is None:
                raise self._fail(f"awaiting query {spec.name} but reconciling no step")
            status = sorted(asked.reconcile.happened)[0] if ok else "none"
            return self.reply(spec.success[0], status=status)
        kinds = spec.success if ok else spec.failure
        if not kinds:
            raise self._fail(f"{spec.name} has no failure reply: it cannot fail, only be late")
        return self.reply(kinds[0])

    def duplicate_last_reply(self) -> Decision:
        """Redeliver the last reply exactly (same message id, fence and token)."""
        for msg in reversed(self.inputs):
            if isinstance(msg, Reply):
                return self.deliver(msg)
        raise self._fail("no reply delivered yet")

    def timeout(self, fence: int | None = None) -> Decision:
        """Fire a timeout now, for ``fence`` (default: the current one), whatever the deadline."""
        return self.deliver(Timeout(self.state.seq if fence is None else fence))

    def advance(self, **delta: float) -> list[Decision]:
        """Move the clock (``seconds=31``, ``minutes=2`` ...) and fire every deadline that falls
        due on the way, each at its own instant, as the sweeper would."""
        target = self.clock.now + timedelta(**delta)
        if target < self.clock.now:
            raise ValueError("a clock does not go back")
        fired: list[Decision] = []
        for _ in range(10_000):
            deadline = self._state.deadline if self._state is not None else None
            if deadline is None or deadline > target:
                break
            self.clock.now = max(self.clock.now, deadline)
            fired.append(self.timeout())
        else:
            raise self._fail("more than 10000 timeouts in one advance")
        self.clock.now = target
        return fired

    def compensate(self, reason: str = "operator") -> Decision:
        return self.deliver(ForceCompensate(reason))

    def resume(self) -> Decision:
        return self.deliver(Resume())

    def expire(self, reason: str = "alive too long") -> Decision:
        return self.deliver(Expire(reason))

    # -- driving -----------------------------------------------------------------------------

    def run_to(self, step: str, *, limit: int = 100) -> SagaHarness:
        """Answer every awaited step successfully until ``step`` is awaited."""
        for _ in range(limit):
            if self.state.awaiting == step:
                return self
            if self.state.awaiting is None:
                break
            self.answer()
        raise self._fail(f"never came to await {step}")

    def finish(self, ok: bool = True, *, limit: int = 100) -> SagaHarness:
        """Answer whatever is awaited (``ok``, where the step can fail) until the saga stops."""
        for _ in range(limit):
            if self.state.awaiting is None:
                return self
            spec = self._awaited()
            self.answer(ok=ok or (not spec.failure and self.definition.query(spec.name) is None))
        raise self._fail(f"still awaiting after {limit} answers")

    # -- assertions --------------------------------------------------------------------------

    def expect_sent(self, *expected: str | type[Message]) -> tuple[Command, ...]:
        """The last decision sent exactly these commands (wire types or model classes), in
        order. No argument: it sent nothing."""
        got = [c.body.TYPE for c in self.last.commands]
        want = [_type_name(t) for t in expected]
        if got != want:
            raise self._fail(f"expected the last decision to send {want}, it sent {got}")
        return self.last.commands

    def expect_never_sent(self, *types: str | type[Message]) -> None:
        """None of these wire types was ever published."""
        banned = {_type_name(t) for t in types}
        found = [t for t in self.bus.types() if t in banned]
        if found:
            raise self._fail(f"expected none of {sorted(banned)} ever sent, found {found}")

    def expect_status(self, status: str, phase: Phase | str | None = None) -> None:
        if self.status != status or (phase is not None and self.phase != Phase(phase)):
            want = status if phase is None else f"{status} ({Phase(phase)})"
            raise self._fail(f"expected status {want}")

    def expect_outcome(self, outcome: str) -> None:
        if self.last.outcome != outcome:
            raise self._fail(
                f"expected the last decision to be {outcome}, it was {self.last.outcome}"
            )

    def expect_awaiting(self, step: str | None) -> None:
        if self.state.awaiting != step:
            raise self._fail(f"expected to await {step}")

    # -- helpers -----------------------------------------------------------------------------

    def _awaited(self) -> Step:
        name = self.state.awaiting
        if name is None:
            raise self._fail("nothing is awaited: there is no step to answer")
        return self.definition.step(name)
