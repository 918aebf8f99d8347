"""Conformance: each committed JSON Schema (``schemas/json``) and its model accept exactly the
same instances.

Two directions, from each schema file as committed (what other languages read):

- instances generated from the schema (``from_schema`` below) validate in the model;
- instances mutated from valid ones (wrong types such as ``"2"``, ``2.0`` and ``2.5`` for an
  integer, extra and missing properties, numbers and lengths out of range, strings that break a
  pattern or an enum, surrounding whitespace) are judged by the ``jsonschema`` validator, and
  the model must agree: it rejects what the schema rejects and accepts what it accepts.

The model is validated the way the consumer does it (``Message.from_json``: pydantic's strict
mode on the JSON text). The validator reads the schema as its ``$comment`` says: an integer is
a JSON number without a fraction (JSON Schema 2020-12 would also let ``2.0`` through, and this
contract does not), and a pattern's ``$`` matches only at the end, as in ECMA 262 (Python's
``re``, which ``jsonschema`` uses, also matches it before a final newline).

``from_schema`` is a small generator for the keywords these schemas use, built on Hypothesis's
public strategies; a test fails when a schema starts using a keyword it does not know.
(``hypothesis-jsonschema`` 0.23.1, the latest release, calls a private Hypothesis API that
Hypothesis 6.170 no longer has.)

The one explicit exception: rules across fields that JSON Schema cannot express, listed in
``CROSS_FIELD_RULES`` and described in the schema itself. An instance the schema accepts but
that breaks one of them must be rejected by the model; every other one must be accepted.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, timedelta, timezone
from typing import Any

import jsonschema as jsonschema_lib
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, ValidationError

from messaging.codec import decode
from messaging.errors import PermanentError
from schemas.base import Message
from schemas.checkout import StartCheckout
from schemas.common import MAX_TOTAL_MINOR
from schemas.envelope import Envelope
from schemas.iso4217 import CURRENCIES
from schemas.jsonschema import JSON_DIR
from schemas.registry import REGISTRY
from tests.unit.samples import SAMPLES

pytestmark = pytest.mark.unit

Json = Any
Instance = dict[str, Any]

#: every committed schema file by its stem (``envelope`` or a wire type name)
SCHEMAS: dict[str, Json] = {
    p.stem: json.loads(p.read_text()) for p in sorted(JSON_DIR.glob("*.json"))
}

FAST = settings(
    max_examples=15,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def model_for_file(stem: str) -> type[BaseModel]:
    return Envelope if stem == "envelope" else REGISTRY[stem]


def model_accepts(model: type[BaseModel], instance: Json) -> bool:
    text = json.dumps(instance)
    try:
        if issubclass(model, Message):
            model.from_json(text)  # what messaging.codec.decode runs
        else:
            model.model_validate_json(text, strict=True)
    except ValidationError:
        return False
    return True


# ---------------------------------------------------------------------------------------------
# Rules JSON Schema cannot express: the explicit exception


def _items(instance: Instance) -> list[dict[str, Any]]:
    return list(instance["items"])


def _repeated_sku(instance: Instance) -> bool:
    skus = [i["sku"] for i in _items(instance)]
    return len(skus) != len(set(skus))


def _total_above_bound(instance: Instance) -> bool:
    total: int = sum(i["quantity"] * i["unit_price_minor"] for i in _items(instance))
    return total > MAX_TOTAL_MINOR


#: per wire type: (name, is broken by this schema-valid instance, text the schema must carry)
CROSS_FIELD_RULES: dict[str, list[tuple[str, Callable[[Instance], bool], str]]] = {
    StartCheckout.TYPE: [
        ("distinct skus", _repeated_sku, "no sku may repeat"),
        ("total at most 10^12", _total_above_bound, "must not exceed 1000000000000 (10^12)"),
    ],
}


def broken_rules(stem: str, instance: Instance) -> list[str]:
    return [name for name, broken, _ in CROSS_FIELD_RULES.get(stem, []) if broken(instance)]


@pytest.mark.parametrize("stem", sorted(CROSS_FIELD_RULES))
def test_cross_field_rules_are_described_in_the_schema(stem: str) -> None:
    text = json.dumps(SCHEMAS[stem])
    for name, _, described in CROSS_FIELD_RULES[stem]:
        assert described in text, f"{stem}: the schema does not describe {name!r}"


# ---------------------------------------------------------------------------------------------
# The judge: the jsonschema library, reading the schema as its $comment says


def _integer(_checker: Any, instance: Any) -> bool:
    return isinstance(instance, int) and not isinstance(instance, bool)


def _ecma_pattern(
    validator: Any, pattern: str, instance: Any, _schema: Any
) -> Iterator[jsonschema_lib.ValidationError]:
    if validator.is_type(instance, "string") and not re.search(_python_pattern(pattern), instance):
        yield jsonschema_lib.ValidationError(f"{instance!r} does not match {pattern!r}")


StrictValidator = jsonschema_lib.validators.extend(
    jsonschema_lib.Draft202012Validator,
    validators={"pattern": _ecma_pattern},
    type_checker=jsonschema_lib.Draft202012Validator.TYPE_CHECKER.redefine("integer", _integer),
)


# ---------------------------------------------------------------------------------------------
# The generator: valid instances from a schema


def _python_pattern(pattern: str) -> str:
    """An ECMA 262 pattern for Python's ``re``: its trailing ``$`` made to match only at the end."""
    if pattern.endswith("$") and not pattern.endswith("\\$"):
        return pattern[:-1] + r"\Z"
    return pattern


