"""The wire contract: the seed's JSON documents, strict validation, ids and schemas."""

from __future__ import annotations

import itertools
import json
import re
import time
import uuid
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import sagaline.orders  # noqa: F401  (registers the order flow's message types)
from sagaline.errors import InvalidMessage, UnknownMessageType
from sagaline.messages import (
    MAX_MESSAGE_BYTES,
    Envelope,
    Message,
    check_unique_keys,
    encode_body,
    json_schema,
    new_message_id,
)
from sagaline.messages import parse_document as parse_among
from sagaline.orders import app as order_app
from sagaline.orders.messages import CreateOrderCommand, OrderItem

#: The order system's message types: other tests' apps may define classes of the same names.
registry = order_app.registry


def parse_document(document: bytes | str) -> Message:
    """A document parsed as the order system parses it."""
    return parse_among(document, registry)


def decode_body(name: str, body: bytes | str) -> Message:
    """A body decoded as the order system decodes it."""
    return registry.decode(name, body)


REPO = Path(__file__).resolve().parent.parent
SEED = REPO / "tests" / "data" / "seed.txt"
SHARED_SEED = REPO.parent / "shared" / "seeds" / "000_92d3747bc505435f.txt"

SEED_TYPES = [
    "CreateOrderCommand",
    "OrderCreatedEvent",
    "ReserveInventoryCommand",
    "InventoryReservedEvent",
    "ProcessPaymentCommand",
    "PaymentProcessedEvent",
    "OrderConfirmedEvent",
    "InventoryReservationFailedEvent",
    "CancelOrderCommand",
    "ReleaseInventoryCommand",
]


def seed_documents() -> list[str]:
    """Every top-level JSON document of the seed text, as the exact text it was written in."""
    text = SEED.read_text(encoding="utf-8")
    decoder = json.JSONDecoder()
    documents = []
    index = 0
    while (start := text.find("{", index)) != -1:
        try:
            _, end = decoder.raw_decode(text, start)
        except json.JSONDecodeError:
            index = start + 1
            continue
        documents.append(text[start:end])
        index = end
    return documents


def type_of(document: dict[str, Any]) -> str:
    return str(document.get("commandType", document.get("eventType")))


def test_the_seed_copy_matches_the_shared_seed() -> None:
    if not SHARED_SEED.exists():
        pytest.skip(f"{SHARED_SEED} is not present in this checkout")
    assert SEED.read_bytes() == SHARED_SEED.read_bytes()


def test_the_seed_holds_ten_documents_of_the_order_flow() -> None:
    documents = seed_documents()
    assert len(documents) == 10
    assert [type_of(json.loads(d)) for d in documents] == SEED_TYPES


@pytest.mark.parametrize("index", range(10), ids=SEED_TYPES)
def test_every_seed_document_parses_and_encodes_back_to_itself(index: int) -> None:
    document = seed_documents()[index]
    message = parse_document(document)
    name = type_of(json.loads(document))
    assert type(message) is registry.get(name)
    assert message.type_name() == name
    encoded = encode_body(message)
    assert json.loads(encoded, parse_float=Decimal) == json.loads(document, parse_float=Decimal)
    # The typed body decodes back to an equal message, as a consumer would see it.
    assert decode_body(name, encoded) == message


def test_money_keeps_its_scale_on_the_wire() -> None:
    documents = [json.loads(d, parse_float=Decimal) for d in seed_documents()]
    with_money = [d for d in documents if "totalAmount" in d or "amount" in d]
    assert len(with_money) == 3
    for document in with_money:
        encoded = encode_body(parse_document(seed_documents()[documents.index(document)]))
        assert re.search(rb'"(totalAmount|amount)":75\.50[,}]', encoded)
    command = parse_document(seed_documents()[0])
    assert isinstance(command, CreateOrderCommand)
    assert isinstance(command.total_amount, Decimal)
    assert str(command.total_amount) == "75.50"


# ------------------------------------------------------------------ validation


def create_order(**changes: Any) -> dict[str, Any]:
    document: dict[str, Any] = {
        "commandType": "CreateOrderCommand",
        "orderId": "ORD-1",
        "customerId": "CUST-987",
        "items": [{"productId": "PROD-A", "quantity": 2}],
        "totalAmount": Decimal("75.50"),
    }
    document.update(changes)
    return document


def dump(document: Any) -> str:
    """JSON text of a test document (Decimal written as a number)."""
    return json.dumps(document, default=float)


