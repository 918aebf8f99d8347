"""Scenarios of the registered definitions, a few lines each, through the test kit
(``process_manager.testing``): checkout v2's risk step, backorder path and credit-note ladder,
the returns saga, and a saga that keeps its version."""

from __future__ import annotations

import pytest

from process_manager.definitions import checkout, returns
from process_manager.engine import InvalidTransition, Phase, Policy
from process_manager.testing import SagaHarness, sample_checkout
from schemas.inventory import InventoryBackordered
from schemas.order import OrderCreated
from schemas.payment import (
    CreditNoteRefused,
    PaymentRefunded,
    PaymentRefundFailed,
    PaymentStatusReported,
)
from schemas.shipping import PickupBooked

pytestmark = pytest.mark.unit

MONEY_BACK = ("payment.VoidAuthorization.v1", "payment.RefundPayment.v1")


# -- checkout v2 -------------------------------------------------------------------------------


def test_v2_happy_path_screens_the_order_before_any_money_moves() -> None:
    saga = SagaHarness(checkout.V2)
    saga.start()
    saga.expect_sent("order.CreateOrder.v1")
    saga.reply(OrderCreated)
    saga.expect_sent("risk.ScreenOrder.v1")
    assert saga.status == "PENDING_RISK"
    saga.finish()
    saga.expect_status("COMPLETED", Phase.COMPLETED)
    assert saga.bus.types() == [
        "order.CreateOrder.v1",
        "risk.ScreenOrder.v1",
        "payment.AuthorizePayment.v1",
        "inventory.ReserveInventory.v1",
        "shipping.CreateShipment.v1",
        "payment.CapturePayment.v1",
        "order.CompleteOrder.v1",
    ]


def test_v2_risk_rejected_compensates_the_order_only() -> None:
    saga = SagaHarness(checkout.V2)
    saga.start()
    saga.run_to("risk")
    saga.answer(ok=False)  # RiskRejected
    saga.expect_sent("order.CancelOrder.v1")
    assert "risk failed: RiskRejected (customer_blocked)" in (saga.state.failure_reason or "")
    saga.finish()
    saga.expect_status("COMPENSATED", Phase.COMPENSATED)
    assert saga.state.compensated == ("cancel_order",)
    saga.expect_never_sent("payment.AuthorizePayment.v1", *MONEY_BACK)


def test_v2_backorder_voids_the_hold_and_marks_the_order_backordered() -> None:
    saga = SagaHarness(checkout.V2)
    saga.start(sample_checkout(allow_backorder=True))
    saga.run_to("inventory")
    (reserve,) = saga.last.commands
    assert reserve.body.allow_backorder is True  # type: ignore[attr-defined]
    saga.reply(InventoryBackordered)
    saga.expect_sent("payment.VoidAuthorization.v1")
    assert (saga.status, saga.state.path) == ("BACKORDERING", "backorder")
    saga.answer()
    saga.expect_sent("order.MarkOrderBackordered.v1")
    saga.answer()
    saga.expect_sent()
    saga.expect_status("BACKORDERED", Phase.COMPLETED)
    assert saga.state.completed == (
        "order",
        "risk",
        "authorization",
        "inventory",
        "release_authorization",
        "mark_backordered",
    )
    saga.expect_never_sent(
        "shipping.CreateShipment.v1",
        "payment.CapturePayment.v1",
        "inventory.ReleaseInventory.v1",
        "order.CancelOrder.v1",
    )


def test_v2_backorder_steps_are_re_sent_never_compensated() -> None:
    saga = SagaHarness(checkout.V2, policy=Policy(max_retriable_attempts=3))
    saga.start(sample_checkout(allow_backorder=True))
    saga.run_to("inventory")
    saga.reply(InventoryBackordered)
    saga.advance(hours=1)  # every re-send of the void falls due, then a human is called
    saga.expect_status("FAILED_NEEDS_MANUAL", Phase.FAILED_NEEDS_MANUAL)
    assert [c.step for c in saga.sent].count("release_authorization") == 3
    saga.expect_never_sent("order.CancelOrder.v1", "inventory.ReleaseInventory.v1")
    saga.resume()  # the operator fixed the payment service: go on forward
    saga.expect_sent("payment.VoidAuthorization.v1")
    saga.finish()
    saga.expect_status("BACKORDERED", Phase.COMPLETED)


