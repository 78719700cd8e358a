"""Where API calls wait their turn: the budget each API reports, and a documented requests-per-second.

See exports/http.py for what each API documents about its limits (NOTES.md).
"""

from __future__ import annotations

import itertools
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

#: Below this share of the reported limit, the remaining requests are spread until the reset.
LOW_BUDGET_FRACTION = 0.10
#: The pacer's key of a budget that counts every kind of call.
SHARED_BUDGET = "*"
#: Longest single sleep of a pacer wait: how soon it notices that the run is stopping.
PACER_WAIT_SLICE = 0.25
#: A wait is announced again only when answers push its end later by more than this.
ANNOUNCE_SLACK = 1.0


class PacerWaitTooLong(Exception):
    """A spent budget renews later than the caller will wait (`wait_turn`'s `max_wait`): no turn taken."""

    def __init__(self, seconds: float, limit: int | None) -> None:
        super().__init__(f"the reported budget renews in {seconds:.1f}s")
        self.seconds = seconds
        self.limit = limit  # as the API reported it, if it did


class _Hold(NamedTuple):
    """How long a turn must wait, and whether for a budget (the waits worth announcing: a 429's
    pause is logged by the call that met the 429, the per-second bucket's waits are short)."""

    seconds: float
    for_budget: bool = False


# ------------------------------------------------------------------------- pacing


@dataclass
class _Budget:
    reported: int  # requests left as the API reported them (see `RequestPacer._renew`)
    limit: int | None
    reset_at: float | None  # on the pacer's clock; None: the API did not say
    ticket: int  # the turn whose answer reported it
    next_at: float = 0.0  # spreading a low budget: the earliest next request
    fresh: bool = False  # past its reset: the next answer's count replaces it, whatever it says


