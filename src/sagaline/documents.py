"""Clients' messages read from a file: one JSON document, a JSON array of them, or JSON Lines.

Every message is parsed and checked before any is submitted (:func:`parse_documents`,
:func:`check_submittable`): one bad message fails the whole input, naming where it is (``line 3``
of JSON Lines, ``index 2`` of an array) and the field, so that nothing is written. Only then are
they submitted, in batches of :data:`DEFAULT_SUBMIT_BATCH` per call (:func:`submit_in_batches`).

The format is told from the input itself: a ``[`` opens an array; an input that is one JSON
value is one document, however it is laid out; otherwise each non-blank line is a document.
"""

from __future__ import annotations

import sys
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import msgspec

from sagaline.errors import (
    ConfigurationError,
    InvalidMessage,
    NotAcceptedFromClients,
    SagalineError,
)
from sagaline.handling import System
from sagaline.messages import (
    MAX_MESSAGE_BYTES,
    Command,
    Envelope,
    Message,
    MessageRegistry,
    parse_document,
)
from sagaline.ports import Backend, BrokerBus

__all__ = [
    "DEFAULT_SUBMIT_BATCH",
    "MAX_DOCUMENTS",
    "MAX_INPUT_BYTES",
    "Document",
    "DocumentProblem",
    "InputTooLarge",
    "check_submittable",
    "parse_documents",
    "read_input",
    "split_documents",
    "submit_in_batches",
]

#: The most bytes one input may hold: every message is held in memory until all are checked.
MAX_INPUT_BYTES = 512 * 1024 * 1024
#: The most messages one input may hold.
MAX_DOCUMENTS = 1_000_000
#: Messages per :meth:`System.submit_many` call: one transaction or publication each.
DEFAULT_SUBMIT_BATCH = 1_000


class InputTooLarge(InvalidMessage):
    """An input larger than :data:`MAX_INPUT_BYTES` or with more than :data:`MAX_DOCUMENTS`."""

    code = "input_too_large"


class DocumentProblem(SagalineError):
    """One message of an input is invalid or refused; ``error`` says why, ``position`` where
    (empty for an input that is one document)."""

    code = "invalid_document"

    def __init__(self, position: str, error: SagalineError) -> None:
        super().__init__(f"{position}: {error}" if position else str(error))
        self.position = position
        self.error = error


@dataclass(frozen=True, slots=True)
class Document:
    """One parsed message and where it was in the input."""

    position: str
    message: Message


def read_input(source: str, limit: int = MAX_INPUT_BYTES) -> bytes:
    """The bytes of the file ``source`` (``-``: stdin), refusing more than ``limit`` of them.

    Raises :class:`OSError` when it cannot be read, :class:`InputTooLarge` when it is too large.
    """
    if source == "-":
        data = sys.stdin.buffer.read(limit + 1)
    else:
        with open(source, "rb") as file:
            data = file.read(limit + 1)
    if len(data) > limit:
        raise InputTooLarge(
            f"{source} is larger than the limit of {limit} bytes for one input: split it"
        )
    return data


def split_documents(data: bytes) -> list[tuple[str, bytes]]:
    """The input's documents as (position, bytes): one with no position, the elements of an
    array (``index N``), or the non-blank lines of JSON Lines (``line N``, from 1)."""
    text = data.lstrip()
    if text.startswith(b"["):
        try:
            elements = _ARRAY.decode(data)
        except msgspec.DecodeError as exc:
            raise DocumentProblem("", InvalidMessage(f"malformed JSON array: {exc}")) from None
        except msgspec.ValidationError as exc:
            raise DocumentProblem("", InvalidMessage(f"malformed JSON array: {exc}")) from None
        return [(f"index {index}", bytes(raw)) for index, raw in enumerate(elements)]
    if text.startswith(b"{") and not _is_one_value(data) and _is_json_lines(data):
        return [
            (f"line {number}", line)
            for number, line in enumerate(data.split(b"\n"), 1)
            if line.strip()
        ]
    return [("", data)]


