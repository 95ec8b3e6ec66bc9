"""The conformance suites of sagaline's ports, for every adapter, sagaline's own and yours.

One suite per port, written once; an adapter joins by subclassing it in its test folder and
providing the fixture that opens it on the test's own storage. pytest collects the subclass (name
it ``Test...``) and runs every test of the suite on the adapter::

    import pytest
    from sagaline.testing.conformance import StoreConformance

    class TestMyStore(StoreConformance):
        @pytest.fixture
        def make_store(self, tmp_path):
            opened = []
            def open_store():
                opened.append(store := MyStore(f"mystore:///{tmp_path}/store"))
                return store
            yield open_store
            for store in opened:
                asyncio.run(store.close())

The suites:

- :class:`StoreConformance` (``make_store``): streams, documents, sagas, inbox, atomicity.
- :class:`OutboxConformance` (``make_outbox_store``): a store in outbox mode and its relay.
- :class:`BusPortConformance` (``make_harness`` and ``store_outage``): any bus, through the real
  message path, with a store beside it (see :class:`Harness`): delivery, what a bus refuses or
  dead-letters, store outages.
- :class:`BusConformance` (``make_backend``): what only a store and bus in one database shows
  besides (queue counts, command rows, leased claims, the bus's events in the store's log).
- :class:`StoreFaultConformance` (``harness`` and ``store_outage``): a store outage and copies of
  a message, for a pair of store and bus not run through the whole bus suite.

Importing this package registers its messages (``Conformance...``) in the message registry. It
needs pytest: ``pip install sagaline[testing]``.
"""

from __future__ import annotations

try:
    import pytest as _pytest  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "sagaline.testing.conformance needs pytest: pip install sagaline[testing]"
    ) from exc

from sagaline.testing.conformance.adapters import (
    InspectableBackend,
    InspectableOutboxStore,
    InspectableStore,
)
from sagaline.testing.conformance.bus import BusConformance, OpenBackend
from sagaline.testing.conformance.bus_port import BusPortConformance
from sagaline.testing.conformance.harness import Harness, MakeHarness, drive
from sagaline.testing.conformance.messages import (
    ConformanceCommand,
    ConformanceEvent,
    ConformanceOtherCommand,
    ConformanceOtherEvent,
    ConformanceStoreEvent,
    hand_made,
    padded,
)
from sagaline.testing.conformance.outbox import OpenOutboxStore, OutboxConformance, RecordingBus
from sagaline.testing.conformance.services import (
    FAST_RETRY,
    queue_service,
    record,
    recorded,
    subscriber,
)
from sagaline.testing.conformance.store import OpenStore, StoreConformance
from sagaline.testing.conformance.store_faults import StoreFaultConformance, StoreOutage

__all__ = [
    "FAST_RETRY",
    "BusConformance",
    "BusPortConformance",
    "ConformanceCommand",
    "ConformanceEvent",
    "ConformanceOtherCommand",
    "ConformanceOtherEvent",
    "ConformanceStoreEvent",
    "Harness",
    "InspectableBackend",
    "InspectableOutboxStore",
    "InspectableStore",
    "MakeHarness",
    "OpenBackend",
    "OpenOutboxStore",
    "OpenStore",
    "OutboxConformance",
    "RecordingBus",
    "StoreConformance",
    "StoreFaultConformance",
    "StoreOutage",
    "drive",
    "hand_made",
    "padded",
    "queue_service",
    "record",
    "recorded",
    "subscriber",
]
