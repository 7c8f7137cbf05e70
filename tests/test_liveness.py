"""Connection deadlines and rate buckets with an injected clock."""

from __future__ import annotations

import weakref

from gateway.core.liveness import Deadlines, Due, Liveness, TokenBucket


def make(now: float = 100.0, **kw: float) -> Liveness:
    args = {"heartbeat_interval_s": 15.0, "heartbeat_timeout_s": 45.0, "slow_consumer_timeout_s": 10.0}
    args.update(kw)
    return Liveness(now=now, **args)


def test_pings_on_a_fixed_cadence() -> None:
    live = make()
    assert live.next_deadline() == 115.0
    assert live.poll(114.9) == []
    assert live.poll(115.0) == [Due.SEND_PING]
    assert live.next_deadline() == 130.0
    # A late wake-up does not shift the cadence or send a burst of pings.
    live.inbound(131.0)
    assert live.poll(137.0) == [Due.SEND_PING]
    assert live.next_deadline() == 145.0


def test_stale_after_timeout_without_inbound() -> None:
    live = make()
    live.inbound(120.0)
    assert live.stale_at() == 165.0
    assert Due.STALE not in live.poll(164.0)
    assert live.poll(165.0) == [Due.STALE]


def test_inbound_never_moves_backwards() -> None:
    live = make()
    live.inbound(150.0)
    live.inbound(120.0)
    assert live.last_inbound == 150.0


def test_slow_consumer_after_queue_stays_full() -> None:
    live = make()
    assert live.queue_full(101.0) is True
    assert live.queue_full(105.0) is False  # the clock started at 101
    assert live.next_deadline() == 111.0
    assert live.poll(110.9) == []
    assert live.poll(111.0) == [Due.SLOW_CONSUMER]


def test_draining_the_queue_resets_the_slow_consumer_clock() -> None:
    live = make()
    live.queue_full(101.0)
    live.queue_drained()
    live.queue_full(109.0)
    assert live.poll(112.0) == []
    assert live.poll(119.0) == [Due.SLOW_CONSUMER]


def test_token_expiry_is_a_deadline() -> None:
    live = make(token_expires_at=105.0)
    assert live.next_deadline() == 105.0
    assert live.poll(104.0) == []
    assert live.poll(105.0) == [Due.TOKEN_EXPIRED]


def test_closing_conditions_suppress_the_ping() -> None:
    live = make()
    assert live.poll(200.0) == [Due.STALE]


def test_token_bucket() -> None:
    bucket = TokenBucket(rate_per_s=2.0, burst=3, now=0.0)
    assert [bucket.try_take(0.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.try_take(0.0) == 0.5
    assert bucket.try_take(0.25) == 0.25
    assert bucket.try_take(0.5) == 0.0
    assert not bucket.full(0.5)
    assert bucket.full(10.0)


def test_deadlines_pop_in_order_and_only_once() -> None:
    deadlines: Deadlines[str] = Deadlines()
    assert deadlines.schedule("a", 10.0)
    assert deadlines.schedule("b", 5.0)
    assert not deadlines.schedule("c", 7.0)
    assert deadlines.next_at() == 5.0
    assert deadlines.pop_due(4.9) == []
    assert deadlines.pop_due(7.0) == ["b", "c"]
    assert deadlines.pop_due(7.0) == []
    assert deadlines.next_at() == 10.0
    assert len(deadlines) == 1


def test_deadlines_move_earlier_never_later() -> None:
    deadlines: Deadlines[str] = Deadlines()
    deadlines.schedule("a", 10.0)
    assert not deadlines.schedule("a", 12.0)  # later: stays due at 10
    assert deadlines.schedule("a", 3.0)  # earlier: the timer must wake sooner
    assert deadlines.next_at() == 3.0
    assert deadlines.pop_due(3.0) == ["a"]
    assert deadlines.pop_due(10.0) == []  # the superseded entry is skipped
    assert deadlines.next_at() == float("inf")


def test_deadlines_removed_key_is_not_due() -> None:
    deadlines: Deadlines[str] = Deadlines()
    deadlines.schedule("a", 1.0)
    deadlines.schedule("b", 2.0)
    deadlines.remove("a")
    assert deadlines.next_at() == 2.0
    assert deadlines.pop_due(5.0) == ["b"]


def test_deadlines_let_go_of_removed_keys() -> None:
    # A heap entry holds its key: the entries of removed keys (connections that ended) do
    # not pile up until their old deadlines come round. At most as many as there are
    # scheduled keys stay; with none scheduled, none.
    class Key:
        pass

    deadlines: Deadlines[Key] = Deadlines()
    keys = [Key() for _ in range(1000)]
    for index, key in enumerate(keys):
        deadlines.schedule(key, 100.0 + index)
        deadlines.schedule(key, 50.0 + index)  # moved earlier: a second entry
    kept = keys[-3:]
    gone = [weakref.ref(key) for key in keys[:-3]]
    for key in keys[:-3]:
        deadlines.remove(key)
    del keys, key
    assert sum(ref() is not None for ref in gone) <= len(kept)
    for key in kept:
        deadlines.remove(key)
    last = [weakref.ref(key) for key in kept]
    del kept, key
    assert all(ref() is None for ref in gone + last)
    assert deadlines.next_at() == float("inf")
