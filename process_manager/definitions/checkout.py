"""The checkout saga, as data.

v1: order -> authorization -> inventory -> shipment -> capture (pivot) -> completion.
v2: order -> risk screening -> authorization -> inventory -> shipment -> capture -> completion,
and an alternative path: an order that allows backorder and finds stock short is backordered
instead of compensated (the authorization is voided, no shipment is booked, the order is
marked BACKORDERED and the saga ends BACKORDERED).

Compensation ladder for the payment: void the authorization; once captured, refund (the refund
supersedes the void); a refused refund issues a credit note (v2); a refused credit note calls a
human.
"""

from __future__ import annotations

from process_manager.engine import Definition, Path, Reconcile, Step
from schemas.checkout import StartCheckout
from schemas.inventory import (
    InventoryBackordered,
    InventoryReleased,
    InventoryReserved,
    InventoryUnavailable,
    ReleaseInventory,
    ReserveInventory,
)
from schemas.order import (
    CancelOrder,
    CompleteOrder,
    CreateOrder,
    MarkOrderBackordered,
    OrderBackordered,
    OrderCancelled,
    OrderCompleted,
    OrderCreated,
)
from schemas.payment import (
    AuthorizationVoided,
    AuthorizePayment,
    CapturePayment,
    CreditNoteIssued,
    CreditNoteRefused,
    GetPaymentStatus,
    IssueCreditNote,
    PaymentAuthorized,
    PaymentCaptured,
    PaymentCaptureFailed,
    PaymentDeclined,
    PaymentRefunded,
    PaymentRefundFailed,
    PaymentStatusReported,
    RefundPayment,
    VoidAuthorization,
)
from schemas.risk import RiskApproved, RiskRejected, ScreenOrder
from schemas.shipping import (
    CancelShipment,
    CreateShipment,
    ShipmentCancelled,
    ShipmentCreated,
    ShipmentFailed,
)


def _order_id(c: StartCheckout) -> str:
    return c.order_id


ORDER = Step(
    "order",
    "order",
    lambda c: CreateOrder(
        order_id=c.order_id,
        customer_id=c.customer_id,
        amount_minor=c.amount_minor,
        currency=c.currency,
    ),
    success=(OrderCreated,),
    compensation="cancel_order",
    status="PENDING_ORDER",
)
RISK = Step(
    "risk",
    "risk",
    lambda c: ScreenOrder(
        order_id=c.order_id,
        customer_id=c.customer_id,
        amount_minor=c.amount_minor,
        currency=c.currency,
    ),
    success=(RiskApproved,),
    failure=(RiskRejected,),
    # a screening leaves nothing to undo
    status="PENDING_RISK",
)
#: what the payment service says happened to a payment step whose replies never came
PAYMENT_STATUS = Step(
    "payment_status",
    "payment",
    lambda c: GetPaymentStatus(order_id=c.order_id),
    success=(PaymentStatusReported,),
    report=lambda r: r.status,  # type: ignore[attr-defined]
)
AUTHORIZATION = Step(
    "authorization",
    "payment",
    lambda c: AuthorizePayment(
        order_id=c.order_id,
        amount_minor=c.amount_minor,
        currency=c.currency,
        payment_token=c.payment_token,
    ),
    success=(PaymentAuthorized,),
    failure=(PaymentDeclined,),
    compensation="void_authorization",
    status="PENDING_PAYMENT",
    reconcile=Reconcile(
        "payment_status",
        happened=frozenset({"authorized", "captured", "refunded", "credited"}),
    ),
)
INVENTORY = Step(
    "inventory",
    "inventory",
    lambda c: ReserveInventory(order_id=c.order_id, items=c.items),
    success=(InventoryReserved,),
    failure=(InventoryUnavailable,),
    compensation="release_inventory",
    status="PENDING_INVENTORY",
)
SHIPMENT = Step(
    "shipment",
    "shipping",
    lambda c: CreateShipment(
        order_id=c.order_id, items=c.items, shipping_address=c.shipping_address
    ),
    success=(ShipmentCreated,),
    failure=(ShipmentFailed,),
    compensation="cancel_shipment",
    status="PENDING_SHIPMENT",
)
CAPTURE = Step(
    "capture",
    "payment",
    lambda c: CapturePayment(order_id=c.order_id, amount_minor=c.amount_minor, currency=c.currency),
    success=(PaymentCaptured,),
    failure=(PaymentCaptureFailed,),
    # only an operator's `sagabus compensate` ever refunds a captured payment
    compensation="refund_payment",
    status="PENDING_CAPTURE",
    kind="pivot",
    supersedes=("void_authorization",),
    # "refunded" or "credited": captured, then undone outside this saga: neither complete nor
    # refund again
    reconcile=Reconcile(
        "payment_status",
        happened=frozenset({"captured"}),
        needs_human=frozenset({"refunded", "credited"}),
    ),
)
COMPLETION = Step(
    "completion",
    "order",
    lambda c: CompleteOrder(order_id=c.order_id),
    success=(OrderCompleted,),
    status="COMPLETING",
    kind="retriable",
)

