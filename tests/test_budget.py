"""The per-portal request budget (pure, no I/O)."""

from __future__ import annotations

from throttled.sender import Budget


def test_budget_is_immediate_below_half_then_paced_then_full():
    budget = Budget(10, 10.0)
    now = 100.0
    for _ in range(5):  # under half the budget: no waiting
        assert budget.earliest(now) == now
        budget.spend(now)
    # half used: requests are spaced interval / limit apart so each one gathers more
    assert budget.earliest(now) == now + 1.0
    for i in range(5):
        t = now + 1.0 * (i + 1)
        assert budget.earliest(t) == t
        budget.spend(t)
    # all 10 used within the window: the next waits for the oldest to leave it
    assert budget.earliest(now + 5.0) == now + 10.0


def test_budget_never_allows_more_than_limit_in_any_window():
    budget = Budget(7, 2.0)
    sent: list[float] = []
    t = 0.0
    while len(sent) < 200:
        t = budget.earliest(t)
        budget.spend(t)
        sent.append(t)
    for i, start in enumerate(sent):
        inside = [s for s in sent[i:] if s < start + 2.0]
        assert len(inside) <= 7
