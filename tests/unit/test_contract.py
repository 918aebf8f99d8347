"""The wire contract: committed JSON Schemas, model strictness, naming, and no personal data in
public facts."""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar

import pytest
from pydantic import BaseModel, ValidationError

from schemas import jsonschema
from schemas.base import Message
from schemas.checkout import SAGA_NAMESPACE, StartCheckout, saga_id_for_order
from schemas.common import LineItem, ShippingAddress
from schemas.envelope import Envelope
from schemas.order import OrderCreated
from schemas.registry import REGISTRY, UnknownMessageType, model_for
from tests.unit.samples import ADDRESS, ITEMS, SAMPLES

pytestmark = pytest.mark.unit

TYPE_PATTERN = re.compile(r"^[a-z]+\.[A-Z][A-Za-z]+\.v\d+$")
PERSONAL = re.compile(r"address|name|email|phone|line1|city|postal_code", re.IGNORECASE)

ENVELOPE = Envelope(
    message_id=uuid.UUID("00000000-0000-4000-8000-000000000001"),
    type="order.OrderCreated.v1",
    saga_id=uuid.UUID("00000000-0000-4000-8000-000000000002"),
    correlation_id=uuid.UUID("00000000-0000-4000-8000-000000000002"),
    occurred_at=datetime(2025, 1, 1, tzinfo=UTC),
)

#: every pydantic model on the wire, with a valid instance
ALL_MODELS: dict[str, BaseModel] = {
    **SAMPLES,
    "Envelope": ENVELOPE,
    "LineItem": ITEMS[0],
    "ShippingAddress": ADDRESS,
}


def property_names(schema: Any) -> Iterator[str]:
    """Every property name anywhere in a JSON Schema (nested objects and ``$defs`` included)."""
    if isinstance(schema, dict):
        props = schema.get("properties")
        if isinstance(props, dict):
            yield from props
        for value in schema.values():
            yield from property_names(value)
    elif isinstance(schema, list):
        for value in schema:
            yield from property_names(value)


# ---------------------------------------------------------------------------------------------
# Committed JSON Schema files


def test_committed_schemas_match_the_models() -> None:
    problems = jsonschema.drift()
    assert problems == [], "run `python -m schemas.jsonschema` and commit schemas/json/"


def test_check_command_passes_on_the_committed_files(capsys: pytest.CaptureFixture[str]) -> None:
    assert jsonschema.main(["--check"]) == 0
    assert capsys.readouterr().out == ""