INVALID = [
    pytest.param(
        create_order(items=[{"productId": "PROD-A", "quantity": -1}]),
        "$.items[0].quantity",
        id="quantity-negative",
    ),
    pytest.param(
        create_order(items=[{"productId": "PROD-A", "quantity": 0}]),
        "$.items[0].quantity",
        id="quantity-zero",
    ),
    pytest.param(
        create_order(items=[{"productId": "PROD-A", "quantity": "2"}]),
        "$.items[0].quantity",
        id="quantity-string",
    ),
    pytest.param(
        create_order(items=[{"productId": "PROD-A", "quantity": 2.5}]),
        "$.items[0].quantity",
        id="quantity-fraction",
    ),
    pytest.param(create_order(items=[]), "$.items", id="items-empty"),
    pytest.param(create_order(discount=5), "discount", id="unknown-field"),
    pytest.param(
        {k: v for k, v in create_order().items() if k != "customerId"},
        "customerId",
        id="missing-customerId",
    ),
    pytest.param(create_order(totalAmount=Decimal("-0.01")), "totalAmount", id="amount-negative"),
    pytest.param(create_order(totalAmount="NaN"), "totalAmount", id="amount-nan"),
    pytest.param(create_order(totalAmount=Decimal("1e30")), "totalAmount", id="amount-huge"),
    pytest.param(create_order(totalAmount=Decimal("0.00001")), "totalAmount", id="amount-too-fine"),
    pytest.param(create_order(orderId="ORD 1; DROP"), "$.orderId", id="orderId-pattern"),
    pytest.param(
        create_order(totalAmount=Decimal("-0.0")), "totalAmount", id="amount-negative-zero"
    ),
    pytest.param(create_order(totalAmount=Decimal("0.00")), "totalAmount", id="amount-zero"),
]


@pytest.mark.parametrize(("document", "field"), INVALID)
def test_invalid_documents_are_rejected_naming_the_field(document: Any, field: str) -> None:
    with pytest.raises(InvalidMessage) as caught:
        parse_document(dump(document))
    error = caught.value
    if field.startswith("$."):
        assert error.field == field
    assert field.removeprefix("$.").split(".")[-1].split("[")[0] in error.reason
    # The consumer path (typed decode of a body) rejects it in the same way.
    with pytest.raises(InvalidMessage):
        decode_body("CreateOrderCommand", dump(document))


def with_total(written: str) -> str:
    """A CreateOrderCommand document whose totalAmount is written exactly as ``written``."""
    return dump(create_order(totalAmount=0)).replace(
        '"totalAmount": 0', f'"totalAmount": {written}'
    )


@pytest.mark.parametrize("written", ["1e2", "1E+2", "7.55e1", "7550E-2", "-0.0e0", "1.5E1"])
def test_money_written_with_an_exponent_is_rejected_naming_the_field(written: str) -> None:
    with pytest.raises(InvalidMessage) as caught:
        parse_document(with_total(written))
    assert caught.value.field == "$.totalAmount"
    assert "totalAmount" in caught.value.reason


@pytest.mark.parametrize("written", ["1e2", "1E+2", "-0.0"])
def test_the_consumer_decoder_rejects_money_that_would_travel_changed(written: str) -> None:
    # 1e2 decodes as Decimal('1E+2') and would be written on as 1E+2; -0.0 is no amount.
    with pytest.raises(InvalidMessage) as caught:
        decode_body("CreateOrderCommand", with_total(written))
    assert "totalAmount" in caught.value.reason


@pytest.mark.parametrize("written", ["75.50", "0.0001", "100", "999999999999.9999"])
def test_money_keeps_the_digits_it_was_written_with(written: str) -> None:
    command = parse_document(with_total(written))
    assert isinstance(command, CreateOrderCommand)
    assert str(command.total_amount) == written
    assert f'"totalAmount":{written}}}'.encode() in encode_body(command)


def test_a_zero_total_is_refused_by_the_order_itself() -> None:
    with pytest.raises(ValueError, match="totalAmount must be greater than zero"):
        CreateOrderCommand(
            order_id="ORD-1",
            customer_id="CUST-1",
            items=[OrderItem(product_id="PROD-A", quantity=1)],
            total_amount=Decimal("0.00"),
        )


