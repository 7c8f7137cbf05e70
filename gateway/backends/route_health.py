"""What one process knows of its deployments' health, and the choice of a deployment: no
I/O and no awaiting, with the clock passed in, so every rule is tested without waiting.

Rules:
- a deployment that fails ``allowed_fails`` times within ``window_s`` gets no traffic for
  ``cooldown_s``; then exactly one request (the probe) may go to it: its success ends the
  cooldown, its failure starts another;
- a 429 makes a deployment skipped for its ``Retry-After``, without counting as a failure;
- ``max_concurrency`` is a hard cap on the generations in flight on a deployment;
- strategies: ``weighted`` (random in proportion to the weights), ``least_busy`` (fewest
  in flight, ties broken at random), ``lowest_latency`` (lowest moving average of the time
  to the first token; ``EXPLORE_SHARE`` of the requests go to another deployment at random
  so that every figure stays fresh, and a deployment with no figure yet is tried first).
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from config.routes import Cooldown, Deployment

# lowest_latency: the share of requests sent elsewhere than the fastest deployment.
EXPLORE_SHARE = 0.1
# Weight of the newest sample in the moving average of the time to first token.
EWMA_ALPHA = 0.3

HEALTHY = "healthy"
COOLDOWN = "cooldown"
PROBING = "probing"


@dataclass(eq=False)
class DeploymentState:
    spec: Deployment
    route: str
    in_flight: int = 0
    fails: deque[float] = field(default_factory=deque)
    cooldown_until: float | None = None
    probe_in_flight: bool = False
    skip_until: float = 0.0
    ttft_avg: float | None = None
    outcomes: dict[str, int] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.spec.name

    def phase(self, now: float) -> str:
        if self.cooldown_until is None:
            return HEALTHY
        return COOLDOWN if now < self.cooldown_until else PROBING

    def at_cap(self) -> bool:
        cap = self.spec.max_concurrency
        return cap is not None and self.in_flight >= cap

    def available(self, now: float) -> bool:
        """Whether a request may start here now (the cap aside)."""
        if now < self.skip_until:
            return False
        phase = self.phase(now)
        if phase == COOLDOWN:
            return False
        return not (phase == PROBING and self.probe_in_flight)

    def begin(self, now: float) -> bool:
        """A request starts here; whether it is the probe after a cooldown."""
        self.in_flight += 1
        probe = self.phase(now) == PROBING
        if probe:
            self.probe_in_flight = True
        return probe

    def end(self, probe: bool) -> None:
        self.in_flight -= 1
        if probe:
            self.probe_in_flight = False

    def succeeded(self, ttft_s: float | None) -> None:
        """The first token arrived (the deployment answers): a probe ends the cooldown.
        Other failures are not forgotten: they leave the window as it slides, so a
        deployment that keeps failing mid-stream is still cooled down."""
        if self.cooldown_until is not None:
            self.cooldown_until = None
            self.fails.clear()
        if ttft_s is not None:
            self.ttft_avg = ttft_s if self.ttft_avg is None else (
                EWMA_ALPHA * ttft_s + (1 - EWMA_ALPHA) * self.ttft_avg)

    def failed(self, now: float, policy: Cooldown, probe: bool) -> bool:
        """A failure of the deployment's own (not of the request); whether it starts a cooldown."""
        if probe or self.phase(now) == PROBING:
            self.cooldown_until = now + policy.cooldown_s
            self.fails.clear()
            return True
        fails = self.fails
        fails.append(now)
        while fails and fails[0] <= now - policy.window_s:
            fails.popleft()
        if len(fails) >= policy.allowed_fails:
            self.cooldown_until = now + policy.cooldown_s
            fails.clear()
            return True
        return False

    def rate_limited(self, now: float, retry_after_s: float) -> None:
        self.skip_until = max(self.skip_until, now + retry_after_s)

    def count(self, outcome: str) -> None:
        self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1

    def snapshot(self, now: float) -> dict[str, object]:
        """For ``GET /admin/routes``: nothing of the deployment's settings, so no secret."""
        return {
            "name": self.name,
            "backend": self.spec.backend,
            "state": self.phase(now),
            "cooldown_remaining_s": round(max((self.cooldown_until or now) - now, 0.0), 3),
            "rate_limited_for_s": round(max(self.skip_until - now, 0.0), 3),
            "in_flight": self.in_flight,
            "max_concurrency": self.spec.max_concurrency,
            "weight": self.spec.weight,
            "recent_fails": len(self.fails),
            "ttft_avg_s": None if self.ttft_avg is None else round(self.ttft_avg, 4),
            "requests": dict(self.outcomes),
        }


Pick = Callable[[Sequence[DeploymentState]], DeploymentState]


def pick(strategy: str, candidates: Sequence[DeploymentState], rng: random.Random) -> DeploymentState:
    """One of ``candidates`` (not empty), chosen by ``strategy``."""
    if len(candidates) == 1:
        return candidates[0]
    if strategy == "least_busy":
        fewest = min(c.in_flight for c in candidates)
        return rng.choice([c for c in candidates if c.in_flight == fewest])
    if strategy == "lowest_latency":
        unmeasured = [c for c in candidates if c.ttft_avg is None]
        if unmeasured:
            return rng.choice(unmeasured)
        ranked = sorted(candidates, key=lambda c: c.ttft_avg or 0.0)
        if rng.random() < EXPLORE_SHARE:
            return rng.choice(ranked[1:])
        return ranked[0]
    return rng.choices(list(candidates), weights=[c.spec.weight for c in candidates])[0]
