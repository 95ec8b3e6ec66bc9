"""The SQLite schema, its version, and the constants of the embedded store and bus."""

from __future__ import annotations

import sqlite3

from sagaline.backends._sql.constants import (
    LEASE_SECONDS,
    MEMBERSHIP_INTERVAL,
    PARTITIONS,
    SCAN_FACTOR,
)
from sagaline.errors import ConfigurationError

__all__ = [
    "BACKSTOP_CHECKPOINT_PAGES",
    "LEASE_SECONDS",
    "MEMBERSHIP_INTERVAL",
    "PARTITIONS",
    "SCAN_FACTOR",
    "SCHEMA_VERSION",
    "check_version",
    "migrate",
]

SCHEMA_VERSION = 1
#: WAL pages past which a committing connection checkpoints itself (when a background
#: checkpointer runs, it normally keeps the WAL well below this).
BACKSTOP_CHECKPOINT_PAGES = 20000

_SCHEMA = """
CREATE TABLE IF NOT EXISTS sagaline_meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS events (
    position INTEGER PRIMARY KEY AUTOINCREMENT,
    stream TEXT,
    version INTEGER,
    message_id TEXT NOT NULL UNIQUE,
    type TEXT NOT NULL,
    body TEXT NOT NULL,
    correlation_id TEXT NOT NULL,
    causation_id TEXT,
    timestamp TEXT NOT NULL,
    traceparent TEXT,
    source TEXT,
    part INTEGER NOT NULL
);
-- Only event-sourced appends have a stream: published events cost this index nothing.
CREATE UNIQUE INDEX IF NOT EXISTS events_stream ON events (stream, version)
    WHERE stream IS NOT NULL;
CREATE INDEX IF NOT EXISTS events_correlation ON events (correlation_id);
CREATE TABLE IF NOT EXISTS commands (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    queue TEXT NOT NULL,
    key TEXT NOT NULL,
    message_id TEXT NOT NULL UNIQUE,
    type TEXT NOT NULL,
    body TEXT NOT NULL,
    correlation_id TEXT NOT NULL,
    causation_id TEXT,
    timestamp TEXT NOT NULL,
    traceparent TEXT,
    source TEXT,
    available_at REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    lease_owner TEXT,
    lease_expires REAL,
    done INTEGER NOT NULL DEFAULT 0,
    outcome TEXT,
    last_error TEXT
);
CREATE INDEX IF NOT EXISTS commands_pending ON commands (queue, id) WHERE done = 0;
CREATE INDEX IF NOT EXISTS commands_pending_key ON commands (queue, key, id) WHERE done = 0;
CREATE INDEX IF NOT EXISTS commands_correlation ON commands (correlation_id);
CREATE TABLE IF NOT EXISTS subscriptions (
    subscriber TEXT NOT NULL,
    part INTEGER NOT NULL,
    position INTEGER NOT NULL DEFAULT 0,
    attempts INTEGER NOT NULL DEFAULT 0,
    available_at REAL NOT NULL DEFAULT 0,
    last_error TEXT,
    -- The position handed out first by the last claim, until that batch is settled: met again,
    -- it means the consumer died handling it, which counts as a failed attempt.
    claimed INTEGER NOT NULL DEFAULT 0,
    lease_owner TEXT,
    lease_expires REAL,
    PRIMARY KEY (subscriber, part)
);
CREATE TABLE IF NOT EXISTS members (
    consumer TEXT NOT NULL,
    member TEXT NOT NULL,
    heartbeat REAL NOT NULL,
    PRIMARY KEY (consumer, member)
);
CREATE TABLE IF NOT EXISTS inbox (
    message_id TEXT NOT NULL,
    consumer TEXT NOT NULL,
    processed_at TEXT NOT NULL,
    PRIMARY KEY (message_id, consumer)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS handling_starts (
    message_id TEXT NOT NULL,
    consumer TEXT NOT NULL,
    starts INTEGER NOT NULL,
    PRIMARY KEY (message_id, consumer)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS documents (
    namespace TEXT NOT NULL,
    key TEXT NOT NULL,
    data TEXT NOT NULL,
    version INTEGER NOT NULL,
    PRIMARY KEY (namespace, key)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS sagas (
    saga_id TEXT PRIMARY KEY,
    definition TEXT NOT NULL,
    definition_version INTEGER NOT NULL,
    status TEXT NOT NULL,
    step INTEGER NOT NULL,
    data TEXT NOT NULL,
    version INTEGER NOT NULL,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS sagas_status ON sagas (status);
CREATE TABLE IF NOT EXISTS saga_history (
    saga_id TEXT NOT NULL,
    version INTEGER NOT NULL,
    entry INTEGER NOT NULL,
    data TEXT NOT NULL,
    PRIMARY KEY (saga_id, version, entry)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS dead_letters (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    consumer TEXT NOT NULL,
    message_id TEXT NOT NULL,
    type TEXT NOT NULL,
    body TEXT NOT NULL,
    correlation_id TEXT NOT NULL,
    causation_id TEXT,
    timestamp TEXT NOT NULL,
    source TEXT,
    reason TEXT NOT NULL,
    attempts INTEGER NOT NULL,
    failed_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    message_id TEXT NOT NULL,
    type TEXT NOT NULL,
    body TEXT NOT NULL,
    correlation_id TEXT NOT NULL,
    causation_id TEXT,
    timestamp TEXT NOT NULL,
    traceparent TEXT,
    source TEXT,
    sent INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS outbox_unsent ON outbox (id) WHERE sent = 0;
CREATE INDEX IF NOT EXISTS outbox_correlation ON outbox (correlation_id);
CREATE TABLE IF NOT EXISTS received (
    message_id TEXT PRIMARY KEY,
    type TEXT NOT NULL,
    body TEXT NOT NULL,
    correlation_id TEXT NOT NULL,
    causation_id TEXT,
    timestamp TEXT NOT NULL,
    traceparent TEXT,
    source TEXT,
    consumer TEXT NOT NULL,
    received_at TEXT NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS received_correlation ON received (correlation_id);
CREATE TABLE IF NOT EXISTS timers (
    timer_id TEXT PRIMARY KEY,
    due_at REAL NOT NULL,
    message_id TEXT NOT NULL,
    type TEXT NOT NULL,
    body TEXT NOT NULL,
    correlation_id TEXT NOT NULL,
    causation_id TEXT,
    timestamp TEXT NOT NULL,
    traceparent TEXT,
    source TEXT
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS timers_due ON timers (due_at);
CREATE TABLE IF NOT EXISTS relay_lease (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    owner TEXT,
    expires REAL NOT NULL DEFAULT 0
);
INSERT OR IGNORE INTO relay_lease (id, owner, expires) VALUES (1, NULL, 0);
"""


