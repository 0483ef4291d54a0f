"""recommend's two-stage search on scripted measurements (no model: the order of attempts is exact)."""
from __future__ import annotations

from advisor.api import search_cheapest_verified


def run(passes, plausible, verified, max_attempts=3, explore=True):
    log = []

    def measure(pos, reason):
        log.append((pos, reason))
        return pos in verified

    return search_cheapest_verified(passes, plausible, max_attempts, explore, measure), log


def test_first_choice_then_cheaper_plausible_ones_cheapest_first():
    #        0      1      2      3     4
    passes = [False, False, False, True, True]
    plausible = [True, True, False, True, True]
    best, log = run(passes, plausible, verified={1, 3})
    assert log == [(3, "first choice"), (0, "cheaper"), (1, "cheaper")]
    assert best == 1


def test_escalation_on_a_miss_and_the_attempt_budget():
    passes = [False, True, True, True]
    plausible = [True, True, True, True]
    best, log = run(passes, plausible, verified={2}, max_attempts=2)
    assert log == [(1, "first choice"), (2, "escalation")] and best == 2  # no attempt left to explore
    best, log = run(passes, plausible, verified=set(), max_attempts=3)
    assert log == [(1, "first choice"), (2, "escalation"), (3, "escalation")] and best is None


def test_no_exploration_without_a_pass_or_when_turned_off():
    passes = [False, False, True]
    plausible = [True, True, True]
    best, log = run(passes, plausible, verified={2}, explore=False)
    assert log == [(2, "first choice")] and best == 2
    best, log = run([False, False, False], plausible, verified={0, 1, 2})
    assert log == [] and best is None  # nothing predicted to pass: nothing is run
