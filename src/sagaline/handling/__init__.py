"""Services, handler registration and the unit of work every message goes through.

The path of one batch (design section 4): claim deliveries from the bus; open one transaction on
the service's store; for each message record (consumer, messageId) in the inbox, skipping
duplicates; run the handler, whose state changes and outgoing messages join the same
transaction; settle every delivery (ack, retry with backoff, dead letter) in that transaction;
commit. A crash anywhere before the commit leaves the batch to be delivered again.

Group commit: the whole batch commits once. A handler error rolls the batch back and it is handled
again message by message under savepoints, so one bad message never costs the others their work.

The pieces: :mod:`.service` (what a handler sees, and a service's handlers), :mod:`.system`
(services, routing, what clients may submit), :mod:`.worker` (claim -> unit of work -> settle),
:mod:`.isolation` (keeping a poison message from costing its batch), :mod:`.runtime` (a
process's workers and relay), :mod:`.crash` (the crash tests' kill points).
"""

from sagaline.handling.crash import crash_point
from sagaline.handling.runtime import Condition, Runtime, holds
from sagaline.handling.service import Context, Handler, ReadsOf, Service
from sagaline.handling.service import decode_in as decode_in
from sagaline.handling.system import CLIENT as CLIENT
from sagaline.handling.system import System
from sagaline.handling.worker import DEFAULT_BATCH, Worker

__all__ = [
    "DEFAULT_BATCH",
    "Condition",
    "Context",
    "Handler",
    "ReadsOf",
    "Runtime",
    "Service",
    "System",
    "Worker",
    "crash_point",
    "holds",
]
