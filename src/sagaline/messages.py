"""Typed commands and events, their metadata, the type registry and the JSON codec.

A message body is exactly the seed's JSON document: flat, camelCase keys, with a ``commandType``
or ``eventType`` discriminator. Metadata (message id, correlation, causation, timestamp,
traceparent) travels beside the body in an :class:`Envelope`, never inside it.

Money is :class:`decimal.Decimal` and is written as a JSON number that keeps its scale
(``75.50`` stays ``75.50``).
"""

from __future__ import annotations

import json
import random
import re
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, suppress
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, ClassVar, Literal, TypeVar

import msgspec

from sagaline.clock import SYSTEM_CLOCK, Clock
from sagaline.errors import ConfigurationError, InvalidMessage, UnknownMessageType

__all__ = [
    "MAX_MESSAGE_BYTES",
    "MAX_MESSAGE_ID_LENGTH",
    "Command",
    "Envelope",
    "Event",
    "Message",
    "MessageKind",
    "MessageRegistry",
    "MessageStamps",
    "check_message_id",
    "check_money",
    "check_unique_keys",
    "decode_body",
    "encode_body",
    "json_schema",
    "message_id_problem",
    "new_message_id",
    "parse_document",
    "registry",
    "stamping",
    "utc_now",
    "utc_timestamp",
]

#: Largest message body accepted anywhere (submit, consumers).
MAX_MESSAGE_BYTES = 1024 * 1024

#: Longest message id accepted anywhere. Ids are keys of unique indexes (inbox, queues, logs)
#: and travel in broker headers: a bound keeps them cheap and within every index's row limit.
MAX_MESSAGE_ID_LENGTH = 128
_MESSAGE_ID = re.compile(r"[A-Za-z0-9._:-]+")

MessageKind = Literal["command", "event"]

M = TypeVar("M", bound="Message")


def utc_now() -> datetime:
    """The current time, timezone-aware UTC (by the clock of the :func:`stamping` in force)."""
    stamps = _STAMPS.get()
    if stamps is None:
        return datetime.now(UTC)
    return datetime.fromtimestamp(stamps.clock.time(), UTC)


def utc_timestamp(moment: datetime | float | None = None) -> str:
    """ISO-8601 UTC with microseconds and a ``Z`` suffix, as the wire contract writes timestamps.

    ``moment`` is a datetime or seconds since the epoch (a store's clock reading); without it, the
    current time by the clock of the :func:`stamping` in force.
    """
    if moment is None:
        stamps = _STAMPS.get()
        now = time.time() if stamps is None else stamps.clock.time()
    elif isinstance(moment, datetime):
        return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")
    else:
        now = moment
    second = int(now)
    if second != _SECOND[0]:
        _SECOND[0] = second
        _SECOND[1] = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
    return f"{_SECOND[1]}.{int((now - second) * 1_000_000):06d}Z"


# The formatted current second, reused while it lasts (timestamps are on every message).
_SECOND: list[Any] = [-1, ""]