REPEATED = [
    pytest.param(
        '{"commandType": "CreateOrderCommand", "orderId": "ORD-1", "orderId": "ORD-2",'
        ' "customerId": "CUST-1", "items": [{"productId": "PROD-A", "quantity": 1}],'
        ' "totalAmount": 1.00}',
        "$.orderId",
        id="top-level",
    ),
    pytest.param(
        '{"commandType": "CreateOrderCommand", "orderId": "ORD-1", "customerId": "CUST-1",'
        ' "items": [{"productId": "PROD-A", "quantity": 1, "quantity": 500}],'
        ' "totalAmount": 1.00, "totalAmount": 0.01}',
        "$..quantity",
        id="nested-first",
    ),
    pytest.param(
        '{"commandType": "CreateOrderCommand", "commandType": "CreateOrderCommand",'
        ' "orderId": "ORD-1", "customerId": "CUST-1",'
        ' "items": [{"productId": "PROD-A", "quantity": 1}], "totalAmount": 1.00}',
        "$.commandType",
        id="discriminator",
    ),
]


@pytest.mark.parametrize(("document", "field"), REPEATED)
def test_a_key_repeated_in_one_object_is_rejected_naming_it(document: str, field: str) -> None:
    with pytest.raises(InvalidMessage) as caught:
        parse_document(document)
    assert caught.value.field == field
    key = field.rsplit(".", 1)[-1]
    assert f"{key!r} appears twice" in caught.value.reason
    # A consumer checks the bodies it decodes in the same way.
    message = decode_body("CreateOrderCommand", document)
    with pytest.raises(InvalidMessage) as caught:
        check_unique_keys("CreateOrderCommand", document.encode(), message)
    assert caught.value.field == field


def test_a_body_written_another_way_without_repeated_keys_passes() -> None:
    document = dump(create_order()).replace(", ", " ,\n  ")
    message = decode_body("CreateOrderCommand", document)
    assert document.encode() != encode_body(message)
    check_unique_keys("CreateOrderCommand", document.encode(), message)
    assert parse_document(document) == message


def test_money_as_a_string_is_rejected() -> None:
    with pytest.raises(InvalidMessage) as caught:
        parse_document(json.dumps(create_order(totalAmount="75.50")))
    assert "totalAmount" in caught.value.reason


def test_unknown_type_is_rejected() -> None:
    with pytest.raises(UnknownMessageType) as caught:
        parse_document('{"commandType": "DeleteEverythingCommand", "orderId": "ORD-1"}')
    assert "DeleteEverythingCommand" in caught.value.reason


def test_a_missing_discriminator_is_rejected() -> None:
    with pytest.raises(InvalidMessage) as caught:
        parse_document('{"orderId": "ORD-1"}')
    assert caught.value.field == "$.commandType"


def test_an_event_sent_as_a_command_is_rejected() -> None:
    with pytest.raises(InvalidMessage) as caught:
        parse_document('{"commandType": "OrderConfirmedEvent", "orderId": "ORD-1"}')
    assert caught.value.field == "$.eventType"


@pytest.mark.parametrize("document", ["[1, 2]", '"CreateOrderCommand"', "42", "null"])
def test_a_document_that_is_not_an_object_is_rejected(document: str) -> None:
    with pytest.raises(InvalidMessage) as caught:
        parse_document(document)
    assert caught.value.field == "$"


@pytest.mark.parametrize("document", ["{", "", '{"commandType": NaN}', b"\xff\xfe"])
def test_malformed_json_is_rejected(document: str | bytes) -> None:
    with pytest.raises(InvalidMessage):
        parse_document(document)


def test_a_body_over_the_size_limit_is_rejected() -> None:
    document = dump(create_order(customerId="C" * MAX_MESSAGE_BYTES))
    assert len(document) > MAX_MESSAGE_BYTES
    with pytest.raises(InvalidMessage) as caught:
        parse_document(document)
    assert str(MAX_MESSAGE_BYTES) in caught.value.reason
    with pytest.raises(InvalidMessage) as caught:
        decode_body("CreateOrderCommand", document.encode())
    assert str(MAX_MESSAGE_BYTES) in caught.value.reason


DEPTH = 20_000


def test_deep_nesting_in_a_body_is_rejected_by_the_consumer_decoder() -> None:
    nested = "[" * DEPTH + "]" * DEPTH
    body = dump(create_order()).replace('[{"productId"', nested + ', [{"productId"', 1)
    with pytest.raises(InvalidMessage):
        decode_body("CreateOrderCommand", body)


def test_deeply_nested_json_is_rejected_as_invalid() -> None:
    document = '{"commandType": "CreateOrderCommand", "items": ' + "[" * DEPTH + "]" * DEPTH + "}"
    with pytest.raises(InvalidMessage):
        parse_document(document)


# -------------------------------------------------------------------- message ids


def millisecond_of(message_id: str) -> int:
    return uuid.UUID(message_id).int >> 80


