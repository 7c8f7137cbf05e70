"""One connection's state machine: its phase, how it ends, what is due when, and whether
a request is admitted. No I/O: the async layer (``gateway.connection``) feeds it events
with the time they happened and carries out what it decides.

Phases: ``OPEN`` -> ``CLOSING`` (a close was decided: the first decision wins) ->
``CLOSED`` (the socket is closed). A transition from any other phase raises
``InvalidTransition``, naming the phase expected and the phase found.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from config import Settings
from gateway.core.liveness import Due, Liveness
from gateway.wire.codes import CloseCode, ErrorCode
from gateway.wire.errors import GatewayError
from gateway.wire.events import Failed


class Phase(Enum):
    OPEN = "open"
    CLOSING = "closing"
    CLOSED = "closed"


class InvalidTransition(RuntimeError):
    def __init__(self, action: str, expected: tuple[Phase, ...], found: Phase) -> None:
        names = " or ".join(phase.value for phase in expected)
        super().__init__(f"cannot {action}: expected a connection that is {names}, found {found.value}")


@dataclass(frozen=True, slots=True)
class CloseDecision:
    """How a connection ends.

    ``code`` None means the client is gone and nothing more can be sent. A graceful close
    first ends the generations this socket follows with ``terminal`` (when set), sends
    ``final`` error frames and flushes the queue, then the close frame; an abrupt one
    cancels everything and closes at once, without waiting for a client that may not be
    reading; unless ``handshake``, for a client known to read (a flooding one): the close
    frame then waits for the client's own, as a graceful close's does. ``metric`` is the
    ``gateway_closes_total`` reason counted when it is decided.
    """

    code: int | None
    reason: str = ""
    graceful: bool = False
    handshake: bool = False
    # A graceful close that leaves the generations running, detached, for the client to
    # resume when it reconnects (token expiry), instead of ending them with ``terminal``.
    keep_generations: bool = False
    terminal: Failed | None = None
    final: tuple[Failed, ...] = ()
    metric: str | None = None


TOKEN_EXPIRED_MESSAGE = "the access token has expired; reconnect with a new one to resume your answers"
SHUTTING_DOWN_MESSAGE = "the server is shutting down"

SOCKET_GONE = CloseDecision(None)
INTERNAL_ERROR = CloseDecision(CloseCode.INTERNAL, "internal error")
SLOW_CONSUMER = CloseDecision(CloseCode.SLOW_CONSUMER, "slow consumer", metric="slow_consumer")
STALE = CloseDecision(CloseCode.HEARTBEAT_TIMEOUT, "heartbeat timeout", metric="stale")
TOKEN_EXPIRED = CloseDecision(
    CloseCode.TOKEN_EXPIRED, "token expired", graceful=True, keep_generations=True,
    final=(Failed(ErrorCode.TOKEN_EXPIRED, TOKEN_EXPIRED_MESSAGE),), metric="token_expired",
)
FLOOD = CloseDecision(CloseCode.POLICY, "too many frames for too long", handshake=True, metric="flood")
SHUTTING_DOWN = CloseDecision(
    CloseCode.GOING_AWAY, "server shutting down", graceful=True,
    terminal=Failed(ErrorCode.SHUTTING_DOWN, SHUTTING_DOWN_MESSAGE),
)
# Close codes counted in ``gateway_closes_total`` (by their name) when the close frame goes out.
COUNTED_AT_CLOSE = frozenset({CloseCode.INTERNAL, CloseCode.GOING_AWAY, CloseCode.POLICY, CloseCode.TRY_AGAIN_LATER})


class FrameVerdict(Enum):
    """What becomes of one inbound frame under the connection's frame rate."""

    ACCEPT = "accept"
    DROP = "drop"  # over the rate; the client was told less than a second ago
    TELL = "tell"  # over the rate: drop it and send a rate_limited error frame
    FLOOD = "flood"  # over the rate for GATEWAY_FLOOD_CLOSE_S: close (FLOOD)


# A rate_limited error frame for dropped frames goes out at most this often.
TELL_EVERY_S = 1.0


@dataclass(frozen=True, slots=True)
class DeadlineOutcome:
    """What ``ConnectionState.on_deadline`` decided: a ping to send, or a close (then
    ``next_deadline`` is None)."""

    ping: bool
    close: CloseDecision | None
    next_deadline: float | None