#: keywords that only annotate (ignored by the generator) and those it turns into strategies
ANNOTATIONS = {"$comment", "$id", "$schema", "$defs", "title", "description", "default"}
GENERATED = {
    "$ref",
    "anyOf",
    "enum",
    "const",
    "type",
    "properties",
    "required",
    "additionalProperties",
    "items",
    "minItems",
    "maxItems",
    "minLength",
    "maxLength",
    "pattern",
    "format",
    "minimum",
    "maximum",
}
FORMATS = {"uuid", "date-time"}
TEXT_CHARS = st.characters(codec="utf-8")
_OFFSETS = st.integers(-14 * 60, 14 * 60).map(lambda m: timezone(timedelta(minutes=m)))


def keywords(schema: Json) -> Iterator[str]:
    """Every keyword used anywhere in a schema (property names and ``$defs`` names skipped)."""
    if isinstance(schema, dict):
        for key, value in schema.items():
            if not key.startswith("x-"):
                yield key
            if key in ("properties", "$defs"):
                for sub in value.values():
                    yield from keywords(sub)
            elif key in ("items", "anyOf"):
                for sub in value if isinstance(value, list) else [value]:
                    yield from keywords(sub)


def from_schema(schema: Json, root: Json | None = None) -> st.SearchStrategy[Json]:
    root = schema if root is None else root
    if "$ref" in schema:
        return from_schema(_resolve(root, schema), root)
    if "anyOf" in schema:
        return st.one_of([from_schema(s, root) for s in schema["anyOf"]])
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    if "const" in schema:
        return st.just(schema["const"])
    kind = schema["type"]
    if kind == "object":
        props = {n: from_schema(s, root) for n, s in schema.get("properties", {}).items()}
        required = set(schema.get("required", []))
        assert schema.get("additionalProperties") is False
        return st.fixed_dictionaries(
            {n: s for n, s in props.items() if n in required},
            optional={n: s for n, s in props.items() if n not in required},
        )
    if kind == "array":
        low = schema.get("minItems", 0)
        return st.lists(
            from_schema(schema["items"], root),
            min_size=low,
            max_size=min(schema.get("maxItems", 5), low + 4),
        )
    if kind == "string":
        low, high = schema.get("minLength", 0), schema.get("maxLength")
        if "format" in schema:
            assert schema["format"] in FORMATS, schema["format"]
            if schema["format"] == "uuid":
                return st.uuids().map(str)
            return st.datetimes(timezones=st.just(UTC) | _OFFSETS).map(lambda d: d.isoformat())
        if "pattern" in schema:
            return st.from_regex(_python_pattern(schema["pattern"]), alphabet=TEXT_CHARS).filter(
                lambda s: low <= len(s) <= (len(s) if high is None else high)
            )
        return st.text(TEXT_CHARS, min_size=low, max_size=high)
    if kind == "integer":
        return st.integers(schema.get("minimum"), schema.get("maximum"))
    if kind == "boolean":
        return st.booleans()
    if kind == "null":
        return st.none()
    raise AssertionError(f"no generator for {schema}")


@pytest.mark.parametrize("stem", sorted(SCHEMAS))
def test_the_generator_knows_every_keyword_of_the_schema(stem: str) -> None:
    assert set(keywords(SCHEMAS[stem])) - ANNOTATIONS - GENERATED == set()


def schema_accepts(stem: str, instance: Json) -> bool:
    return bool(StrictValidator(SCHEMAS[stem]).is_valid(instance))