def test_message_ids_are_uuid_version_7() -> None:
    before = time.time_ns() // 1_000_000
    ids = [new_message_id() for _ in range(2000)]
    after = time.time_ns() // 1_000_000
    assert len(set(ids)) == len(ids)
    for text in ids:
        value = uuid.UUID(text)
        assert value.version == 7
        assert value.variant == uuid.RFC_4122
        assert str(value) == text
        assert before <= millisecond_of(text) <= after
    envelope = Envelope.wrap(parse_document(seed_documents()[0]))
    assert uuid.UUID(envelope.message_id).version == 7


def test_message_ids_increase_over_time() -> None:
    by_millisecond: dict[int, list[str]] = {}
    deadline = time.monotonic() + 5
    while len(by_millisecond) < 4 and time.monotonic() < deadline:
        message_id = new_message_id()
        by_millisecond.setdefault(millisecond_of(message_id), []).append(message_id)
    assert len(by_millisecond) >= 4
    groups = [by_millisecond[ms] for ms in sorted(by_millisecond)]
    for earlier, later in itertools.pairwise(groups):
        # Every id of a later millisecond sorts after every id of an earlier one, as text too.
        assert max(earlier) < min(later)
        assert max(uuid.UUID(i).int for i in earlier) < min(uuid.UUID(i).int for i in later)


@pytest.mark.parametrize(
    "message_id",
    ["0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b", "nats:orders:17", "web_42.retry-2", "x" * 128],
)
def test_a_client_may_give_its_own_message_id(message_id: str) -> None:
    envelope = Envelope.wrap(parse_document(seed_documents()[0]), message_id=message_id)
    assert envelope.message_id == message_id


@pytest.mark.parametrize(
    ("message_id", "problem"),
    [
        ("x" * 100_000, "100000 characters is longer than the limit of 128"),
        ("x" * 129, "129 characters"),
        ("", "must not be empty"),
        ("order 1", "may only hold ASCII letters, digits"),
        ("order/1", "may only hold"),
        ("ordér-1", "may only hold"),
        ("order-1\n", "may only hold"),
    ],
)
def test_a_message_id_that_is_not_one_is_refused(message_id: str, problem: str) -> None:
    with pytest.raises(InvalidMessage) as caught:
        Envelope.wrap(parse_document(seed_documents()[0]), message_id=message_id)
    assert caught.value.field == "messageId"
    assert problem in caught.value.reason
    assert len(caught.value.reason) < 200


# ------------------------------------------------------------------- JSON schemas


def validate(instance: Any, schema: dict[str, Any], root: dict[str, Any]) -> list[str]:
    """A small JSON Schema validator for the keywords the exported schemas use."""
    known = {
        "$ref",
        "$defs",
        "title",
        "description",
        "type",
        "enum",
        "properties",
        "required",
        "additionalProperties",
        "items",
        "minItems",
        "maxItems",
        "minLength",
        "maxLength",
        "pattern",
        "exclusiveMinimum",
        "minimum",
        "maximum",
        "format",
        "default",
        "anyOf",
        "const",
        # Annotations: they constrain nothing.
        "$schema",
        "$id",
        "$comment",
        "examples",
        "deprecated",
        "readOnly",
        "writeOnly",
    }
    unknown = set(schema) - known
    assert not unknown, f"the schema uses keywords this check does not know: {unknown}"
    if "$ref" in schema:
        name = schema["$ref"].removeprefix("#/$defs/")
        return validate(instance, root["$defs"][name], root)
    errors: list[str] = []
    if "anyOf" in schema and all(validate(instance, s, root) for s in schema["anyOf"]):
        errors.append(f"{instance!r} matches no alternative")
    kind = schema.get("type")
    checks = {
        "object": lambda v: isinstance(v, dict),
        "array": lambda v: isinstance(v, list),
        "string": lambda v: isinstance(v, str),
        "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
        "number": lambda v: isinstance(v, int | float | Decimal) and not isinstance(v, bool),
        "null": lambda v: v is None,
    }
    if kind is not None and not checks[kind](instance):
        return [f"{instance!r} is not of type {kind}"]
    if "const" in schema and instance != schema["const"]:
        errors.append(f"{instance!r} is not {schema['const']!r}")
    if "enum" in schema and instance not in schema["enum"]:
        errors.append(f"{instance!r} is not one of {schema['enum']}")
    if isinstance(instance, dict):
        properties = schema.get("properties", {})
        errors += [f"missing {k}" for k in schema.get("required", []) if k not in instance]
        if schema.get("additionalProperties") is False:
            errors += [f"unknown {k}" for k in instance if k not in properties]
        for key, value in instance.items():
            if key in properties:
                errors += validate(value, properties[key], root)
    if isinstance(instance, list):
        if len(instance) < schema.get("minItems", 0):
            errors.append("too few items")
        if len(instance) > schema.get("maxItems", len(instance)):
            errors.append("too many items")
        for item in instance:
            errors += validate(item, schema.get("items", {}), root)
    if isinstance(instance, str):
        if not schema.get("minLength", 0) <= len(instance) <= schema.get("maxLength", 1 << 30):
            errors.append(f"{instance!r} has the wrong length")
        if "pattern" in schema and not re.search(schema["pattern"], instance):
            errors.append(f"{instance!r} does not match {schema['pattern']}")
    if isinstance(instance, int | Decimal) and not isinstance(instance, bool):
        if "exclusiveMinimum" in schema and not instance > schema["exclusiveMinimum"]:
            errors.append(f"{instance} is too small")
        if "minimum" in schema and not instance >= schema["minimum"]:
            errors.append(f"{instance} is too small")
        if "maximum" in schema and not instance <= schema["maximum"]:
            errors.append(f"{instance} is too large")
    return errors


