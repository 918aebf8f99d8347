"""Public facts carry no personal data: every field of every fact schema is an id or token, an
amount, a currency or enum code, or a duration. This is an allow-list; the deny-list of
personal field names is ``tests/unit/test_contract.py::test_public_fact_carries_no_personal_data``
(and the committed JSON Schema files are checked against the models there)."""

from __future__ import annotations

from typing import Any

import pytest

from schemas.registry import REGISTRY

pytestmark = pytest.mark.unit

#: ids and tokens: opaque, a restricted alphabet without spaces
TOKEN_PATTERN = "^[A-Za-z0-9._:-]+$"
FACTS = sorted(t for t, m in REGISTRY.items() if m.KIND == "fact")


def classify(name: str, prop: dict[str, Any]) -> str | None:
    """What kind of public value a property is, or None when it could carry anything."""
    kind = prop.get("type")
    if "enum" in prop or "const" in prop:
        return "enum"
    if kind == "string" and prop.get("pattern") == TOKEN_PATTERN and name.endswith("_id"):
        return "id"
    if kind == "string" and prop.get("pattern") == TOKEN_PATTERN and name.endswith("_token"):
        return "token"
    if kind == "string" and prop.get("pattern") in ("^[A-Z]{3}$", "^[A-Z]{2}$"):
        return "code"
    if kind == "integer" and name.endswith("_minor"):
        return "amount"
    if kind == "integer" and name.endswith(("_ms", "_s")):
        return "duration"
    return None


FIELDS = [
    pytest.param(type_name, field, id=f"{type_name}:{field}")
    for type_name in FACTS
    for field in sorted(REGISTRY[type_name].model_json_schema()["properties"])
]


def test_there_are_facts_to_check() -> None:
    assert FACTS


@pytest.mark.parametrize(("type_name", "field"), FIELDS)
def test_every_fact_field_is_an_id_token_amount_code_or_duration(
    type_name: str, field: str
) -> None:
    schema = REGISTRY[type_name].model_json_schema()
    assert "$defs" not in schema, "facts carry flat values, no nested objects"
    prop = schema["properties"][field]
    assert classify(field, prop) is not None, f"{type_name}.{field} could carry anything: {prop}"


def test_the_classifier_rejects_personal_data() -> None:
    assert classify("line1", {"type": "string", "maxLength": 200}) is None
    assert classify("email", {"type": "string", "pattern": TOKEN_PATTERN}) is None
    assert classify("customer_id", {"type": "string", "pattern": TOKEN_PATTERN}) == "id"