def test_every_schema_file_is_tested_and_is_a_valid_2020_12_schema() -> None:
    assert set(SCHEMAS) == {*REGISTRY, "envelope"}
    for schema in SCHEMAS.values():
        assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
        jsonschema_lib.Draft202012Validator.check_schema(schema)


def test_the_judge_reads_integers_and_patterns_strictly() -> None:
    stem = "order.OrderCreated.v1"
    assert schema_accepts(stem, {"order_id": "ord-1"})
    assert not schema_accepts(stem, {"order_id": "ord-1\n"})  # plain jsonschema would accept it
    stem = "inventory.InventoryReleased.v1"
    assert schema_accepts(stem, {"order_id": "o", "units_released": 2})
    assert not schema_accepts(stem, {"order_id": "o", "units_released": 2.0})
    assert not schema_accepts(stem, {"order_id": "o", "units_released": True})


# ---------------------------------------------------------------------------------------------
# Direction 1: what the schema generates, the model accepts


@pytest.mark.parametrize("stem", sorted(SCHEMAS))
def test_instances_generated_from_the_schema_validate_in_the_model(stem: str) -> None:
    model = model_for_file(stem)

    @FAST
    @given(from_schema(SCHEMAS[stem]))
    def check(instance: Instance) -> None:
        assert schema_accepts(stem, instance)
        broken = broken_rules(stem, instance)
        assert model_accepts(model, instance) is not bool(broken), (instance, broken)

    check()


# ---------------------------------------------------------------------------------------------
# Direction 2: mutations of valid instances, judged by the schema, agree with the model


@dataclass(frozen=True)
class Mutation:
    what: str
    instance: Json


def _resolve(root: Json, schema: Json) -> Json:
    while "$ref" in schema:
        ref = schema["$ref"]
        assert ref.startswith("#/$defs/"), ref
        schema = root["$defs"][ref.removeprefix("#/$defs/")]
    return schema


def _branch(root: Json, schema: Json, value: Any) -> Json:
    """The subschema that describes ``value`` (the matching ``anyOf`` branch for optionals)."""
    schema = _resolve(root, schema)
    if "anyOf" in schema:
        branches = [_resolve(root, b) for b in schema["anyOf"]]
        if value is None:
            return next(b for b in branches if b.get("type") == "null")
        return next(b for b in branches if b.get("type") != "null")
    return schema


def _leaf_values(schema: Json, value: Any) -> Iterator[tuple[str, Any]]:
    kind = schema.get("type")
    if "enum" in schema or "const" in schema:
        yield "not in the enum", "ZZZ"
        if isinstance(value, str):
            yield "lower case", value.lower()
    if kind == "integer":
        yield 'a string "2"', str(value)
        yield "an integral float 2.0", float(value)
        yield "a float 2.5", value + 0.5
        yield "an exponent 2e0", float(f"{value}e0")
        yield "a boolean", True
        yield "null", None
        if "minimum" in schema:
            yield "below minimum", schema["minimum"] - 1
        if "maximum" in schema:
            yield "above maximum", schema["maximum"] + 1
    elif kind == "boolean":
        yield "an integer 1", 1
        yield 'a string "true"', "true"
        yield "null", None
    elif kind == "string":
        yield "an integer", 2
        yield "a boolean", False
        yield "null", None
        if "format" not in schema:  # formats are annotations in 2020-12: content is not mutated
            yield "a leading space", " " + value
            yield "a trailing space", value + " "
            yield "a trailing newline", value + "\n"
            yield "a tab inside", value[:1] + "\t" + value[1:]
            yield "a '#' inside", value[:1] + "#" + value[1:]
            yield "empty", ""
            yield "blank", " "
            if "maxLength" in schema:
                yield "too long", "x" * (schema["maxLength"] + 1)
            if "minLength" in schema and schema["minLength"] > 1:
                yield "too short", "x" * (schema["minLength"] - 1)


