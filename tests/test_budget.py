"""The per-portal request budget: the pure sliding window, and how the senders use it."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from tests.conftest import ManualClock, action_payload, wait_for
from throttled.drain.budget import Budget

PORTAL = 62515


def spend(budget: Budget, at: float) -> None:
    """A request sent at `at` and answered at once."""
    budget.spend(at)
    budget.settle(at, at)


def test_budget_is_immediate_below_half_then_paced_wider_as_it_fills():
    budget = Budget(10, 10.0)
    now = 100.0
    for _ in range(5):  # under half the budget: no waiting
        assert budget.earliest(now) == now
        spend(budget, now)
    # half used: a partial request waits interval / limit x used / (limit - used)
    assert budget.earliest(now) == now + 1.0
    spend(budget, now + 1.0)
    assert budget.earliest(now + 1.0) == now + 1.0 + 6 / 4
    for _ in range(4):
        spend(budget, now + 2.0)
    # all 10 used within the window: nothing goes until the oldest leaves it
    assert budget.hard_earliest(now + 5.0) == now + 10.0
    assert budget.earliest(now + 5.0) == now + 10.0


def test_budget_never_allows_more_than_limit_in_any_window():
    for pick in (Budget.earliest, Budget.hard_earliest):
        budget = Budget(7, 2.0)
        sent: list[float] = []
        t = 0.0
        while len(sent) < 200:
            t = pick(budget, t)
            spend(budget, t)
            sent.append(t)
        for i, start in enumerate(sent):
            inside = [s for s in sent[i:] if s < start + 2.0]
            assert len(inside) <= 7


def test_requests_in_flight_hold_their_places_until_answered():
    budget = Budget(2, 1.0)
    budget.spend(0.0)
    budget.spend(0.1)
    assert budget.hard_earliest(5.0) == float("inf")  # both may still arrive any moment
    budget.settle(0.0, 5.0)
    assert budget.hard_earliest(5.0) == 6.0  # the answered one counts from its answer
    budget.settle(0.1, 5.5)
    assert budget.hard_earliest(5.6) == 6.0  # two answered: the older leaves first


@given(
    st.lists(st.tuples(st.floats(0.0, 0.5), st.floats(0.0, 0.5)), min_size=1, max_size=120),
    st.integers(1, 8),
)
def test_arrivals_stay_within_the_budget_whatever_the_network_delays(delays, limit):
    """Each request arrives `to` after it is sent and is answered `back` after that; it is
    settled at its answer. However unevenly the network delays them, HubSpot (counting at
    arrival) never sees more than `limit` in a window. (One request at a time, as a sender
    with one request in flight.)"""
    budget = Budget(limit, 1.0)
    arrivals: list[float] = []
    t = 0.0
    for to, back in delays:
        t = budget.hard_earliest(t)
        budget.spend(t)
        arrivals.append(t + to)
        budget.settle(t, t + to + back)
        t += to + back
    arrivals.sort()
    for i, start in enumerate(arrivals):
        assert len([a for a in arrivals[i:] if a < start + 1.0]) <= limit


async def _post(daemon, n: int, fields: dict[str, str], workflow_id: int) -> list[str]:
    ids = []
    for _ in range(n):
        payload = action_payload(
            portal_id=PORTAL, workflow_id=workflow_id, input_fields=dict(fields)
        )
        status, _ = await daemon.post_action(payload)
        assert status == 200
        ids.append(payload["callbackId"])
    return ids


def _requests(fake, ids: list[str]) -> list[float]:
    wanted = set(ids)
    return sorted(r.at for r in fake.received if wanted.intersection(r.callback_ids))


async def _one_request_per_step(fake, clock: ManualClock, ids: list[str], n: int) -> None:
    """Let `n` requests for `ids` go, one per clock step of 1.5 s (past the next slot of a
    queue sending once a second, and its send margin); the clock stands still after the n-th."""
    for sent in range(1, n + 1):
        await wait_for(lambda sent=sent: len(_requests(fake, ids)) >= sent)
        if sent < n:
            clock.advance(1.5)


async def test_a_queue_waking_from_idle_skips_the_soft_pace(daemon_factory, fake_hubspot):
    # 6 requests per minute: from the 3rd on, a partial request waits >= 10 s for the next.
    clock = ManualClock()
    budget = {"portal_requests": 6, "portal_interval_seconds": 60}
    async with daemon_factory(sender=budget, clock=clock) as daemon:
        await daemon.connect_portal(fake_hubspot, PORTAL)
        backlog = await _post(daemon, 10, {"maxThroughput": "1", "timeUnit": "seconds"}, 1)
        await _one_request_per_step(fake_hubspot, clock, backlog, 3)
        # The clock now stands still: the soft pace (>= 10 s) never ends, nor does the
        # backlog's own second. The idle queue's action goes all the same (waiting for the
        # pace, it would wait for good), and the budget itself held: <= 6 requests in all.
        [fresh] = await _post(daemon, 1, {"maxThroughput": "5", "timeUnit": "seconds"}, 2)
        await wait_for(lambda: fresh in fake_hubspot.completed, timeout=20)
        assert len(_requests(fake_hubspot, backlog)) == 3
    assert [r.callback_ids for r in fake_hubspot.received][3] == (fresh,)
    assert len(fake_hubspot.received) <= 6


async def test_full_requests_skip_the_soft_pace_but_not_the_budget(daemon_factory, fake_hubspot):
    clock = ManualClock()
    sender = {"portal_requests": 6, "portal_interval_seconds": 60, "batch_size": 2}
    async with daemon_factory(sender=sender, clock=clock) as daemon:
        await daemon.connect_portal(fake_hubspot, PORTAL)
        ids = await _post(daemon, 16, {"maxThroughput": "2", "timeUnit": "seconds"}, 1)
        # Every request is full (2 callbacks), so none waits for the soft pace: from the 4th
        # on, each goes one clock step (1.5 s) after the one before, where a partial request
        # would wait >= 10 s (and the clock never gets there).
        await _one_request_per_step(fake_hubspot, clock, ids, 6)
        # The hard budget stops them at 6: a step later the queue's rate lets its next rows
        # go (the sender holds them), and the sender's run-once step sends nothing.
        clock.advance(1.5)
        portal_sender = daemon.runtime.dispatcher.sender(PORTAL)
        assert portal_sender is not None
        await wait_for(lambda: portal_sender.held >= 2)
        assert not await portal_sender.send_next()
        sends = _requests(fake_hubspot, ids)
    assert all(len(r.callback_ids) == 2 for r in fake_hubspot.received)
    assert len(sends) == 6
