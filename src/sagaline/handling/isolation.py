"""Poison isolation: one message that fails, or that killed a consumer, never costs the rest of
its batch their work.

The rule, the same for every bus: a message handed out before whose handling never completed
(it failed, or its consumer died while it held it) is a *suspect*, as it may be what kills its
consumer; a suspect is handled alone, never in a batch with others. So a message that keeps
killing its consumer takes no other message down with it, and only it reaches the dead letters.
What differs is only where the count of earlier, unfinished handouts is kept and when the rule
can be applied:

* a database bus counts the handouts of each message in its own rows (a command's attempts, a
  subscription partition's attempts at its head), so its claim applies the rule before handing
  anything out: the first suspect goes alone and the others stay for the next claim
  (:func:`claim_alone`, :func:`first_suspect`; the SQL planners of ``backends._sql`` use them,
  and PostgreSQL's queue claim states the same rule in its one statement);
* a broker has handed the whole batch out already and counts a delivery for every message a
  dying consumer held, so the worker counts handouts to handlers in the store and cuts a batch
  it was given into parts, each suspect alone (:func:`isolated`, :func:`_isolated`).

Apart from that, a handler error in the fast pass (:class:`_RetryBatch`) rolls the batch back, to
be handled again message by message under savepoints.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence, Set
from typing import TypeVar

from sagaline.ports import Batch

__all__ = ["claim_alone", "first_suspect", "is_suspect", "isolated"]

T = TypeVar("T")


class _RetryBatch(Exception):
    """A handler failed in the fast pass: handle the batch again under savepoints."""


def is_suspect(unfinished: int) -> bool:
    """Whether a message handed out ``unfinished`` times before without its handling completing
    is a suspect, to be handled alone."""
    return unfinished > 0


def first_suspect(items: Iterable[T], unfinished: Callable[[T], int]) -> T | None:
    """The first of ``items`` (in order) that is a suspect, ``unfinished(item)`` being how many
    times it was handed out before without completing; None when there is none."""
    for item in items:
        if unfinished(item) > 0:  # is_suspect, inlined: a claim runs this per candidate
            return item
    return None


def claim_alone(candidates: Sequence[T], unfinished: Callable[[T], int]) -> Sequence[T]:
    """What a claim that can leave messages for a later claim hands out of ``candidates``: the
    first suspect alone when there is one, else all of them."""
    suspect = first_suspect(candidates, unfinished)
    return candidates if suspect is None else [suspect]


def isolated(items: Iterable[T], suspect: Callable[[T], bool]) -> list[list[T]]:
    """``items`` already handed out, in parts, in order: each suspect alone, the others
    together, in as few parts as that allows."""
    parts: list[list[T]] = [[]]
    for item in items:
        if suspect(item):
            parts += [[item], []]
        else:
            parts[-1].append(item)
    return [part for part in parts if part]


def _isolated(batch: Batch, suspects: Set[str]) -> list[Batch]:
    """``batch``, as a broker delivered it, in parts (see :func:`isolated`): ``suspects`` are the
    ids of its messages handed to a handler before without completing."""
    parts = isolated(batch.deliveries, lambda d: d.envelope.message_id in suspects)
    return [Batch(consumer=batch.consumer, deliveries=part, cursor=batch.cursor) for part in parts]


def _suspects(ids: Sequence[str], unfinished: Sequence[int]) -> set[str]:
    """The ids of ``ids`` that are suspects, given each one's unfinished handouts."""
    return {m for m, n in zip(ids, unfinished, strict=True) if is_suspect(n)}