@pytest.fixture
def schema_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private copy of freshly rendered schema files that ``drift()`` checks instead."""
    for name, text in jsonschema.render().items():
        (tmp_path / name).write_text(text)
    monkeypatch.setattr(jsonschema, "JSON_DIR", tmp_path)
    assert jsonschema.drift() == []
    return tmp_path


def test_drift_detects_an_edited_file(schema_dir: Path) -> None:
    path = schema_dir / "payment.PaymentAuthorized.v1.json"
    schema = json.loads(path.read_text())
    schema["properties"]["amount_minor"]["minimum"] = 1
    path.write_text(json.dumps(schema, indent=2, sort_keys=True) + "\n")
    assert jsonschema.drift() == ["stale payment.PaymentAuthorized.v1.json"]


def test_drift_detects_a_whitespace_only_change(schema_dir: Path) -> None:
    path = schema_dir / "envelope.json"
    path.write_text(path.read_text().rstrip("\n"))
    assert jsonschema.drift() == ["stale envelope.json"]


def test_drift_detects_missing_and_unexpected_files(schema_dir: Path) -> None:
    (schema_dir / "order.OrderCreated.v1.json").unlink()
    (schema_dir / "order.OrderCreated.v0.json").write_text("{}\n")
    assert jsonschema.drift() == [
        "missing order.OrderCreated.v1.json",
        "unexpected order.OrderCreated.v0.json",
    ]


def test_check_fails_on_drift_and_regeneration_fixes_it(
    schema_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (schema_dir / "shipping.ShipmentCreated.v1.json").write_text("{}\n")
    assert jsonschema.main(["--check"]) == 1
    assert capsys.readouterr().out == "stale shipping.ShipmentCreated.v1.json\n"
    assert jsonschema.main([]) == 0
    assert jsonschema.drift() == []


def test_drift_detects_a_model_changed_without_regenerating(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    class OrderCreatedWithNote(OrderCreated):
        TYPE: ClassVar[str] = OrderCreated.TYPE
        note: str = ""

    changed = {**REGISTRY, OrderCreated.TYPE: OrderCreatedWithNote}
    monkeypatch.setattr(jsonschema, "REGISTRY", changed)
    assert jsonschema.drift() == ["stale order.OrderCreated.v1.json"]


@pytest.mark.parametrize("type_name", sorted(REGISTRY))
def test_committed_file_describes_its_type(type_name: str) -> None:
    schema = json.loads((jsonschema.JSON_DIR / f"{type_name}.json").read_text())
    assert schema["$id"] == f"urn:sagabus:{type_name}"
    assert schema["x-sagabus-type"] == type_name
    assert schema["x-sagabus-kind"] == REGISTRY[type_name].KIND
    assert schema["additionalProperties"] is False  # extra="forbid" reaches other languages


# ---------------------------------------------------------------------------------------------
# Model strictness


def test_every_wire_type_has_a_sample() -> None:
    assert set(SAMPLES) == set(REGISTRY)
    for type_name, sample in SAMPLES.items():
        assert type(sample) is REGISTRY[type_name]


@pytest.mark.parametrize("name", sorted(ALL_MODELS))
def test_model_is_frozen_and_forbids_extra_fields(name: str) -> None:
    sample = ALL_MODELS[name]
    model = type(sample)
    assert model.model_config.get("frozen") is True
    assert model.model_config.get("extra") == "forbid"

    with pytest.raises(ValidationError) as excinfo:
        model.model_validate({**sample.model_dump(), "unexpected": 1})
    assert [(e["type"], e["loc"]) for e in excinfo.value.errors()] == [
        ("extra_forbidden", ("unexpected",))
    ]

    field = next(iter(model.model_fields))
    with pytest.raises(ValidationError, match="frozen"):
        setattr(sample, field, getattr(sample, field))


@pytest.mark.parametrize("type_name", sorted(SAMPLES))
def test_sample_round_trips_through_json(type_name: str) -> None:
    sample = SAMPLES[type_name]
    assert model_for(type_name).model_validate_json(sample.model_dump_json()) == sample


def test_nested_extra_fields_are_rejected() -> None:
    data = SAMPLES[StartCheckout.TYPE].model_dump()
    data["shipping_address"]["name"] = "Ada Lovelace"
    with pytest.raises(ValidationError, match="extra"):
        StartCheckout.model_validate(data)


def test_unknown_type_is_an_explicit_error() -> None:
    with pytest.raises(UnknownMessageType, match=re.escape("payment.Nope.v1")):
        model_for("payment.Nope.v1")


# ---------------------------------------------------------------------------------------------
# Naming


@pytest.mark.parametrize("type_name", sorted(REGISTRY))
def test_type_name_is_versioned_and_matches_its_class(type_name: str) -> None:
    model = REGISTRY[type_name]
    assert TYPE_PATTERN.match(model.TYPE), model.TYPE
    assert model.TYPE == type_name
    service, cls, _version = type_name.split(".")
    assert cls == model.__name__
    assert model.__module__ == f"schemas.{service}"
    assert model.KIND in ("command", "reply", "fact")


@pytest.mark.parametrize(
    "bad",
    [
        "Payment.PaymentAuthorized.v1",
        "payment.paymentAuthorized.v1",
        "payment.PaymentAuthorized",
        "payment.PaymentAuthorized.V1",
        "payment.Payment_Authorized.v1",
    ],
)
def test_type_pattern_rejects_bad_names(bad: str) -> None:
    assert not TYPE_PATTERN.match(bad)


# ---------------------------------------------------------------------------------------------
# Personal data


FACTS = sorted(t for t, m in REGISTRY.items() if m.KIND == "fact")


def test_there_are_public_facts() -> None:
    assert FACTS == [
        "order.OrderBackordered.v1",
        "order.OrderCancelled.v1",
        "order.OrderCompleted.v1",
        "order.OrderReturned.v1",
    ]


@pytest.mark.parametrize("type_name", FACTS)
def test_public_fact_carries_no_personal_data(type_name: str) -> None:
    model_props = set(property_names(REGISTRY[type_name].model_json_schema()))
    file_props = set(
        property_names(json.loads((jsonschema.JSON_DIR / f"{type_name}.json").read_text()))
    )
    assert model_props == file_props
    assert model_props, "a fact with no fields?"
    assert sorted(p for p in model_props if PERSONAL.search(p)) == []


def test_personal_data_check_would_catch_an_address() -> None:
    # the detector is not vacuous: the entry command does carry an address
    props = set(property_names(StartCheckout.model_json_schema()))
    assert {"shipping_address", "line1", "city", "postal_code"} <= {
        p for p in props if PERSONAL.search(p)
    }


def test_every_message_base_is_message() -> None:
    assert all(issubclass(m, Message) for m in REGISTRY.values())
    assert not issubclass(LineItem, Message) and not issubclass(ShippingAddress, Message)


# ---------------------------------------------------------------------------------------------
# Saga ids


def test_saga_id_for_order_is_deterministic_and_pinned() -> None:
    first = saga_id_for_order("ord-1")
    assert first == saga_id_for_order("ord-1")
    assert first.version == 5
    assert first == uuid.uuid5(SAGA_NAMESPACE, "checkout:ord-1")
    # pinned: a change here re-keys every saga in every database
    assert SAGA_NAMESPACE == uuid.UUID("6f1f3c2e-3f0e-4a53-9d0c-5a8b2d4c7e10")
    assert first == uuid.UUID("35c93012-6f93-5d64-b5a0-917317f21785")


def test_saga_ids_differ_per_order() -> None:
    ids = {saga_id_for_order(f"ord-{i}") for i in range(100)}
    assert len(ids) == 100
