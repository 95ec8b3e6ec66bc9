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


class SagaDefinitionError(ConfigurationError):
    """A saga definition that leaves a failure unhandled or a step without compensation."""

    code = "invalid_saga_definition"


class NonRetryableError(SagalineError):
    """Raised by a handler to send a message straight to the dead letters, skipping retries."""

    code = "non_retryable"


class StoreUnavailable(SagalineError):
    """The store's database cannot be reached, or refused the connection."""

    code = "store_unavailable"


class BusUnavailable(SagalineError):
    """The bus's broker or database cannot be reached, refused the connection, or did not confirm
    a publication in time; nothing is lost (an outbox keeps what was not published)."""

    code = "bus_unavailable"