class RequestPacer:
    """Keeps one API's callers, across threads, inside its rate limits.

    Two limits, either may be absent: a client-side token bucket for a documented requests per
    second (Next Commerce's 4/s, NOTES.md), and the budget the API reports itself (Intelligems'
    x-ratelimit-*, Voucherify's X-Rate-Limit-*; see `reported_budget`). What is left of a budget
    is its reported count less the requests in flight, which the API may not have counted yet. At
    zero, callers wait for the reset instead of sending a request bound to be refused; under
    `LOW_BUDGET_FRACTION` of the limit, the requests left are spread evenly over the time to the
    reset, so the last one goes out as the budget renews. Budgets are kept per `kind` of call
    (Intelligems' export POSTs have their own bucket), or for all kinds together when the API
    says its budget is `shared` (Voucherify's plan). A 429 pauses every caller (`pause_for`).
    A caller may cap its wait (`max_wait`, the tap's `max_rate_limit_wait_seconds`): a budget that
    renews later than that raises `PacerWaitTooLong` instead of a wait, and spreading never spaces
    requests wider than that.

    `clock` (monotonic seconds) is injectable so tests can drive `try_turn` deterministically.
    `done` must come from the thread that took the turn: it is how an answer is matched to its turn.
    """

    def __init__(self, per_second: float | None, burst: int = 1, *, clock: Callable[[], float] = time.monotonic):
        self.per_second = per_second
        self.burst = burst
        self._clock = clock
        self._lock = threading.Lock()
        self._tokens = float(burst)
        self._last = clock()
        self._paused_until = 0.0
        self._budgets: dict[str, _Budget] = {}
        self._in_flight: dict[str, int] = {}
        self._answered = threading.Condition(self._lock)  # an answer may free a turn before the wait is over
        self._tickets = itertools.count(1)
        self._turn = threading.local()  # the ticket of the turn this thread took
        self._alone: dict[str, int | None] = {}  # per budget key: the turn in flight with no other, if any
        self._flying: dict[str, set[int]] = {}  # per kind: the turns in flight
        self._flew_with: dict[int, frozenset[int]] = {}  # per turn: the turns of its kind in flight when taken

    def wait_turn(
        self,
        kind: str = "",
        stopping: threading.Event | None = None,
        *,
        max_wait: float = math.inf,
        announce: Callable[[float], None] | None = None,
    ) -> bool:
        """Wait for a turn to send; False (no turn taken) within PACER_WAIT_SLICE of `stopping` being set.

        A spent budget renewing more than `max_wait` seconds ahead raises PacerWaitTooLong, also when
        an answer reveals it mid-wait: no wait begins that the caller would give up on anyway.
        `announce(seconds)` hears each wait for a budget that ends later than the last one it heard
        (with the lock held, so other callers cannot slip in between: it must not call the pacer).
        """
        heard_until = -math.inf
        with self._answered:
            while stopping is None or not stopping.is_set():
                hold = self._take_turn(kind, max_wait)
                if hold.seconds <= 0:
                    return True
                heard_until = self._announce(hold, heard_until, announce)
                self._answered.wait(min(hold.seconds, PACER_WAIT_SLICE))
        return False

    def _announce(self, hold: _Hold, heard_until: float, announce: Callable[[float], None] | None) -> float:
        until = self._clock() + hold.seconds
        if announce is None or not hold.for_budget or until <= heard_until + ANNOUNCE_SLACK:
            return heard_until
        announce(hold.seconds)
        return until

    def try_turn(self, kind: str = "", max_wait: float = math.inf) -> float:
        """0 and the turn is taken (the caller sends, then calls `done`), or seconds to wait."""
        with self._lock:
            return self._take_turn(kind, max_wait).seconds

    def _take_turn(self, kind: str, max_wait: float) -> _Hold:
        hold = self._wait_needed(kind, self._clock(), max_wait)
        if hold.seconds <= 0:
            ticket = self._turn.ticket = next(self._tickets)
            for key in (kind, SHARED_BUDGET):
                self._alone[key] = ticket if self._in_flight_of(key) == 0 else None
            self._in_flight[kind] = self._in_flight.get(kind, 0) + 1
            flying = self._flying.setdefault(kind, set())
            self._flew_with[ticket] = frozenset(flying)
            flying.add(ticket)
        return hold

    def _wait_needed(self, kind: str, now: float, max_wait: float) -> _Hold:
        """0 and the turn may be taken, or how long to wait. Call with the lock held."""
        if self._paused_until > now:
            return _Hold(self._paused_until - now)
        budgets = [(key, b) for key in (kind, SHARED_BUDGET) if (b := self._live_budget(key, now)) is not None]
        holds = [self._budget_hold(key, budget, now, max_wait) for key, budget in budgets]
        if (hold := max(holds, default=_Hold(0.0))).seconds > 0:
            return hold
        if self.per_second is not None:
            self._tokens = min(float(self.burst), self._tokens + (now - self._last) * self.per_second)
            self._last = now
            if self._tokens < 1.0:
                return _Hold((1.0 - self._tokens) / self.per_second)
            self._tokens -= 1.0
        for key, budget in budgets:
            self._spread(budget, self._left(key, budget), now, max_wait)
        return _Hold(0.0)

    def _live_budget(self, key: str, now: float) -> _Budget | None:
        budget = self._budgets.get(key)
        if budget is not None and budget.reset_at is not None and budget.reset_at <= now:
            # Past its reset the budget is at least what was left, but by how much more depends on
            # what "reset" means (a full bucket or the next token: Intelligems does not say): keep
            # the count, forget the reset. Spent, it lets one request through to learn the new one,
            # whatever that says. (Not when unspent: a Voucherify "now" in milliseconds can lie a
            # hair ahead, and is no window's end.)
            budget.fresh = self._left(key, budget) <= 0
            budget.reset_at, budget.next_at = None, 0.0
        return budget

    def _in_flight_of(self, key: str) -> int:
        return sum(self._in_flight.values()) if key == SHARED_BUDGET else self._in_flight.get(key, 0)

    def _left(self, key: str, budget: _Budget) -> int:
        return budget.reported - self._in_flight_of(key)

    def _budget_hold(self, key: str, budget: _Budget, now: float, max_wait: float) -> _Hold:
        if self._left(key, budget) > 0:
            return _Hold(max(0.0, budget.next_at - now), for_budget=True)
        if budget.reset_at is not None:
            if (wait := budget.reset_at - now) > max_wait:
                raise PacerWaitTooLong(wait, budget.limit)
            return _Hold(wait, for_budget=True)
        # Spent, reset unknown (see reported_budget): one request at a time until an answer tells.
        return _Hold(PACER_WAIT_SLICE if self._in_flight_of(key) > 0 else 0.0, for_budget=True)

    @staticmethod
    def _spread(budget: _Budget, left: int, now: float, max_wait: float) -> None:
        """Spacing is a courtesy, not a limit: never longer than the caller would wait for a reset."""
        low = budget.limit is not None and left < LOW_BUDGET_FRACTION * budget.limit
        if low and left > 0 and budget.reset_at is not None:
            budget.next_at = now + min((budget.reset_at - now) / left, max_wait)

    def done(
        self,
        kind: str = "",
        remaining: int | None = None,
        reset_in: float | None = None,
        *,
        limit: int | None = None,
        shared: bool = False,
    ) -> None:
        """A request answered; `remaining`/`reset_in`/`limit` are the budget the API reported, if any,
        `shared` when it counts every kind of call."""
        with self._lock:
            self._in_flight[kind] = max(0, self._in_flight.get(kind, 1) - 1)
            ticket, self._turn.ticket = getattr(self._turn, "ticket", None), None
            overtaken_by = self._land(kind, ticket)
            if remaining is not None:
                key = SHARED_BUDGET if shared else kind
                if not shared:
                    remaining = max(0, remaining - overtaken_by)
                reset_at = self._clock() + reset_in if reset_in is not None else None
                self._renew(key, _Budget(remaining, limit, reset_at, ticket or 0), shared, ticket)
            self._answered.notify_all()

    def _land(self, kind: str, ticket: int | None) -> int:
        """How many older turns of this kind were answered while this one was in flight.

        Requests overtake each other on the way too: one sent earlier may reach the API after this
        one, so this answer's count does not include it, and its own answer, come first, no longer
        stands in flight. Taking those off keeps a refilling bucket's count from rising by them.
        """
        if ticket is None:
            return 0
        flying = self._flying.get(kind, set())
        flying.discard(ticket)
        return len(self._flew_with.pop(ticket, frozenset()) - flying)

    def _renew(self, key: str, report: _Budget, shared: bool, ticket: int | None) -> None:
        """Answers overtake each other, so the newest count is not simply the last one to arrive.

        Voucherify counts calls in fixed windows (a minute, an hour: NOTES.md), where the count only
        falls: within a window the lowest report is the newest. A report is taken as it is when the
        window is new (past the reset, or a later reset) or when its request was the only one in
        flight. Intelligems' buckets refill as time passes: the report of the latest turn wins.
        """
        previous = self._budgets.get(key)
        if previous is not None and not previous.fresh:
            if shared and not self._new_window(previous, report, ticket, key):
                if self._as_new(previous, report):
                    return
            elif not shared and ticket is not None and ticket < previous.ticket:
                return
        if previous is not None:
            report.next_at = previous.next_at  # each answer renews the count, not the spacing
        self._budgets[key] = report

    @staticmethod
    def _as_new(previous: _Budget, report: _Budget) -> bool:
        """In one window: the lower count is the newer; of equal ones, the one that knows the reset."""
        return (previous.reported, previous.reset_at is None) <= (report.reported, report.reset_at is None)

    def _new_window(self, previous: _Budget, report: _Budget, ticket: int | None, key: str) -> bool:
        if ticket is not None and self._alone.get(key) == ticket:
            return True
        return report.reset_at is not None and previous.reset_at is not None and report.reset_at > previous.reset_at + 1

    def pause_for(self, seconds: float) -> None:
        """Everyone waits: the API answered 429."""
        with self._lock:
            self._paused_until = max(self._paused_until, self._clock() + seconds)