class ConnectionState:
    __slots__ = ("_dropped_at", "_flood_since", "_frame_allowance", "_frames_at", "_told_at", "decision", "liveness",
                 "phase", "settings")

    def __init__(self, settings: Settings, liveness: Liveness) -> None:
        self.settings = settings
        self.liveness = liveness
        self.phase = Phase.OPEN
        self.decision: CloseDecision | None = None
        # The frame rate's token bucket (None: full) and the flood it may be in.
        self._frame_allowance: float | None = None
        self._frames_at = 0.0
        self._flood_since: float | None = None
        self._dropped_at = 0.0
        self._told_at: float | None = None

    @property
    def closing(self) -> bool:
        """Nothing new is served: a close was decided, or the socket is closed."""
        return self.phase is not Phase.OPEN

    def decide_close(self, decision: CloseDecision) -> bool:
        """The first decision wins; False when one was made already."""
        if self.phase is not Phase.OPEN:
            return False
        self.phase = Phase.CLOSING
        self.decision = decision
        return True

    def socket_closed(self) -> None:
        if self.phase is Phase.CLOSED:
            raise InvalidTransition("close the socket", (Phase.OPEN, Phase.CLOSING), self.phase)
        if self.decision is None:
            self.decision = SOCKET_GONE
        self.phase = Phase.CLOSED

    def on_deadline(self, now: float, last_inbound: float | None = None) -> DeadlineOutcome:
        """The hub's timer found this connection due. ``last_inbound`` is when the
        transport last received bytes (protocol pongs count as a sign of life)."""
        if self.phase is not Phase.OPEN:
            return DeadlineOutcome(False, None, None)
        liveness = self.liveness
        if last_inbound is not None:
            liveness.inbound(last_inbound)
        ping = False
        for due in liveness.poll(now):
            if due is Due.SLOW_CONSUMER:
                return DeadlineOutcome(False, SLOW_CONSUMER, None)
            if due is Due.STALE:
                return DeadlineOutcome(False, STALE, None)
            if due is Due.TOKEN_EXPIRED:
                return DeadlineOutcome(False, TOKEN_EXPIRED, None)
            if due is Due.SEND_PING:
                ping = True
        return DeadlineOutcome(ping, None, liveness.next_deadline())

    def admit_frame(self, now: float) -> tuple[FrameVerdict, float]:
        """One inbound frame arrived at ``now``: whether it is served, and when the next
        one would be (seconds, for the client's ``retry_after_s``)."""
        settings = self.settings
        rate = settings.connection_frame_rate_per_s
        burst = float(settings.connection_frame_burst)
        allowance = self._frame_allowance
        allowance = burst if allowance is None else min(burst, allowance + (now - self._frames_at) * rate)
        self._frames_at = now
        if allowance >= 1.0:
            self._frame_allowance = allowance - 1.0
            # A flood ends after a whole second without a dropped frame: a client sending
            # over the rate keeps flooding even though the rate lets a frame through now
            # and then.
            if self._flood_since is not None and now - self._dropped_at >= TELL_EVERY_S:
                self._flood_since = None
            return FrameVerdict.ACCEPT, 0.0
        self._frame_allowance = allowance
        self._dropped_at = now
        retry_after = (1.0 - allowance) / rate
        if self._flood_since is None:
            self._flood_since = now
        elif now - self._flood_since >= settings.flood_close_s:
            return FrameVerdict.FLOOD, retry_after
        if self._told_at is None or now - self._told_at >= TELL_EVERY_S:
            self._told_at = now
            return FrameVerdict.TELL, retry_after
        return FrameVerdict.DROP, retry_after

    def admit_generate(self, *, prompt_chars: int, max_tokens: int | None, room: str | None,
                       in_room: bool, id_taken: bool, draining: bool, following: int) -> None:
        """Raise the error that refuses a generate, or return: it may start. ``following``
        counts the generations the connection follows or started in a room."""
        settings = self.settings
        if prompt_chars > settings.max_prompt_chars:
            raise GatewayError(f"the prompt is longer than {settings.max_prompt_chars} characters",
                               code=ErrorCode.PROMPT_TOO_LONG)
        if max_tokens is not None and max_tokens > settings.max_tokens:
            raise GatewayError(f"max_tokens must be at most {settings.max_tokens}", code=ErrorCode.BAD_REQUEST)
        if room is not None and not in_room:
            raise GatewayError("join the room before generating in it", code=ErrorCode.FORBIDDEN)
        if id_taken:
            raise GatewayError("a generation with this id is already running", code=ErrorCode.DUPLICATE_ID)
        if draining or self.closing:
            raise GatewayError(SHUTTING_DOWN_MESSAGE, code=ErrorCode.SHUTTING_DOWN)
        if following >= settings.max_streams_per_connection:
            raise GatewayError(f"at most {settings.max_streams_per_connection} generations per connection",
                               code=ErrorCode.TOO_MANY_STREAMS)

    def admit_join(self, room: str, rooms_claim: object, joined: set[str] | frozenset[str]) -> bool:
        """Raise the error that refuses joining ``room``; False when already a member
        (nothing to do), True when it may join."""
        allowed = rooms_claim == "*" or (isinstance(rooms_claim, list) and ("*" in rooms_claim or room in rooms_claim))
        if not allowed:
            raise GatewayError("not allowed to join this room", code=ErrorCode.FORBIDDEN)
        if room in joined:
            return False
        if len(joined) >= self.settings.max_rooms_per_connection:
            raise GatewayError(f"at most {self.settings.max_rooms_per_connection} rooms per connection",
                               code=ErrorCode.BAD_REQUEST)
        return True