def mutations(root: Json, schema: Json, value: Any, path: str = "") -> Iterator[Mutation]:
    """Every single-point change of ``value``, with ``path`` naming where it was made."""
    schema = _branch(root, schema, value)
    here = path or "body"
    for what, other in _leaf_values(schema, value):
        yield Mutation(f"{here}: {what}", other)
    kind = schema.get("type")
    if kind == "object":
        yield Mutation(f"{here}: an array instead of an object", [value])
        yield Mutation(f"{here}: an extra property", {**value, "unexpected": 1})
        for name in schema.get("required", []):
            yield Mutation(f"{here}: missing {name}", {k: v for k, v in value.items() if k != name})
        for name, sub in schema.get("properties", {}).items():
            if name not in value:
                continue
            for m in mutations(root, sub, value[name], f"{path}.{name}".lstrip(".")):
                yield Mutation(m.what, {**value, name: m.instance})
    elif kind == "array":
        yield Mutation(f"{here}: an object instead of an array", {"0": value})
        if schema.get("minItems", 0) > 0:
            yield Mutation(f"{here}: too few items", value[: schema["minItems"] - 1])
        if "maxItems" in schema and value:
            yield Mutation(f"{here}: too many items", [value[0]] * (schema["maxItems"] + 1))
        if schema.get("maxItems", 2) >= 2 and value:
            yield Mutation(f"{here}: the first item twice", [value[0], *value])
        if value:
            for m in mutations(root, schema.get("items", {}), value[0], f"{path}.0"):
                yield Mutation(m.what, [m.instance, *value[1:]])


def _agree(stem: str, mutation: Mutation) -> None:
    model = model_for_file(stem)
    instance = mutation.instance
    schema_ok = schema_accepts(stem, instance)
    expected = schema_ok and not broken_rules(stem, instance)
    assert model_accepts(model, instance) is expected, (
        f"{stem}, {mutation.what}: schema {'accepts' if schema_ok else 'rejects'}, "
        f"model {'accepts' if not expected else 'rejects'}: {json.dumps(instance)[:300]}"
    )


@pytest.mark.parametrize("stem", sorted(SCHEMAS))
def test_mutated_instances_are_judged_alike_by_schema_and_model(stem: str) -> None:
    schema = SCHEMAS[stem]

    @FAST
    @given(from_schema(schema))
    def check(instance: Instance) -> None:
        for mutation in mutations(schema, schema, copy.deepcopy(instance)):
            _agree(stem, mutation)

    check()


@pytest.mark.parametrize("type_name", sorted(SAMPLES))
def test_mutations_of_every_sample_are_judged_alike(type_name: str) -> None:
    """The same over the hand-written samples, so realistic values are always mutated too."""
    schema = SCHEMAS[type_name]
    instance = json.loads(SAMPLES[type_name].model_dump_json())
    found = list(mutations(schema, schema, instance))
    assert found
    for mutation in found:
        _agree(type_name, mutation)


def test_the_mutations_include_the_cases_of_the_issue() -> None:
    schema = SCHEMAS[StartCheckout.TYPE]
    instance = json.loads(SAMPLES[StartCheckout.TYPE].model_dump_json())
    found = {m.what: m.instance for m in mutations(schema, schema, instance)}
    for what in (
        'items.0.quantity: a string "2"',
        "items.0.quantity: an integral float 2.0",
        "items.0.quantity: a float 2.5",
        "items.0.sku: a leading space",
        "shipping_address.line1: a trailing space",
        "currency: not in the enum",
        "body: an extra property",
        "body: missing items",
        "items.0.unit_price_minor: above maximum",
        "order_id: a '#' inside",
    ):
        assert what in found, what
        assert not schema_accepts(StartCheckout.TYPE, found[what]), what
        assert not model_accepts(StartCheckout, found[what]), what
    # the explicit exception: the schema accepts a repeated sku and cannot see the total
    for what, rule in (
        ("items: the first item twice", "distinct skus"),
        ("items.0.quantity: above maximum", None),
    ):
        assert what in found, what
        if rule:
            assert schema_accepts(StartCheckout.TYPE, found[what]), what
            assert broken_rules(StartCheckout.TYPE, found[what]) == [rule]
            assert not model_accepts(StartCheckout, found[what]), what
    too_much = {
        **instance,
        "items": [{**instance["items"][0], "quantity": 10_000, "unit_price_minor": 10**8 + 1}],
    }
    assert schema_accepts(StartCheckout.TYPE, too_much)
    assert broken_rules(StartCheckout.TYPE, too_much) == ["total at most 10^12"]
    assert not model_accepts(StartCheckout, too_much)


# ---------------------------------------------------------------------------------------------
# The explicit cases, through the consumer's decoder


def _start(**changes: Any) -> Instance:
    body: Instance = json.loads(SAMPLES[StartCheckout.TYPE].model_dump_json())
    body.update(changes)
    return body


@dataclass(frozen=True)
class _Delivery:
    body: bytes
    type: str = StartCheckout.TYPE
    content_type: str | None = "application/json"
    message_id: str | None = None
    correlation_id: str | None = None
    headers: dict[str, Any] | None = None
    timestamp: Any = None


