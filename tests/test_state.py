"""The connection state machine, driven with plain numbers: no socket, no event loop."""

from __future__ import annotations

import pytest

from config import Settings
from gateway.core.liveness import Liveness
from gateway.core.state import (
    SHUTTING_DOWN,
    SLOW_CONSUMER,
    SOCKET_GONE,
    STALE,
    TOKEN_EXPIRED,
    ConnectionState,
    InvalidTransition,
    Phase,
)
from gateway.wire.codes import CloseCode, ErrorCode
from gateway.wire.errors import GatewayError
from tests.support import make_settings


def state_at(now: float = 0.0, *, token_expires_at: float | None = None, **overrides: object) -> ConnectionState:
    settings: Settings = make_settings(heartbeat_interval_s=10, heartbeat_timeout_s=30, slow_consumer_timeout_s=5,
                                       **overrides)
    liveness = Liveness(now=now, heartbeat_interval_s=10, heartbeat_timeout_s=30, slow_consumer_timeout_s=5,
                        token_expires_at=token_expires_at)
    return ConnectionState(settings, liveness)


def test_the_first_close_decision_wins_and_the_socket_closes_once() -> None:
    state = state_at()
    phases = [(state.phase, state.closing)]
    assert state.decide_close(STALE) is True
    assert state.decide_close(SHUTTING_DOWN) is False
    assert state.decision is STALE
    phases.append((state.phase, state.closing))
    state.socket_closed()
    phases.append((state.phase, state.closing))
    assert phases == [(Phase.OPEN, False), (Phase.CLOSING, True), (Phase.CLOSED, True)]
    with pytest.raises(InvalidTransition, match="expected a connection that is open or closing, found closed"):
        state.socket_closed()


def test_a_socket_that_closes_without_a_decision_was_gone() -> None:
    state = state_at()
    state.socket_closed()
    assert state.decision is SOCKET_GONE and state.decision.code is None
    assert state.decide_close(STALE) is False


def test_deadlines_ping_on_cadence_then_close_a_silent_client() -> None:
    state = state_at()
    assert state.liveness.next_deadline() == 10
    outcome = state.on_deadline(10.0)
    assert outcome.ping and outcome.close is None and outcome.next_deadline == 20
    # The client answered at 15 (a protocol pong the transport saw): staleness moves to 45.
    outcome = state.on_deadline(20.0, last_inbound=15.0)
    assert outcome.ping and outcome.next_deadline == 30
    assert state.on_deadline(44.0).close is None
    outcome = state.on_deadline(45.0)
    assert outcome.close is STALE and outcome.close.code == CloseCode.HEARTBEAT_TIMEOUT
    assert outcome.next_deadline is None and not outcome.ping


def test_a_full_queue_for_the_timeout_is_a_slow_consumer() -> None:
    state = state_at()
    assert state.liveness.queue_full(3.0) is True
    assert state.liveness.next_deadline() == 8.0
    assert state.on_deadline(8.0).close is SLOW_CONSUMER
    assert SLOW_CONSUMER.code == CloseCode.SLOW_CONSUMER and not SLOW_CONSUMER.graceful


def test_token_expiry_is_a_graceful_close_that_keeps_the_generations() -> None:
    state = state_at(token_expires_at=7.0)
    assert state.on_deadline(7.0).close is TOKEN_EXPIRED
    assert TOKEN_EXPIRED.code == CloseCode.TOKEN_EXPIRED and int(CloseCode.TOKEN_EXPIRED) == 4001
    assert TOKEN_EXPIRED.graceful and TOKEN_EXPIRED.keep_generations and TOKEN_EXPIRED.terminal is None
    assert [f.code for f in TOKEN_EXPIRED.final] == [ErrorCode.TOKEN_EXPIRED]


def test_a_closing_connection_has_no_deadlines() -> None:
    state = state_at()
    state.decide_close(SHUTTING_DOWN)
    outcome = state.on_deadline(100.0)
    assert outcome.close is None and outcome.next_deadline is None and not outcome.ping


def admit(state: ConnectionState, **overrides: object) -> None:
    facts: dict[str, object] = {"prompt_chars": 10, "max_tokens": None, "room": None, "in_room": False,
                                "id_taken": False, "draining": False, "following": 0}
    facts.update(overrides)
    state.admit_generate(**facts)  # type: ignore[arg-type]


@pytest.mark.parametrize(("facts", "code"), [
    ({"prompt_chars": 101}, ErrorCode.PROMPT_TOO_LONG),
    ({"max_tokens": 65}, ErrorCode.BAD_REQUEST),
    ({"room": "lobby", "in_room": False}, ErrorCode.FORBIDDEN),
    ({"id_taken": True}, ErrorCode.DUPLICATE_ID),
    ({"draining": True}, ErrorCode.SHUTTING_DOWN),
    ({"following": 2}, ErrorCode.TOO_MANY_STREAMS),
    # The checks come in this order: the first failing one is reported.
    ({"prompt_chars": 101, "id_taken": True, "draining": True}, ErrorCode.PROMPT_TOO_LONG),
    ({"id_taken": True, "following": 2}, ErrorCode.DUPLICATE_ID),
])
def test_admission_refuses_with_the_first_failing_check(facts: dict[str, object], code: ErrorCode) -> None:
    state = state_at(max_prompt_chars=100, max_tokens=64, default_max_tokens=16, max_streams_per_connection=2)
    with pytest.raises(GatewayError) as refused:
        admit(state, **facts)
    assert refused.value.code == code


def test_room_generations_count_toward_the_per_connection_limit() -> None:
    state = state_at(max_streams_per_connection=2)
    admit(state, following=1)
    admit(state, room="lobby", in_room=True, following=1)
    with pytest.raises(GatewayError) as full:
        admit(state, room="lobby", in_room=True, following=2)
    assert full.value.code == ErrorCode.TOO_MANY_STREAMS
    state.decide_close(STALE)
    with pytest.raises(GatewayError) as refused:
        admit(state)
    assert refused.value.code == ErrorCode.SHUTTING_DOWN


def test_joining_follows_the_rooms_claim_and_the_room_limit() -> None:
    state = state_at(max_rooms_per_connection=2)
    assert state.admit_join("a", "*", set()) is True
    assert state.admit_join("a", ["*"], set()) is True
    assert state.admit_join("a", ["a", "b"], set()) is True
    assert state.admit_join("a", ["a"], {"a"}) is False  # already a member: nothing to do
    for claim in (None, "a", ["b"], {"a": 1}):
        with pytest.raises(GatewayError) as refused:
            state.admit_join("a", claim, set())
        assert refused.value.code == ErrorCode.FORBIDDEN
    with pytest.raises(GatewayError) as full:
        state.admit_join("c", "*", {"a", "b"})
    assert full.value.code == ErrorCode.BAD_REQUEST
