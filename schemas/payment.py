"""Payment service: authorize then capture; to compensate, the ladder void, refund, credit note
(then a manual case). ``RefundOrder`` refunds a completed order (the returns saga)."""

from __future__ import annotations

from typing import ClassVar, Literal

from schemas.base import Message
from schemas.common import Currency, MinorUnits, OrderId, Reason, Token


class AuthorizePayment(Message):
    TYPE: ClassVar[str] = "payment.AuthorizePayment.v1"
    KIND: ClassVar[str] = "command"
    order_id: OrderId
    amount_minor: MinorUnits
    currency: Currency
    payment_token: Token


class CapturePayment(Message):
    TYPE: ClassVar[str] = "payment.CapturePayment.v1"
    KIND: ClassVar[str] = "command"
    order_id: OrderId
    amount_minor: MinorUnits
    currency: Currency


class VoidAuthorization(Message):
    TYPE: ClassVar[str] = "payment.VoidAuthorization.v1"
    KIND: ClassVar[str] = "command"
    order_id: OrderId


class RefundPayment(Message):
    TYPE: ClassVar[str] = "payment.RefundPayment.v1"
    KIND: ClassVar[str] = "command"
    order_id: OrderId
    amount_minor: MinorUnits
    currency: Currency


class RefundOrder(Message):
    """Refund exactly what the ledger says was captured (a return of a completed order)."""

    TYPE: ClassVar[str] = "payment.RefundOrder.v1"
    KIND: ClassVar[str] = "command"
    order_id: OrderId


class IssueCreditNote(Message):
    """Store credit for ``amount_minor``: the rung after a refund the PSP refused."""

    TYPE: ClassVar[str] = "payment.IssueCreditNote.v1"
    KIND: ClassVar[str] = "command"
    order_id: OrderId
    amount_minor: MinorUnits
    currency: Currency


class GetPaymentStatus(Message):
    TYPE: ClassVar[str] = "payment.GetPaymentStatus.v1"
    KIND: ClassVar[str] = "command"
    order_id: OrderId


class PaymentAuthorized(Message):
    TYPE: ClassVar[str] = "payment.PaymentAuthorized.v1"
    KIND: ClassVar[str] = "reply"
    order_id: OrderId
    authorization_id: Token
    amount_minor: MinorUnits


class PaymentDeclined(Message):
    TYPE: ClassVar[str] = "payment.PaymentDeclined.v1"
    KIND: ClassVar[str] = "reply"
    order_id: OrderId
    reason: Reason


class PaymentCaptured(Message):
    TYPE: ClassVar[str] = "payment.PaymentCaptured.v1"
    KIND: ClassVar[str] = "reply"
    order_id: OrderId
    authorization_id: Token
    amount_minor: MinorUnits


class PaymentCaptureFailed(Message):
    TYPE: ClassVar[str] = "payment.PaymentCaptureFailed.v1"
    KIND: ClassVar[str] = "reply"
    order_id: OrderId
    reason: Reason


class AuthorizationVoided(Message):
    TYPE: ClassVar[str] = "payment.AuthorizationVoided.v1"
    KIND: ClassVar[str] = "reply"
    order_id: OrderId
    #: False when there was nothing to void (never authorized, or declined): a tombstone.
    had_authorization: bool


class PaymentRefunded(Message):
    TYPE: ClassVar[str] = "payment.PaymentRefunded.v1"
    KIND: ClassVar[str] = "reply"
    order_id: OrderId
    amount_minor: MinorUnits


class PaymentRefundFailed(Message):
    TYPE: ClassVar[str] = "payment.PaymentRefundFailed.v1"
    KIND: ClassVar[str] = "reply"
    order_id: OrderId
    reason: Reason


class CreditNoteIssued(Message):
    TYPE: ClassVar[str] = "payment.CreditNoteIssued.v1"
    KIND: ClassVar[str] = "reply"
    order_id: OrderId
    credit_note_id: Token
    amount_minor: MinorUnits


class CreditNoteRefused(Message):
    TYPE: ClassVar[str] = "payment.CreditNoteRefused.v1"
    KIND: ClassVar[str] = "reply"
    order_id: OrderId
    reason: Reason


class PaymentStatusReported(Message):
    TYPE: ClassVar[str] = "payment.PaymentStatusReported.v1"
    KIND: ClassVar[str] = "reply"
    order_id: OrderId
    #: "credited": captured, the refund refused, and store credit issued instead
    status: Literal["none", "authorized", "declined", "captured", "voided", "refunded", "credited"]