def _delivery(body: Instance) -> Any:
    """What a client publishes: ``decode`` only reads these attributes."""
    return _Delivery(json.dumps(body).encode())


def _decode_error(body: Instance) -> str:
    with pytest.raises(PermanentError) as excinfo:
        decode(_delivery(body), max_bytes=1 << 20)
    return str(excinfo.value)


ITEM = {"sku": "SKU-1", "quantity": 2, "unit_price_minor": 1250}


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (
            _start(items=[{**ITEM, "quantity": "2"}]),
            "items.0.quantity: Input should be a valid integer",
        ),
        (
            _start(items=[{**ITEM, "quantity": 2.0}]),
            "items.0.quantity: Input should be a valid integer",
        ),
        (
            _start(items=[{**ITEM, "unit_price_minor": "1250"}]),
            "items.0.unit_price_minor: Input should be a valid integer",
        ),
        (
            _start(items=[{**ITEM, "quantity": 10_000, "unit_price_minor": 10**8 + 1}]),
            "items: Value error, the total of the items is 1000000010000 minor units, above the limit of 10^12",
        ),
        (
            _start(currency="ZZZ"),
            "currency: Value error, 'ZZZ' is not an active ISO 4217 currency code",
        ),
        (
            _start(currency="XXX"),
            "currency: Value error, 'XXX' is not an active ISO 4217 currency code",
        ),
        (_start(order_id=" ord-1"), "order_id: String should match pattern"),
        (_start(items=[{**ITEM, "sku": "SKU-1 "}]), "items.0.sku: String should match pattern"),
        (
            _start(
                shipping_address={
                    "line1": " 1 Main St",
                    "city": "Utrecht",
                    "postal_code": "3511AA",
                    "country": "NL",
                }
            ),
            "shipping_address.line1: String should match pattern",
        ),
    ],
    ids=[
        "quantity-string",
        "quantity-float",
        "price-string",
        "total",
        "currency-zzz",
        "currency-xxx",
        "order-id-space",
        "sku-space",
        "line1-space",
    ],
)
def test_decode_rejects_what_the_schema_rejects(body: Instance, reason: str) -> None:
    assert not schema_accepts(StartCheckout.TYPE, body) or broken_rules(StartCheckout.TYPE, body)
    assert f"invalid {StartCheckout.TYPE}: {reason}" in _decode_error(body)


def test_a_total_of_exactly_10_to_the_12_is_accepted() -> None:
    body = _start(items=[{**ITEM, "quantity": 10_000, "unit_price_minor": 10**8}])
    got = decode(_delivery(body), max_bytes=1 << 20).body
    assert isinstance(got, StartCheckout) and got.amount_minor == MAX_TOTAL_MINOR


@pytest.mark.parametrize("code", ["EUR", "USD", "JPY", "KWD", "CHF", "XOF", "ZWG"])
def test_active_currencies_are_accepted(code: str) -> None:
    assert code in CURRENCIES
    assert model_accepts(StartCheckout, _start(currency=code))
    assert code in SCHEMAS[StartCheckout.TYPE]["properties"]["currency"]["enum"]


def test_every_currency_field_lists_the_iso_codes() -> None:
    def currency_enums(schema: Json) -> Iterator[list[str]]:
        if isinstance(schema, dict):
            prop = schema.get("properties", {}).get("currency")
            if prop is not None:
                yield prop["enum"]
            for value in schema.values():
                yield from currency_enums(value)

    found = {stem: list(currency_enums(s)) for stem, s in SCHEMAS.items()}
    with_currency = {stem: enums for stem, enums in found.items() if enums}
    # every type with a currency field (StartCheckout, CreateOrder, the order facts, payment's)
    assert set(with_currency) == {t for t, m in REGISTRY.items() if "currency" in m.model_fields}
    for stem, enums in with_currency.items():
        expected = set(CURRENCIES) | ({"XXX"} if REGISTRY[stem].KIND == "fact" else set())
        assert [set(e) for e in enums] == [expected], stem


@given(st.sampled_from(sorted(CURRENCIES)))
@settings(max_examples=20, deadline=None)
def test_currency_enum_and_model_agree(code: str) -> None:
    body = _start(currency=code)
    assert schema_accepts(StartCheckout.TYPE, body)
    assert model_accepts(StartCheckout, body)
    assert not model_accepts(StartCheckout, _start(currency=code.lower()))