def new_message_id() -> str:
    """A fresh message id: a UUID version 7 (RFC 9562), time-ordered.

    Time-ordered ids keep the inbox and the logs' unique indexes appending at their right edge
    instead of touching a random page per insert. The 74 random bits come from the process's
    PRNG, which Python reseeds in a forked child. Under a :func:`stamping`, the id is its stamps'.
    """
    stamps = _STAMPS.get()
    if stamps is not None:
        return stamps.message_id()
    return _uuid7(time.time_ns() // 1_000_000, random.getrandbits(74))


def _uuid7(millisecond: int, bits: int) -> str:
    """The UUIDv7 text of a Unix millisecond and 74 random bits."""
    value = (
        (millisecond & _MILLISECONDS) << 80
        | 0x7 << 76
        | (bits >> 62) << 64
        | 0x2 << 62
        | (bits & _LOW_62)
    )
    text = f"{value:032x}"
    return f"{text[:8]}-{text[8:12]}-{text[12:16]}-{text[16:20]}-{text[20:]}"


_LOW_62 = (1 << 62) - 1
_MILLISECONDS = (1 << 48) - 1


class MessageStamps:
    """Where new messages take their ids and timestamps from, under a :func:`stamping`.

    Ids are UUIDv7s of ``clock``'s milliseconds and 74 bits of ``rng`` (by default the process's
    PRNG); timestamps (:func:`utc_timestamp`, :func:`utc_now`, an envelope's) are ``clock``'s
    time. The test kit's harness stamps with its fake clock and a PRNG seeded from its seed, so
    that one seed gives the same ids and timestamps on every run. ``ids`` replaces the UUIDs by
    ids of one's own (each is checked against the id rules, :func:`message_id_problem`).
    """

    __slots__ = ("_ids", "_random", "clock")

    def __init__(
        self,
        clock: Clock = SYSTEM_CLOCK,
        rng: random.Random | None = None,
        *,
        ids: Callable[[], str] | None = None,
    ) -> None:
        self.clock = clock
        self._random = rng
        self._ids = ids

    def message_id(self) -> str:
        """A fresh message id."""
        if self._ids is not None:
            return check_message_id(self._ids())
        bits = random.getrandbits(74) if self._random is None else self._random.getrandbits(74)
        return _uuid7(int(self.clock.time() * 1000), bits)

    def __repr__(self) -> str:
        return f"MessageStamps({self.clock!r})"


#: The stamps in force in this context (a task and the tasks it starts); None: the machine's.
_STAMPS: ContextVar[MessageStamps | None] = ContextVar("sagaline_message_stamps", default=None)


@contextmanager
def stamping(stamps: MessageStamps) -> Iterator[MessageStamps]:
    """Within the block, new message ids and timestamps come from ``stamps``: in this task, and
    in the tasks started from it (they copy the context they were started in).

    This reaches what no caller passes a clock to: the ids and timestamps :meth:`Envelope.wrap`
    gives, and a message field whose default is :func:`utc_now`.
    """
    token = _STAMPS.set(stamps)
    try:
        yield stamps
    finally:
        # Left in another context than entered (a generator closed elsewhere), there is
        # nothing to undo: that context never saw these stamps.
        with suppress(ValueError):
            _STAMPS.reset(token)


def message_id_problem(message_id: object) -> str | None:
    """Why ``message_id`` is not an acceptable message id, or None when it is.

    An id is 1 to :data:`MAX_MESSAGE_ID_LENGTH` characters among ASCII letters, digits and
    ``. _ : -`` (a UUID, ``nats:stream:7``, ``order-12345.retry-2``).
    """
    if not isinstance(message_id, str):
        return f"a message id must be a string, not {type(message_id).__name__}"
    if not message_id:
        return "a message id must not be empty"
    if len(message_id) > MAX_MESSAGE_ID_LENGTH:
        return (
            f"a message id of {len(message_id)} characters is longer than the limit of"
            f" {MAX_MESSAGE_ID_LENGTH}"
        )
    if _MESSAGE_ID.fullmatch(message_id) is None:
        return (
            f"message id {message_id!r} may only hold ASCII letters, digits and the"
            " characters . _ : -"
        )
    return None


def check_message_id(message_id: str) -> str:
    """Return ``message_id`` if it is acceptable; raise :class:`InvalidMessage` otherwise."""
    problem = message_id_problem(message_id)
    if problem is not None:
        raise InvalidMessage(problem, field="messageId")
    return message_id


_MONEY_LIMIT = Decimal(10) ** 12


def check_money(name: str, value: Decimal) -> None:
    """Reject money that is not finite, negative (negative zero included), absurdly large, too
    finely divided or written with an exponent (``1e2`` decodes as ``1E+2`` and would travel
    so).

    Raised as ``ValueError`` so that msgspec reports it as a validation error.
    """
    if not value.is_finite():
        raise ValueError(f"{name} must be a finite number")
    if value.is_signed():
        raise ValueError(f"{name} must not be negative (nor negative zero)")
    if value >= _MONEY_LIMIT:
        raise ValueError(f"{name} must be below 10^12")
    exponent = value.as_tuple().exponent
    if isinstance(exponent, int):
        if exponent < -4:
            raise ValueError(f"{name} must have at most 4 decimal places")
        if exponent > 0:
            raise ValueError(f"{name} must be a plain decimal number, without an exponent")


class Message(
    msgspec.Struct,
    rename="camel",
    forbid_unknown_fields=True,
    kw_only=True,
    frozen=True,
):
    """Base of every message body. Subclass :class:`Command` or :class:`Event`."""

    kind: ClassVar[MessageKind]
    discriminator: ClassVar[str]
    #: The wire name, set when a subclass is defined (read on every message, so kept ready).
    wire_name: ClassVar[str] = ""

    @classmethod
    def type_name(cls) -> str:
        """The wire name of this type (the value of ``commandType`` / ``eventType``)."""
        return cls.wire_name or cls.__name__

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        tag = cls.__struct_config__.tag
        cls.wire_name = tag if isinstance(tag, str) else cls.__name__

    #: The attribute that holds the business key the message belongs to (its correlation id),
    #: declared per class: ``correlation: ClassVar[str] = "trip_id"``. A class keyed in another
    #: way overrides :meth:`correlation_key` instead.
    correlation: ClassVar[str] = ""

    def correlation_key(self) -> str:
        """The business key this message belongs to: the value of its ``correlation`` attribute.

        It drives per-key ordering and the audit trail.
        """
        name = type(self).correlation
        value = getattr(self, name, None) if name else None
        if not isinstance(value, str):
            raise NotImplementedError(
                f"{type(self).__name__} declares no correlation: set"
                ' `correlation: ClassVar[str] = "<attribute>"` or define correlation_key()'
            )
        return value


class Command(Message, tag_field="commandType", tag=True, frozen=True):
    """A request to one service to do something. Routed to exactly one queue."""

    kind: ClassVar[MessageKind] = "command"
    discriminator: ClassVar[str] = "commandType"

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        registry.register(cls)


class Event(Message, tag_field="eventType", tag=True, frozen=True):
    """A fact that happened. Published to every subscriber; retained in the log."""

    kind: ClassVar[MessageKind] = "event"
    discriminator: ClassVar[str] = "eventType"

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        registry.register(cls)


_ENCODER = msgspec.json.Encoder(decimal_format="number")
_PATH = re.compile(r" - at `(?P<path>[^`]*)`$")


class MessageRegistry:
    """Maps wire type names to message classes. Messages decode only into registered types.

    Each system has a registry of its own, of the types its services handle, subscribe to and
    accept (:attr:`System.registry <sagaline.handling.System.registry>`), where a name means one
    class. The process-wide :data:`registry` knows every class defined: two apps may each define
    a class of the same wire name (a user's ``CancelOrderCommand`` beside the reference app's),
    and only a lookup there of such a name is refused, as ambiguous.
    """

    def __init__(self, types: Iterable[type[Message]] = (), *, shared: bool = False) -> None:
        self._types: dict[str, type[Message]] = {}
        self._decoders: dict[str, msgspec.json.Decoder[Any]] = {}
        #: Names defined by more than one class (only in the process-wide registry).
        self._ambiguous: dict[str, list[type[Message]]] = {}
        self._shared = shared
        for cls in types:
            self.register(cls)

    def register(self, cls: type[Message]) -> None:
        """Register ``cls`` under its wire name.

        In a system's registry a second class of the same name is an error; in the process-wide
        registry the name becomes ambiguous there (each system's registry still knows its own).
        """
        name = cls.type_name()
        existing = self._types.get(name)
        if existing is not None and existing is not cls:
            if not self._shared:
                raise ConfigurationError(
                    f"message type {name!r} is defined by both {_qualified(existing)} and"
                    f" {_qualified(cls)}"
                )
            self._ambiguous.setdefault(name, [existing]).append(cls)
        self._types[name] = cls
        # The decoder is built on first use: a class is not complete inside __init_subclass__.
        self._decoders.pop(name, None)

    def get(self, name: str) -> type[Message]:
        """The class registered under ``name``."""
        try:
            cls = self._types[name]
        except KeyError:
            raise UnknownMessageType(
                f"unknown message type {name!r}", field="commandType/eventType"
            ) from None
        if name in self._ambiguous:
            defined = ", ".join(_qualified(c) for c in self._ambiguous[name])
            raise UnknownMessageType(
                f"message type {name!r} is defined by several classes ({defined}): decode it"
                " through its system's registry",
                field="commandType/eventType",
            )
        return cls

    def __contains__(self, name: str) -> bool:
        return name in self._types

    def kind_of(self, name: str) -> MessageKind | None:
        """``command`` or ``event`` for the type ``name``, None when unknown; known even for a
        name several classes define, as long as they agree on it."""
        classes = self._ambiguous.get(name) or ([self._types[name]] if name in self._types else [])
        kinds = {cls.kind for cls in classes}
        return kinds.pop() if len(kinds) == 1 else None

    def types(self) -> list[type[Message]]:
        """Every registered class, by wire name."""
        return [self._types[name] for name in sorted(self._types)]

    def names(self) -> list[str]:
        """Every registered wire name, sorted."""
        return sorted(self._types)

    def decode(self, name: str, body: bytes | str) -> Message:
        """Decode ``body`` as the registered type ``name``, with a clear error naming the field."""
        decoder = self._decoders.get(name)
        if decoder is None:
            decoder = self._decoders[name] = msgspec.json.Decoder(self.get(name))
        if len(body) > MAX_MESSAGE_BYTES:
            raise InvalidMessage(
                f"message body of {len(body)} bytes exceeds the limit of {MAX_MESSAGE_BYTES}"
            )
        try:
            message: Message = decoder.decode(body)
        except msgspec.ValidationError as exc:
            raise _invalid(name, exc) from None
        except msgspec.DecodeError as exc:
            raise InvalidMessage(f"{name}: {exc}") from None
        return message


def _invalid(name: str, exc: msgspec.ValidationError) -> InvalidMessage:
    text = str(exc)
    match = _PATH.search(text)
    path = match.group("path") if match else "$"
    named = _NAMED_FIELD.search(text)
    if named:  # "Object contains unknown field `x`", "Object missing required field `x`"
        path = f"{path}.{named.group('name')}"
    elif match is None and (first := text.split(" ", 1)[0]).isidentifier():
        path = f"$.{first}"  # a check of our own names its field first ("totalAmount must ...")
    return InvalidMessage(f"{name}: {text}", field=path)


_NAMED_FIELD = re.compile(r"field `(?P<name>[^`]+)`")


#: The process-wide registry that :class:`Command` and :class:`Event` subclasses join.
registry = MessageRegistry(shared=True)


def encode_body(message: Message) -> bytes:
    """The message's body as the wire's JSON (Decimal as a number that keeps its scale)."""
    return _ENCODER.encode(message)


def _qualified(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def decode_body(name: str, body: bytes | str) -> Message:
    """Decode a body of the registered type ``name``."""
    return registry.decode(name, body)


def parse_document(document: bytes | str, types: MessageRegistry | None = None) -> Message:
    """Parse a JSON document in the seed's format, finding its type by its discriminator among
    ``types`` (a system's registry; by default every class defined in the process).

    Raises :class:`InvalidMessage` naming the field and the problem.
    """
    if len(document) > MAX_MESSAGE_BYTES:
        raise InvalidMessage(f"document exceeds the limit of {MAX_MESSAGE_BYTES} bytes")
    try:
        raw = _RAW.decode(document)
    except msgspec.DecodeError as exc:
        raise InvalidMessage(f"malformed JSON: {exc}") from None
    except RecursionError:
        raise InvalidMessage("the document is nested too deeply") from None
    if not isinstance(raw, dict):
        raise InvalidMessage("a message must be a JSON object", field="$")
    name = raw.get("commandType", raw.get("eventType"))
    if name is None:
        raise InvalidMessage("missing commandType or eventType", field="$.commandType")
    if not isinstance(name, str):
        raise InvalidMessage("the type discriminator must be a string", field="$.commandType")
    key = "commandType" if "commandType" in raw else "eventType"
    try:
        cls = (types or registry).get(name)
    except UnknownMessageType:
        raise UnknownMessageType(f"unknown message type {name!r}", field=f"$.{key}") from None
    if cls.discriminator not in raw:
        raise InvalidMessage(
            f"{name} is a{'n' if cls.kind == 'event' else ''} {cls.kind}: "
            f"its type goes in {cls.discriminator}",
            field=f"$.{cls.discriminator}",
        )
    for field_name in _money_fields(cls):
        value = raw.get(field_name)
        if isinstance(value, _Exponent):
            raise InvalidMessage(
                f"{name}: {field_name} must be a plain decimal number, not {value}",
                field=f"$.{field_name}",
            )
        if isinstance(value, str):
            raise InvalidMessage(
                f"{name}: {field_name} must be a JSON number, not a string",
                field=f"$.{field_name}",
            )
    message = (types or registry).decode(name, document)
    if _may_repeat_a_key(document, raw):
        check_unique_keys(name, document, message)
    return message


# The end of every key: its closing quote and the colon. A string value may hold the same text,
# so there are at least as many of these as keys; as many as the decoded objects have keys
# means no object lost a repeated one.
_KEY_ENDS = re.compile(rb'"[ \t\r\n]*:')


def _may_repeat_a_key(document: bytes | str, raw: Any) -> bool:
    """False when ``document`` (decoded as ``raw``) surely has no key twice in one object."""
    text = document.encode() if isinstance(document, str) else document
    try:
        return len(_KEY_ENDS.findall(text)) != _keys_in(raw)
    except RecursionError:
        return True


def _keys_in(node: Any) -> int:
    if isinstance(node, dict):
        return len(node) + sum(_keys_in(value) for value in node.values())
    if isinstance(node, list):
        return sum(_keys_in(value) for value in node)
    return 0


class _Exponent(str):
    """A number written with an exponent (``1e2``), as it was written."""

    __slots__ = ()


def _number(text: str) -> Decimal | _Exponent:
    return _Exponent(text) if "e" in text or "E" in text else Decimal(text)


# Untyped decoding of a whole document, numbers with a fraction kept exact (and those written
# with an exponent kept as written, so that money can refuse them).
_RAW: msgspec.json.Decoder[Any] = msgspec.json.Decoder(float_hook=_number)


def check_unique_keys(name: str, body: bytes | str, message: Message) -> None:
    """Refuse ``body`` (decoded as ``message``) if one of its JSON objects has a key twice.

    JSON decoders keep the last value of a repeated key, so two readers may not see the same
    message: sagaline refuses it instead (:class:`InvalidMessage` naming the key). A body that is
    exactly the encoding of its message, as every body sagaline writes is, has no repeated key:
    that costs one encoding, and only other bodies are parsed again to look for one.
    """
    if isinstance(body, bytes) and _ENCODER.encode(message) == body:
        return
    path = _repeated_key(body)
    if path is not None:
        key = path.rsplit(".", 1)[-1]
        raise InvalidMessage(f"{name}: the key {key!r} appears twice in one object", field=path)


def _repeated_key(document: bytes | str) -> str | None:
    """The JSON path of a key that appears twice in one object of ``document``, or None.

    ``$.key`` for the outermost object, ``$..key`` for one nested in it.
    """
    found: list[tuple[int, str]] = []
    calls = 0

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        nonlocal calls
        result = dict(items)
        if len(result) != len(items) and not found:
            seen: set[str] = set()
            for key, _ in items:
                if key in seen:
                    found.append((calls, key))
                    break
                seen.add(key)
        calls += 1
        return result

    try:
        json.loads(document, object_pairs_hook=pairs, parse_float=str, parse_int=str)
    except (ValueError, RecursionError):
        return None  # not JSON: the decoder that parsed it first says why
    if not found:
        return None
    # Objects are completed inside out: the outermost is the last one.
    call, key = found[0]
    return f"$.{key}" if call == calls - 1 else f"$..{key}"


def _money_fields(cls: type[Message]) -> list[str]:
    """The wire names of the top-level Decimal fields of a message type."""
    cached = _MONEY_FIELDS.get(cls)
    if cached is None:
        cached = [info.encode_name for info in msgspec.structs.fields(cls) if info.type is Decimal]
        _MONEY_FIELDS[cls] = cached
    return cached


_MONEY_FIELDS: dict[type[Message], list[str]] = {}


def json_schema(cls: type[Message]) -> dict[str, Any]:
    """The JSON Schema of one message type; money is a JSON number."""
    schema: dict[str, Any] = _numbers_for_decimals(msgspec.json.schema(cls))
    return schema


def _numbers_for_decimals(node: Any) -> Any:
    if isinstance(node, dict):
        if node.get("type") == "string" and node.get("format") == "decimal":
            return {"type": "number"}
        return {key: _numbers_for_decimals(value) for key, value in node.items()}
    if isinstance(node, list):
        return [_numbers_for_decimals(value) for value in node]
    return node


@dataclass(slots=True)
class Envelope:
    """A message body with the metadata that travels beside it.

    ``body`` is the encoded JSON; ``message`` is the decoded body, filled lazily.
    """

    message_id: str
    message_type: str
    body: bytes
    correlation_id: str
    causation_id: str | None
    timestamp: str
    traceparent: str | None = None
    source: str | None = None
    #: Why this envelope, as a broker delivered it, cannot be handled whatever its body (its
    #: message id is not one: see :func:`message_id_problem`). The worker dead-letters it with
    #: this reason; ``message_id`` then holds a stand-in the stores can index.
    defect: str | None = None
    _message: Message | None = field(default=None, repr=False)

    @classmethod
    def wrap(
        cls,
        message: Message,
        *,
        causation: Envelope | None = None,
        source: str | None = None,
        message_id: str | None = None,
    ) -> Envelope:
        """Envelope ``message`` with fresh metadata; causation and trace come from ``causation``.

        A ``message_id`` given by the caller (a client's own, so that a retry is the same message)
        must be acceptable (:func:`check_message_id`).
        """
        return cls(
            message_id=new_message_id() if message_id is None else check_message_id(message_id),
            message_type=message.wire_name,
            body=encode_body(message),
            correlation_id=message.correlation_key(),
            causation_id=causation.message_id if causation else None,
            timestamp=utc_timestamp(),
            traceparent=causation.traceparent if causation else None,
            source=source,
            _message=message,
        )

    def screen_id(self, stand_in: Callable[[], str] | str) -> Envelope:
        """Check the message id of an envelope received from outside sagaline's stores (a
        broker delivery). An unacceptable one is replaced by ``stand_in`` (or what it returns)
        and the envelope marked with the reason (``defect``), for the worker to dead-letter.
        Returns the envelope."""
        problem = message_id_problem(self.message_id)
        if problem is not None:
            self.defect = f"invalid message id: {problem}"
            self.message_id = stand_in if isinstance(stand_in, str) else stand_in()
        return self

    def decode(self, types: MessageRegistry | None = None) -> Message:
        """The typed body, decoded once (as ``types``' class of its type: a system's registry;
        by default the process-wide one); raises :class:`InvalidMessage` if it does not
        validate."""
        if self._message is None:
            self._message = (types or registry).decode(self.message_type, self.body)
        return self._message