CANCEL_ORDER = Step(
    "cancel_order",
    "order",
    lambda c: CancelOrder(order_id=c.order_id, reason="checkout_compensated"),
    success=(OrderCancelled,),
)
VOID_AUTHORIZATION = Step(
    "void_authorization",
    "payment",
    lambda c: VoidAuthorization(order_id=c.order_id),
    success=(AuthorizationVoided,),
)
RELEASE_INVENTORY = Step(
    "release_inventory",
    "inventory",
    lambda c: ReleaseInventory(order_id=c.order_id),
    success=(InventoryReleased,),
)
CANCEL_SHIPMENT = Step(
    "cancel_shipment",
    "shipping",
    lambda c: CancelShipment(order_id=c.order_id),
    success=(ShipmentCancelled,),
)


def _refund(fallback: str | None) -> Step:
    return Step(
        "refund_payment",
        "payment",
        lambda c: RefundPayment(
            order_id=c.order_id, amount_minor=c.amount_minor, currency=c.currency
        ),
        success=(PaymentRefunded,),
        failure=(PaymentRefundFailed,),
        fallback=fallback,
    )


ISSUE_CREDIT_NOTE = Step(
    "issue_credit_note",
    "payment",
    lambda c: IssueCreditNote(
        order_id=c.order_id, amount_minor=c.amount_minor, currency=c.currency
    ),
    success=(CreditNoteIssued,),
    failure=(CreditNoteRefused,),
)

V1 = Definition(
    name="checkout",
    version=1,
    start=StartCheckout,
    business_key=_order_id,
    description="order, authorize, reserve, ship, capture (pivot), complete",
    steps=(ORDER, AUTHORIZATION, INVENTORY, SHIPMENT, CAPTURE, COMPLETION),
    compensations=(
        CANCEL_ORDER,
        VOID_AUTHORIZATION,
        RELEASE_INVENTORY,
        CANCEL_SHIPMENT,
        _refund(None),
    ),
    queries=(PAYMENT_STATUS,),
)

#: v2's inventory step: an order that allows backorder and finds stock short takes the
#: backorder path instead of compensating
INVENTORY_V2 = Step(
    "inventory",
    "inventory",
    lambda c: ReserveInventory(
        order_id=c.order_id, items=c.items, allow_backorder=c.allow_backorder
    ),
    success=(InventoryReserved,),
    failure=(InventoryUnavailable,),
    compensation="release_inventory",
    status="PENDING_INVENTORY",
    branches={InventoryBackordered: "backorder"},
)

BACKORDER = Path(
    "backorder",
    steps=(
        # a card hold must not outlive a wait of unknown length: release it now
        Step(
            "release_authorization",
            "payment",
            lambda c: VoidAuthorization(order_id=c.order_id),
            success=(AuthorizationVoided,),
            status="BACKORDERING",
            kind="retriable",
        ),
        Step(
            "mark_backordered",
            "order",
            lambda c: MarkOrderBackordered(order_id=c.order_id),
            success=(OrderBackordered,),
            status="BACKORDERING",
            kind="retriable",
        ),
    ),
    end_status="BACKORDERED",
)

V2 = Definition(
    name="checkout",
    version=2,
    start=StartCheckout,
    business_key=_order_id,
    description=(
        "order, fraud screening, authorize, reserve (or backorder), ship, capture (pivot), "
        "complete; refund then credit note"
    ),
    steps=(ORDER, RISK, AUTHORIZATION, INVENTORY_V2, SHIPMENT, CAPTURE, COMPLETION),
    compensations=(
        CANCEL_ORDER,
        VOID_AUTHORIZATION,
        RELEASE_INVENTORY,
        CANCEL_SHIPMENT,
        _refund("issue_credit_note"),
        ISSUE_CREDIT_NOTE,
    ),
    queries=(PAYMENT_STATUS,),
    paths=(BACKORDER,),
)
