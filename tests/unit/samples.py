"""One valid instance of every wire type. ``test_contract`` fails when a type has no sample, so
a new message cannot skip the contract checks."""

from __future__ import annotations

from schemas.base import Message
from schemas.checkout import StartCheckout
from schemas.common import LineItem, ShippingAddress
from schemas.inventory import (
    InventoryBackordered,
    InventoryReleased,
    InventoryReserved,
    InventoryUnavailable,
    ItemsRestocked,
    ReleaseInventory,
    ReserveInventory,
    RestockItems,
)
from schemas.order import (
    CancelOrder,
    CancelReturn,
    CompleteOrder,
    CompleteReturn,
    CreateOrder,
    MarkOrderBackordered,
    MarkReturnPending,
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
    RefundOrder,
    RefundPayment,
    VoidAuthorization,
)
from schemas.returns import StartReturn
from schemas.risk import RiskApproved, RiskRejected, ScreenOrder
from schemas.shipping import (
    BookPickup,
    CancelPickup,
    CancelShipment,
    CreateShipment,
    PickupBooked,
    PickupCancelled,
    PickupFailed,
    ShipmentCancelled,
    ShipmentCreated,
    ShipmentFailed,
)

OID = "ord-42"
ITEMS = (LineItem(sku="SKU-1", quantity=2, unit_price_minor=1250),)
ADDRESS = ShippingAddress(line1="1 Test Street", city="Utrecht", postal_code="3511AA", country="NL")

_ALL: tuple[Message, ...] = (
    StartCheckout(
        order_id=OID,
        customer_id="cus_1",
        currency="EUR",
        items=ITEMS,
        payment_token="tok_visa",
        shipping_address=ADDRESS,
    ),
    StartReturn(order_id=OID, reason="changed my mind"),
    CreateOrder(order_id=OID, customer_id="cus_1", amount_minor=2500, currency="EUR"),
    CompleteOrder(order_id=OID),
    CancelOrder(order_id=OID, reason="checkout_compensated"),
    OrderCreated(order_id=OID),
    OrderCompleted(
        order_id=OID, customer_id="cus_1", amount_minor=2500, currency="EUR", duration_ms=10
    ),
    OrderCancelled(
        order_id=OID,
        customer_id="cus_1",
        amount_minor=2500,
        currency="EUR",
        duration_ms=10,
        reason="checkout_compensated",
    ),
    AuthorizePayment(order_id=OID, amount_minor=2500, currency="EUR", payment_token="tok_visa"),
    CapturePayment(order_id=OID, amount_minor=2500, currency="EUR"),
    VoidAuthorization(order_id=OID),
    RefundPayment(order_id=OID, amount_minor=2500, currency="EUR"),
    GetPaymentStatus(order_id=OID),
    PaymentAuthorized(order_id=OID, authorization_id="auth_1", amount_minor=2500),
    PaymentDeclined(order_id=OID, reason="insufficient funds"),
    PaymentCaptured(order_id=OID, authorization_id="auth_1", amount_minor=2500),
    PaymentCaptureFailed(order_id=OID, reason="expired"),
    AuthorizationVoided(order_id=OID, had_authorization=True),
    PaymentRefunded(order_id=OID, amount_minor=2500),
    PaymentRefundFailed(order_id=OID, reason="card closed"),
    PaymentStatusReported(order_id=OID, status="captured"),
    RefundOrder(order_id=OID),
    IssueCreditNote(order_id=OID, amount_minor=2500, currency="EUR"),
    CreditNoteIssued(order_id=OID, credit_note_id="cn_1", amount_minor=2500),
    CreditNoteRefused(order_id=OID, reason="store credit not available"),
    ScreenOrder(order_id=OID, customer_id="cus_1", amount_minor=2500, currency="EUR"),
    RiskApproved(order_id=OID, screening_id="scr_1"),
    RiskRejected(order_id=OID, reason="amount_above_limit"),
    ReserveInventory(order_id=OID, items=ITEMS),
    ReleaseInventory(order_id=OID),
    InventoryReserved(order_id=OID, reservation_id="res-1"),
    InventoryUnavailable(order_id=OID, skus=("SKU-1",)),
    InventoryReleased(order_id=OID, units_released=2),
    CreateShipment(order_id=OID, items=ITEMS, shipping_address=ADDRESS),
    CancelShipment(order_id=OID),
    ShipmentCreated(order_id=OID, tracking_number="TRK-1"),
    ShipmentFailed(order_id=OID, reason="carrier down"),
    ShipmentCancelled(order_id=OID, had_shipment=True),
    # the returns saga and backorders
    MarkReturnPending(order_id=OID),
    CancelReturn(order_id=OID),
    CompleteReturn(order_id=OID),
    MarkOrderBackordered(order_id=OID),
    OrderReturnPending(order_id=OID),
    OrderReturnRefused(order_id=OID, reason="order not completed"),
    OrderReturnCancelled(order_id=OID, had_return=True),
    OrderReturned(order_id=OID, customer_id="cus_1", amount_minor=2500, currency="EUR"),
    OrderBackordered(order_id=OID, customer_id="cus_1", amount_minor=2500, currency="EUR"),
    RestockItems(order_id=OID),
    InventoryBackordered(order_id=OID, skus=("SKU-1",)),
    ItemsRestocked(order_id=OID, units_restocked=2),
    BookPickup(order_id=OID),
    CancelPickup(order_id=OID),
    PickupBooked(order_id=OID, pickup_id="PU-1"),
    PickupFailed(order_id=OID, reason="carrier cannot collect at this address"),
    PickupCancelled(order_id=OID, had_pickup=True),
)

SAMPLES: dict[str, Message] = {m.TYPE: m for m in _ALL}
