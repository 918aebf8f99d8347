"""Value types shared by several message bodies.

Strings are taken exactly as sent: nothing is stripped, trimmed or coerced, so a model accepts
what its published JSON Schema accepts (``tests/unit/test_conformance.py`` checks it). Where
surrounding whitespace would be a mistake, the pattern rejects it.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from schemas.iso4217 import CURRENCIES, NO_CURRENCY

#: identifiers: letters, digits and ``. _ : -`` only (so no whitespace anywhere)
IDENTIFIER = r"^[A-Za-z0-9._:-]+$"
#: free text: no control character anywhere, and neither a space nor a control character at
#: either end (so never blank). Written with explicit ranges, not ``\s`` or ``.``, whose meaning
#: differs between regex dialects (ECMA 262, Rust, Python).
TEXT = r"^[^\x00-\x20\x7f-\x9f](?:[^\x00-\x1f\x7f-\x9f]*[^\x00-\x20\x7f-\x9f])?$"
#: the bound on a checkout's total (the sum of quantity x unit price), in minor units
MAX_TOTAL_MINOR = 10**12

Sku = Annotated[str, Field(min_length=1, max_length=64, pattern=IDENTIFIER)]
OrderId = Annotated[str, Field(min_length=1, max_length=64, pattern=IDENTIFIER)]
Token = Annotated[str, Field(min_length=1, max_length=128, pattern=IDENTIFIER)]
MinorUnits = Annotated[int, Field(ge=0, le=MAX_TOTAL_MINOR)]
Reason = Annotated[str, Field(max_length=500)]


def _currency_in(codes: frozenset[str]) -> AfterValidator:
    def check(code: str) -> str:
        if code not in codes:
            raise ValueError(f"{code!r} is not an active ISO 4217 currency code")
        return code

    return AfterValidator(check)


#: an active ISO 4217 currency code (``schemas.iso4217.CURRENCIES``); the JSON Schema lists them
Currency = Annotated[
    str,
    Field(
        pattern=r"^[A-Z]{3}$",
        description="An active ISO 4217 currency code.",
        json_schema_extra={"enum": sorted(CURRENCIES)},
    ),
    _currency_in(CURRENCIES),
]
#: a currency in a public order fact: an active ISO 4217 code, or ``XXX`` (ISO 4217's "no
#: currency involved") for an order that never existed
FactCurrency = Annotated[
    str,
    Field(
        pattern=r"^[A-Z]{3}$",
        description="An active ISO 4217 currency code, or XXX for an order that never existed.",
        json_schema_extra={"enum": sorted(CURRENCIES | {NO_CURRENCY})},
    ),
    _currency_in(CURRENCIES | {NO_CURRENCY}),
]


class LineItem(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    sku: Sku
    quantity: int = Field(ge=1, le=10_000)
    unit_price_minor: MinorUnits


class ShippingAddress(BaseModel):
    """Where to ship. Travels only in targeted commands, never in public facts."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    line1: str = Field(min_length=1, max_length=200, pattern=TEXT)
    city: str = Field(min_length=1, max_length=100, pattern=TEXT)
    postal_code: str = Field(min_length=1, max_length=20, pattern=TEXT)
    country: str = Field(pattern=r"^[A-Z]{2}$")
