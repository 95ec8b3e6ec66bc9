"""One root error for sagaline, with a machine-readable code on every subclass."""

from __future__ import annotations


class SagalineError(Exception):
    """Root of every error sagaline raises on purpose."""

    code = "sagaline_error"


class InvalidMessage(SagalineError):
    """A message body or envelope that does not parse or validate.

    ``field`` names the JSON path of the offending value when it is known.
    """

    code = "invalid_message"

    def __init__(self, reason: str, *, field: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.field = field


class UnknownMessageType(InvalidMessage):
    """A ``commandType`` / ``eventType`` that no registered class declares."""

    code = "unknown_message_type"


class ConcurrencyError(SagalineError):
    """A write based on a stale version: the message is retried, never half-applied."""

    code = "concurrency_conflict"


class ConfigurationError(SagalineError):
    """A wrong URL, a missing route or an invalid definition, found before anything runs."""

    code = "configuration_error"


class NotAStore(ConfigurationError):
    """A database that holds data but is not a sagaline store; it was left as it was."""

    code = "not_a_sagaline_store"


class SagaDefinitionError(ConfigurationError):
    """A saga definition that leaves a failure unhandled or a step without compensation."""

    code = "invalid_saga_definition"


class NotResettable(ConfigurationError):
    """A deployment's data was to be reset (deleted to start afresh), but a store or bus
    database there holds data without the mark that makes it resettable; nothing was deleted.

    ``where`` names that database (its URL without the password, or its file).
    """

    code = "not_resettable"

    def __init__(self, message: str, where: str = "") -> None:
        super().__init__(message)
        self.where = where


class StoreUnavailable(SagalineError):
    """The store cannot be used now: unreachable, out of disk space, locked, read-only, failing.

    Raised by a store adapter in place of its driver's error. A unit of work that meets it is
    rolled back whole and tried again once the store answers; it never counts against a message.
    """

    code = "store_unavailable"


class NonRetryableError(SagalineError):
    """Raised by a handler to send a message straight to the dead letters, skipping retries."""

    code = "non_retryable"


class MessageRefused(SagalineError):
    """A well-formed message the system will not take from its caller: the caller is at fault
    (the CLI exits with status 2; an HTTP API answers 4xx), and nothing was written."""

    code = "message_refused"


class DuplicateMessageId(MessageRefused):
    """A message id used before for a different message (another type or body).

    The same id with the same message is a client's retry and is accepted once; a different
    message under a known id would otherwise be dropped while its sender believes it accepted.
    """

    code = "duplicate_message_id"

    def __init__(self, message_id: str, reason: str | None = None) -> None:
        super().__init__(
            reason
            or f"message id {message_id!r} was used before for a different message;"
            " a retry must send the same message, a new message needs a new id"
        )
        self.message_id = message_id


class NotAcceptedFromClients(MessageRefused):
    """A message type that the system does not take from clients (an internal command, or an
    event it did not declare): only its own services send it."""

    code = "not_accepted_from_clients"

    def __init__(self, message_type: str, reason: str) -> None:
        super().__init__(reason)
        self.message_type = message_type


class BusUnavailable(SagalineError):
    """The bus's broker or database cannot be reached, refused the connection, or did not confirm
    a publication in time; nothing is lost (an outbox keeps what was not published)."""

    code = "bus_unavailable"


class SagaNotFound(SagalineError):
    """No saga instance has the id an operator named."""

    code = "saga_not_found"


class ActionRefused(MessageRefused):
    """An operator's action that the saga's state does not allow (the message says why)."""

    code = "action_refused"