def test_v2_an_order_that_does_not_allow_backorder_is_compensated_when_stock_is_short() -> None:
    saga = SagaHarness(checkout.V2)
    saga.start()
    saga.run_to("inventory")
    saga.answer(ok=False)  # InventoryUnavailable
    saga.expect_sent("payment.VoidAuthorization.v1")
    saga.finish()
    saga.expect_status("COMPENSATED", Phase.COMPENSATED)
    assert saga.state.path == "main"


def _v2_refund_refused() -> SagaHarness:
    saga = SagaHarness(checkout.V2)
    saga.start()
    saga.run_to("completion")
    saga.compensate("customer cancelled after capture")
    saga.expect_sent("payment.RefundPayment.v1")
    saga.reply(PaymentRefundFailed)
    saga.expect_sent("payment.IssueCreditNote.v1")
    assert saga.status == "COMPENSATING"
    return saga


def test_v2_a_refused_refund_issues_a_credit_note_then_goes_on_compensating() -> None:
    saga = _v2_refund_refused()
    saga.answer()  # CreditNoteIssued
    saga.expect_sent("shipping.CancelShipment.v1")
    saga.finish()
    saga.expect_status("COMPENSATED", Phase.COMPENSATED)
    assert saga.state.compensated == (
        "refund_payment",
        "issue_credit_note",
        "cancel_shipment",
        "release_inventory",
        "cancel_order",
    )
    saga.expect_never_sent("payment.VoidAuthorization.v1")  # the refund supersedes the void


def test_v2_a_refused_credit_note_calls_a_human() -> None:
    saga = _v2_refund_refused()
    saga.reply(CreditNoteRefused)
    saga.expect_sent()
    saga.expect_status("FAILED_NEEDS_MANUAL", Phase.FAILED_NEEDS_MANUAL)
    assert "issue_credit_note failed: CreditNoteRefused" in (saga.state.failure_reason or "")
    saga.expect_never_sent("shipping.CancelShipment.v1")


def test_v2_resume_after_an_unanswered_credit_note_never_goes_back_to_the_refund() -> None:
    """The refund was refused and the credit note's outcome is unknown: an operator's resume
    asks for the credit note again (same idempotency key), never the refund as well."""
    saga = _v2_refund_refused()
    saga.advance(hours=3)  # every send of the credit note unanswered
    saga.expect_status("FAILED_NEEDS_MANUAL", Phase.FAILED_NEEDS_MANUAL)
    refunds = len([c for c in saga.sent if c.body.TYPE == "payment.RefundPayment.v1"])
    saga.resume()
    saga.expect_sent("payment.IssueCreditNote.v1")
    saga.answer()  # CreditNoteIssued
    saga.finish()
    saga.expect_status("COMPENSATED", Phase.COMPENSATED)
    assert len([c for c in saga.sent if c.body.TYPE == "payment.RefundPayment.v1"]) == refunds


def test_v1_has_no_credit_note_a_refused_refund_calls_a_human() -> None:
    saga = SagaHarness(checkout.V1)
    saga.start()
    saga.run_to("completion")
    saga.compensate("customer cancelled after capture")
    saga.reply(PaymentRefundFailed)
    saga.expect_sent()
    saga.expect_status("FAILED_NEEDS_MANUAL")
    saga.expect_never_sent("payment.IssueCreditNote.v1")


def test_a_v1_saga_decided_with_the_v2_definition_is_an_invalid_transition() -> None:
    v1 = SagaHarness(checkout.V1)
    v1.start()
    v1.run_to("inventory")
    on_v2 = SagaHarness(checkout.V2, state=v1.state)
    with pytest.raises(InvalidTransition, match=r"runs on checkout\.v1, not checkout\.v2"):
        on_v2.answer()
    with pytest.raises(InvalidTransition):
        on_v2.timeout()


def test_a_v1_saga_ignores_allow_backorder() -> None:
    saga = SagaHarness(checkout.V1)
    saga.start(sample_checkout(allow_backorder=True))
    saga.run_to("inventory")
    assert saga.last.commands[0].body.allow_backorder is False  # type: ignore[attr-defined]
    saga.reply(InventoryBackordered)  # not a reply v1 knows
    saga.expect_outcome("ignored")
    assert saga.status == "PENDING_INVENTORY"


# -- returns -----------------------------------------------------------------------------------