def money_properties(schema: Any) -> list[tuple[str, Any]]:
    found: list[tuple[str, Any]] = []
    if isinstance(schema, dict):
        for key, value in schema.get("properties", {}).items():
            if key in ("totalAmount", "amount"):
                found.append((key, value))
        for value in schema.values():
            found += money_properties(value)
    elif isinstance(schema, list):
        for value in schema:
            found += money_properties(value)
    return found


def test_every_registered_type_has_a_json_schema_with_money_as_number() -> None:
    names = registry.names()
    assert set(SEED_TYPES) <= set(names)
    money_seen = set()
    for name in names:
        schema = json_schema(registry.get(name))
        assert json.loads(json.dumps(schema)) == schema
        assert schema["$ref"] == f"#/$defs/{name}"
        definition = schema["$defs"][name]
        discriminator = registry.get(name).discriminator
        assert definition["properties"][discriminator] == {"enum": [name]}
        assert discriminator in definition["required"]
        assert '"decimal"' not in json.dumps(schema)
        for key, value in money_properties(schema):
            assert value == {"type": "number"}, (name, key, value)
            money_seen.add((name, key))
    assert ("CreateOrderCommand", "totalAmount") in money_seen
    assert ("ProcessPaymentCommand", "amount") in money_seen
    assert ("OrderCreatedEvent", "totalAmount") in money_seen


@pytest.mark.parametrize("index", range(10), ids=SEED_TYPES)
def test_every_seed_document_validates_against_its_schema(index: int) -> None:
    document = json.loads(seed_documents()[index], parse_float=Decimal)
    schema = json_schema(registry.get(type_of(document)))
    assert validate(document, schema, schema) == []


def test_the_schema_rejects_what_the_decoder_rejects() -> None:
    schema = json_schema(CreateOrderCommand)
    for document in (
        create_order(items=[{"productId": "PROD-A", "quantity": 0}]),
        create_order(items=[]),
        create_order(discount=1),
        {k: v for k, v in create_order().items() if k != "customerId"},
    ):
        assert validate(document, schema, schema) != []


# ------------------------------------------------------------------ round trip

ids = st.from_regex(r"[A-Za-z0-9._:-]{1,100}", fullmatch=True)
amounts = (
    st.integers(min_value=0, max_value=4)
    .flatmap(
        lambda places: st.decimals(
            min_value=0,
            max_value=Decimal("999999999999.9999"),
            places=places,
            allow_nan=False,
            allow_infinity=False,
        )
    )
    .filter(lambda amount: amount > 0)
)  # an order costs something
items = st.lists(
    st.builds(OrderItem, product_id=ids, quantity=st.integers(1, 1_000_000)),
    min_size=1,
    max_size=20,
)
orders = st.builds(
    CreateOrderCommand, order_id=ids, customer_id=ids, items=items, total_amount=amounts
)


@settings(max_examples=200, deadline=None, database=None)
@given(orders)
def test_any_valid_create_order_round_trips_unchanged(command: CreateOrderCommand) -> None:
    body = encode_body(command)
    decoded = decode_body("CreateOrderCommand", body)
    assert isinstance(decoded, CreateOrderCommand)
    assert decoded == command
    assert str(decoded.total_amount) == str(command.total_amount)
    assert parse_document(body) == command
    assert encode_body(decoded) == body
