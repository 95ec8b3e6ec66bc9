"""What a PostgreSQL unit of work keeps: its identity map, its writes behind, and the sender.

:class:`UnitState` holds the identity map and the pending writes of one unit of work (see
:mod:`sagaline.backends.postgres.transaction`), and sends statements to the server in one round
trip, a deadlock counting as a conflict. The rows it keeps and the statements it sends are
described by the small types here.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import psycopg
from psycopg import AsyncConnection

from sagaline.errors import ConcurrencyError, SagalineError
from sagaline.messages import Envelope, utc_timestamp
from sagaline.ports import StoredEvent

if TYPE_CHECKING:
    from sagaline.backends.postgres import PostgresDatabase

__all__ = [
    "ENVELOPE_ARRAYS",
    "SAGA_COLUMNS",
    "UnitState",
    "body_text",
    "envelope_arrays",
    "queue_payload",
]

#: The envelope columns as typed arrays for ``unnest`` (see :func:`envelope_arrays`). Arrays are
#: sent in binary (``%b``): the text form quotes each element through a regular expression,
#: which costs tens of milliseconds for a batch of JSON bodies.
ENVELOPE_ARRAYS = ", ".join(["%b::text[]"] * 8)
SAGA_COLUMNS = (
    "saga_id, definition, definition_version, status, step, data, version, created_at, updated_at"
)


def body_text(body: bytes) -> str:
    """A body as PostgreSQL text. A body that is not UTF-8 text or holds NUL (a foreign
    producer's bytes) is stored with those bytes replaced: it is invalid either way, and is
    dead-lettered by its consumer rather than refused at the door."""
    try:
        text = body.decode()
    except UnicodeDecodeError:
        text = body.decode(errors="replace")
    return text.replace("\x00", "\ufffd") if "\x00" in text else text


def envelope_arrays(envelopes: Sequence[Envelope]) -> list[list[Any]]:
    """The envelopes as one list per column of :data:`ENVELOPE_COLUMNS`."""
    return [
        [e.message_id for e in envelopes],
        [e.message_type for e in envelopes],
        [body_text(e.body) for e in envelopes],
        [e.correlation_id for e in envelopes],
        [e.causation_id for e in envelopes],
        [e.timestamp for e in envelopes],
        [e.traceparent for e in envelopes],
        [e.source for e in envelopes],
    ]


def queue_payload(queue: str) -> str:
    """The NOTIFY payload that announces new commands on ``queue``."""
    return f"q:{queue}"


class _Doc(NamedTuple):
    """A document as the identity map keeps it: JSON text (decoded afresh for each reader)."""

    data: str
    version: int


class _DocWrite(NamedTuple):
    """A pending document write: ``base`` is the version the database must hold (0: absent)."""

    data: str
    base: int
    version: int


class _Saga(NamedTuple):
    """A saga row as the identity map keeps it."""

    definition: str
    definition_version: int
    status: str
    step: int
    data: str
    version: int
    created_at: str
    updated_at: str


class _SagaWrite(NamedTuple):
    row: _Saga
    base: int


#: A statement of a flush: SQL, parameters and, for a conditional write, the row count it must
#: reach and how to name the conflict when it falls short.
class _Statement(NamedTuple):
    sql: str
    params: Sequence[Any]
    expected: int = -1
    #: What a short row count means: the error to raise, or None when it is harmless.
    conflict: Callable[[], Awaitable[SagalineError | None]] | None = None
    #: True when the statement returns its row count as the value of its one row.
    counts: bool = False


class UnitState:
    """The identity map and pending writes of one transaction on a pooled connection."""

    def __init__(self, db: PostgresDatabase, conn: AsyncConnection[Any]) -> None:
        self._db = db
        self.connection = conn
        self._s = db.names.store
        self._b = db.names.bus
        # One timestamp for the whole unit of work: it commits at one moment.
        self.now = utc_timestamp(db.clock.time())
        # The identity map: None marks a row known to be absent.
        self._docs: dict[tuple[str, str], _Doc | None] = {}
        self._sagas: dict[str, _Saga | None] = {}
        # Streams known whole (read, or appended to after a read), and each stream's head.
        self._streams: dict[str, tuple[StoredEvent, ...]] = {}
        self._heads: dict[str, int] = {}
        # Writes behind, flushed at commit or when a savepoint opens or is released.
        self._doc_writes: dict[tuple[str, str], _DocWrite] = {}
        self._saga_writes: dict[str, _SagaWrite] = {}
        self._history: list[tuple[str, int, int, str]] = []
        self._appends: list[tuple[str, int, Envelope]] = []
        self._inbox: dict[str, dict[str, None]] = {}
        self._commands: list[tuple[str, Envelope]] = []
        self._outbox: list[Envelope] = []
        self._dead: list[tuple[Any, ...]] = []
        # Events for the log, written at commit: (stream, version, envelope).
        self._log: list[tuple[str | None, int | None, Envelope]] = []
        # Stream events of an outbox store, whose positions are given at commit.
        self._placed: list[tuple[str, int]] = []
        self._deferred: list[tuple[str, tuple[Any, ...]]] = []
        self.queues: set[str] = set()
        self.wrote_events = False
        self.wrote_outbox = False

    def _drop_pending(self) -> None:
        self._doc_writes = {}
        self._saga_writes = {}
        self._history = []
        self._appends = []
        self._inbox = {}
        self._commands = []
        self._outbox = []
        self._dead = []

    async def _run(self, statements: list[_Statement]) -> None:
        """Run statements in one pipeline (one round trip), then check the conditional ones."""
        cursors = await self._send([(st.sql, st.params) for st in statements])
        for statement, cursor in zip(statements, cursors, strict=True):
            if statement.conflict is None:
                continue
            if statement.counts:
                row = await cursor.fetchone()
                count = -1 if row is None else row[0]
            else:
                count = cursor.rowcount
            if count != statement.expected:
                error = await statement.conflict()
                if error is not None:
                    raise error

    async def _send(
        self, statements: Sequence[tuple[str, Sequence[Any]]]
    ) -> list[psycopg.AsyncCursor[Any]]:
        """Send statements in one round trip (a pipeline when there are several); their cursors."""
        conn = self.connection
        try:
            if len(statements) <= 1:
                return [await conn.execute(sql, params) for sql, params in statements]
            async with conn.pipeline():
                return [await conn.execute(sql, params) for sql, params in statements]
        except psycopg.errors.DeadlockDetected as exc:
            # Two units of work took the same rows in different orders; PostgreSQL chose this
            # one to roll back. A conflict like any other: the caller redoes its work.
            raise ConcurrencyError(f"deadlock with another unit of work: {exc}") from exc


def _document_error(namespace: str, key: str, expected_version: int) -> ConcurrencyError:
    if expected_version == 0:
        return ConcurrencyError(f"document {namespace}/{key} already exists")
    return ConcurrencyError(f"document {namespace}/{key} is not at version {expected_version}")


def _saga_error(saga_id: str, version: int) -> ConcurrencyError:
    if version == 0:
        return ConcurrencyError(f"saga {saga_id!r} already exists")
    return ConcurrencyError(f"saga {saga_id!r} is not at version {version}")
