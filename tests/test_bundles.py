"""Bundles: the grouping that keeps every key's order, and the codec (no broker needed)."""

from __future__ import annotations

import pytest

from sagaline.backends.bundles import BUNDLE_BYTES, bundled, decode_bundle, encode_bundle
from sagaline.messages import Envelope
from sagaline.testing.conformance import hand_made


def routed(*pairs: tuple[str, str]) -> list[tuple[Envelope, str]]:
    """Messages ``(route, key)`` as :func:`bundled` takes them."""
    return [(hand_made("T", key, b"{}"), route) for route, key in pairs]


def test_bundles_keep_every_keys_order_across_routes() -> None:
    messages = routed(("a", "k1"), ("b", "k1"), ("a", "k2"), ("a", "k1"), ("b", "k2"), ("a", "k3"))
    bundles = bundled(messages, limit=100)
    order = {e.message_id: n for n, (e, _route) in enumerate(messages)}
    sent = [(b.route, e.correlation_id, order[e.message_id]) for b in bundles for e in b.envelopes]
    # k1's second "a" may not join the first "a" bundle: that one goes before k1's "b".
    assert [[order[e.message_id] for e in b.envelopes] for b in bundles] == [[0, 2], [1, 4], [3, 5]]
    assert [b.route for b in bundles] == ["a", "b", "a"]
    for key in ("k1", "k2", "k3"):
        seen = [n for _route, k, n in sent if k == key]
        assert seen == sorted(seen)


def test_a_bundle_holds_at_most_its_limit_and_a_large_message_travels_alone() -> None:
    assert [len(b.envelopes) for b in bundled(routed(*[("a", "k")] * 7), limit=3)] == [3, 3, 1]
    big = hand_made("T", "k", b"x" * (BUNDLE_BYTES + 1))
    small = hand_made("T", "k", b"{}")
    bundles = bundled([(e, "a") for e in (small, big, small)], limit=100)
    assert [len(b.envelopes) for b in bundles] == [1, 1, 1]
    assert [len(b.envelopes) for b in bundled(routed(*[("a", "k")] * 4), 100, max_bytes=5)] == [
        2,
        2,
    ]


def test_a_bundle_round_trips_every_field_and_garbage_is_refused() -> None:
    plain = hand_made("T", "K-1", b'{"a":1}')
    full = Envelope(
        message_id=plain.message_id,
        message_type=plain.message_type,
        body=plain.body,
        correlation_id=plain.correlation_id,
        causation_id="c-1",
        timestamp=plain.timestamp,
        traceparent="00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        source="order",
    )
    bare = Envelope(
        message_id="m-2",
        message_type="U",
        body=b"\xff not json",
        correlation_id="",
        causation_id=None,
        timestamp="2026-01-01T00:00:00.000000Z",
    )
    decoded = decode_bundle(encode_bundle([full, bare]))
    fields: tuple[str, ...] = (
        "message_id",
        "message_type",
        "body",
        "correlation_id",
        "causation_id",
    )
    fields += ("timestamp", "traceparent", "source")
    for got, want in zip(decoded, [full, bare], strict=True):
        assert [getattr(got, f) for f in fields] == [getattr(want, f) for f in fields]
    for garbage in (b"", b"\x90", b"not msgpack", encode_bundle([full])[:-3]):
        with pytest.raises(ValueError, match="not a sagaline bundle"):
            decode_bundle(garbage)