def parse_documents(
    data: bytes, *, max_documents: int = MAX_DOCUMENTS, types: MessageRegistry | None = None
) -> list[Document]:
    """Every message of the input, parsed and validated as :func:`parse_document` does, among
    ``types`` (a system's registry; by default every class defined).

    Raises :class:`DocumentProblem` for the first message that is not valid, naming its
    position and (in its :class:`InvalidMessage`) the field.
    """
    documents = split_documents(data)
    if not documents:
        raise DocumentProblem("", InvalidMessage("the input holds no message"))
    if len(documents) > max_documents:
        raise DocumentProblem(
            "",
            InputTooLarge(
                f"the input holds {len(documents)} messages, more than the limit of"
                f" {max_documents} for one input: split it"
            ),
        )
    parsed = []
    for position, document in documents:
        if len(document) > MAX_MESSAGE_BYTES:
            raise DocumentProblem(
                position,
                InvalidMessage(f"the message exceeds the limit of {MAX_MESSAGE_BYTES} bytes"),
            )
        try:
            parsed.append(Document(position, parse_document(document, types)))
        except InvalidMessage as exc:
            raise DocumentProblem(position, exc) from None
    return parsed


def check_submittable(system: System, documents: Sequence[Document]) -> list[Command]:
    """The documents' messages, each a command that clients may submit to ``system``.

    Raises :class:`DocumentProblem` for the first that is an event, internal to the system, or
    that no service handles.
    """
    commands: list[Command] = []
    checked: set[type[Message]] = set()
    for document in documents:
        message = document.message
        if not isinstance(message, Command):
            raise DocumentProblem(
                document.position,
                InvalidMessage(
                    f"{message.type_name()} is an {message.kind}; submit takes a command"
                    " (a commandType document)",
                    field=f"$.{message.discriminator}",
                ),
            )
        # Whether a client may submit a message depends on its type alone.
        if type(message) not in checked:
            try:
                system.check_submittable(message)
            except (NotAcceptedFromClients, ConfigurationError) as exc:
                raise DocumentProblem(document.position, exc) from None
            checked.add(type(message))
        commands.append(message)
    return commands


async def submit_in_batches(
    system: System,
    bus: Backend | BrokerBus,
    messages: Sequence[Message],
    *,
    batch_size: int = DEFAULT_SUBMIT_BATCH,
    message_ids: Sequence[str | None] | None = None,
    on_batch: Callable[[list[Envelope]], Awaitable[None] | None] | None = None,
) -> int:
    """Submit ``messages`` in order, ``batch_size`` per :meth:`System.submit_many` call; after
    each, ``on_batch`` gets its envelopes. Returns how many were submitted.

    Each batch is durable once its call returns: should a later one fail, the earlier ones stay
    submitted (``on_batch`` has seen them).
    """
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    submitted = 0
    for start in range(0, len(messages), batch_size):
        ids = message_ids[start : start + batch_size] if message_ids is not None else None
        envelopes = await system.submit_many(
            bus, messages[start : start + batch_size], message_ids=ids
        )
        submitted += len(envelopes)
        if on_batch is not None:
            done = on_batch(envelopes)
            if done is not None:
                await done
    return submitted


_ARRAY: msgspec.json.Decoder[list[msgspec.Raw]] = msgspec.json.Decoder(list[msgspec.Raw])
_VALUE: msgspec.json.Decoder[msgspec.Raw] = msgspec.json.Decoder(msgspec.Raw)


def _is_one_value(data: bytes) -> bool:
    """Whether ``data`` is exactly one JSON value (however many lines it spans)."""
    try:
        _VALUE.decode(data)
    except (msgspec.DecodeError, RecursionError):
        return False
    return True


def _is_json_lines(data: bytes) -> bool:
    """Whether the first non-blank line of ``data`` is a JSON value on its own: then each line
    is a document (one document laid out over lines has an incomplete first line)."""
    line = data.lstrip().split(b"\n", 1)[0]
    return len(line) <= MAX_MESSAGE_BYTES and _is_one_value(line)