def test_returns_happy_path_ends_returned() -> None:
    saga = SagaHarness(returns.V1)
    saga.start()
    saga.finish()
    saga.expect_status("RETURNED", Phase.COMPLETED)
    assert saga.bus.types() == [
        "order.MarkReturnPending.v1",
        "shipping.BookPickup.v1",
        "payment.RefundOrder.v1",
        "inventory.RestockItems.v1",
        "order.CompleteReturn.v1",
    ]


def test_returns_a_refused_return_compensates_nothing() -> None:
    saga = SagaHarness(returns.V1)
    saga.start()
    saga.answer(ok=False)  # OrderReturnRefused
    saga.expect_sent()
    saga.expect_status("COMPENSATED", Phase.COMPENSATED)


def test_returns_a_failed_pickup_cancels_the_return_only() -> None:
    saga = SagaHarness(returns.V1)
    saga.start()
    saga.run_to("pickup")
    saga.answer(ok=False)  # PickupFailed
    saga.expect_sent("order.CancelReturn.v1")
    saga.finish()
    saga.expect_status("COMPENSATED", Phase.COMPENSATED)
    saga.expect_never_sent("shipping.CancelPickup.v1", "payment.RefundOrder.v1")


def test_returns_a_refused_refund_cancels_the_pickup_and_the_return() -> None:
    saga = SagaHarness(returns.V1)
    saga.start()
    saga.run_to("refund")
    saga.answer(ok=False)  # PaymentRefundFailed: the pivot failed, nothing of it to undo
    saga.expect_sent("shipping.CancelPickup.v1")
    saga.answer()
    saga.expect_sent("order.CancelReturn.v1")
    saga.answer()
    saga.expect_status("COMPENSATED", Phase.COMPENSATED)
    assert saga.state.compensated == ("cancel_pickup", "cancel_return")


def test_returns_late_and_duplicate_replies_after_the_refund_change_nothing() -> None:
    saga = SagaHarness(returns.V1)
    saga.start()
    saga.run_to("refund")
    refund_fence = saga.state.seq
    saga.answer()  # refunded: past the point of no return
    saga.expect_sent("inventory.RestockItems.v1")
    before = saga.state
    saga.duplicate_last_reply()
    saga.expect_outcome("ignored")
    saga.reply(PaymentRefunded, fence=refund_fence)  # a second copy of the refund's reply
    saga.expect_outcome("ignored")
    saga.reply(PickupBooked, fence=refund_fence - 1)  # a very late pickup reply
    saga.expect_outcome("ignored")
    saga.reply(PaymentRefundFailed, fence=refund_fence)  # a contradicting late failure
    saga.expect_outcome("ignored")
    saga.expect_sent()
    assert saga.state == before
    saga.advance(minutes=5)  # restock unanswered: re-sent with backoff, never undone
    assert {c.step for c in saga.last.commands} == {"restock"}
    saga.finish()
    saga.expect_status("RETURNED", Phase.COMPLETED)
    saga.expect_never_sent("shipping.CancelPickup.v1", "order.CancelReturn.v1")


def test_returns_an_unanswered_refund_asks_the_payment_status_first() -> None:
    saga = SagaHarness(returns.V1)
    saga.start()
    saga.run_to("refund")
    saga.advance(seconds=90)  # three sends of the refund, all unanswered
    saga.expect_sent("payment.GetPaymentStatus.v1")
    saga.reply(PaymentStatusReported, status="refunded")
    saga.expect_sent("inventory.RestockItems.v1")
    assert "refund" in saga.state.completed


def test_returns_a_credited_refund_calls_a_human() -> None:
    saga = SagaHarness(returns.V1)
    saga.start()
    saga.run_to("refund")
    saga.advance(seconds=90)
    saga.reply(PaymentStatusReported, status="credited")
    saga.expect_sent()
    saga.expect_status("FAILED_NEEDS_MANUAL")


def test_returns_stale_and_forged_replies() -> None:
    saga = SagaHarness(returns.V1)
    saga.start()
    saga.run_to("pickup")
    saga.reply(PickupBooked, token=None)
    saga.expect_outcome("rejected")
    saga.reply(PickupBooked, token="0" * 32)
    saga.expect_outcome("rejected")
    assert saga.status == "PENDING_PICKUP"
    saga.answer()
    saga.expect_sent("payment.RefundOrder.v1")
