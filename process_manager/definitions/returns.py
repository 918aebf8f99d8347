"""The returns saga, as data: a customer returns a completed order.

return pending -> pickup -> refund (pivot) -> restock -> complete return (order RETURNED).
A refused return (the order is not completed, or already returned) or a failed pickup
compensates what was done: the pickup is cancelled and the order goes back to COMPLETED.
After the refund the saga only moves forward: restocking and marking the order returned are
re-sent until they are answered, then a human is called.
"""

from __future__ import annotations

from process_manager.definitions.checkout import PAYMENT_STATUS
from process_manager.engine import Definition, Reconcile, StartRule, Step
from schemas.inventory import ItemsRestocked, RestockItems
from schemas.order import (
    CancelReturn,
    CompleteReturn,
    MarkReturnPending,
    OrderReturnCancelled,
    OrderReturned,
    OrderReturnPending,
    OrderReturnRefused,
)
from schemas.payment import PaymentRefunded, PaymentRefundFailed, RefundOrder
from schemas.returns import StartReturn
from schemas.shipping import (
    BookPickup,
    CancelPickup,
    PickupBooked,
    PickupCancelled,
    PickupFailed,
)


def _order_id(r: StartReturn) -> str:
    return r.order_id


V1 = Definition(
    name="returns",
    version=1,
    start=StartReturn,
    business_key=_order_id,
    description="mark return pending, book pickup, refund (pivot), restock, order RETURNED",
    steps=(
        Step(
            "return_pending",
            "order",
            lambda r: MarkReturnPending(order_id=r.order_id),
            success=(OrderReturnPending,),
            failure=(OrderReturnRefused,),
            compensation="cancel_return",
            status="PENDING_RETURN",
        ),
        Step(
            "pickup",
            "shipping",
            lambda r: BookPickup(order_id=r.order_id),
            success=(PickupBooked,),
            failure=(PickupFailed,),
            compensation="cancel_pickup",
            status="PENDING_PICKUP",
        ),
        Step(
            "refund",
            "payment",
            lambda r: RefundOrder(order_id=r.order_id),
            success=(PaymentRefunded,),
            failure=(PaymentRefundFailed,),
            status="PENDING_REFUND",
            kind="pivot",
            reconcile=Reconcile(
                "payment_status",
                happened=frozenset({"refunded"}),
                needs_human=frozenset({"credited"}),
            ),
        ),
        Step(
            "restock",
            "inventory",
            lambda r: RestockItems(order_id=r.order_id),
            success=(ItemsRestocked,),
            status="RESTOCKING",
            kind="retriable",
        ),
        Step(
            "complete_return",
            "order",
            lambda r: CompleteReturn(order_id=r.order_id),
            success=(OrderReturned,),
            status="COMPLETING_RETURN",
            kind="retriable",
        ),
    ),
    compensations=(
        Step(
            "cancel_return",
            "order",
            lambda r: CancelReturn(order_id=r.order_id),
            success=(OrderReturnCancelled,),
        ),
        Step(
            "cancel_pickup",
            "shipping",
            lambda r: CancelPickup(order_id=r.order_id),
            success=(PickupCancelled,),
        ),
    ),
    queries=(PAYMENT_STATUS,),
    completed_status="RETURNED",
    requires=StartRule(
        saga="checkout",
        statuses=frozenset({"COMPLETED"}),
        key=_order_id,
        refusal="order {key} is not completed (its checkout is {found}): only a completed "
        "order can be returned",
    ),
    once=True,
)