def migrate(conn: sqlite3.Connection, path: str) -> None:
    """Create the tables of a new file; refuse a file written by a newer sagaline."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        for statement in _SCHEMA.split(";"):
            if statement.strip():
                conn.execute(statement)
        row = conn.execute(
            "SELECT value FROM sagaline_meta WHERE key = 'schema_version'"
        ).fetchone()
        if row is None:
            conn.execute(
                "INSERT INTO sagaline_meta (key, value) VALUES ('schema_version', ?),"
                " ('partitions', ?)",
                (str(SCHEMA_VERSION), str(PARTITIONS)),
            )
        elif int(row[0]) > SCHEMA_VERSION:
            raise ConfigurationError(
                f"{path} has schema version {row[0]}; this sagaline knows"
                f" {SCHEMA_VERSION}: upgrade sagaline"
            )
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


def check_version(conn: sqlite3.Connection, path: str) -> None:
    """Check, without writing, that ``conn`` is on a sagaline store this sagaline can read."""
    try:
        row = conn.execute(
            "SELECT value FROM sagaline_meta WHERE key = 'schema_version'"
        ).fetchone()
    except sqlite3.OperationalError as exc:
        if "no such table" not in str(exc):
            raise
        row = None
    if row is None:
        raise ConfigurationError(f"{path} holds no sagaline store yet")
    if int(row[0]) > SCHEMA_VERSION:
        raise ConfigurationError(
            f"{path} has schema version {row[0]}; this sagaline knows {SCHEMA_VERSION}:"
            " upgrade sagaline"
        )
