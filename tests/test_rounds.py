"""The round clock's decisions with made-up times: no threads, no sleeping, no job."""

from __future__ import annotations

from coordinator.rounds import CloseRound, GangOpened, SyncRounds, Wait, async_round_closes, lapsed

CLOSE = CloseRound(deadline_passed=False)


def clock(replicas: int = 3) -> SyncRounds:
    return SyncRounds(replicas=replicas, start_timeout_s=30.0, round_deadline_s=60.0)


def test_the_gang_opens_when_every_replica_has_joined() -> None:
    rounds = clock()
    assert rounds.join("a", 100.0) == [] and rounds.join("b", 101.0) == []
    assert rounds.tick(105.0) == [Wait(130.0)]  # 30 s after the first join
    assert rounds.join("c", 110.0) == [GangOpened(3, 3)]
    assert rounds.opened_at == 110.0 and rounds.tick(111.0) == [Wait(170.0)]  # the round deadline, from the opening
    assert rounds.join("d", 112.0) == []  # once open, it stays open


def test_reports_before_the_gang_wait_for_it() -> None:
    rounds = clock()
    rounds.join("a", 0.0)
    assert rounds.report("a", 1.0) == []  # a alone, early: round 0 must not close on it
    rounds.join("b", 2.0)
    assert rounds.report("b", 3.0) == []
    assert rounds.join("c", 4.0) == [GangOpened(3, 3)]  # c has not reported yet
    assert rounds.report("c", 5.0) == [CLOSE]


def test_start_timeout_opens_a_short_gang_and_closes_if_all_reported() -> None:
    rounds = clock()
    rounds.join("a", 0.0), rounds.join("b", 1.0)
    rounds.report("a", 2.0), rounds.report("b", 3.0)
    assert rounds.tick(29.9) == [Wait(30.0)]
    opened = rounds.tick(30.0)
    assert opened == [GangOpened(2, 3), CLOSE] and opened[0].short  # type: ignore[union-attr]


def test_round_closes_when_every_live_member_reported_then_reopens() -> None:
    rounds = clock(2)
    rounds.join("a", 0.0), rounds.join("b", 0.0)
    assert rounds.report("a", 1.0) == [] and rounds.report("b", 2.0) == [CLOSE]
    rounds.round_closed(2.0)
    assert rounds.reported == set() and rounds.tick(3.0) == [Wait(62.0)]
    assert rounds.report("b", 4.0) == []  # the next round waits for a again


def test_the_member_everyone_waited_for_leaving_closes_the_round() -> None:
    rounds = clock()
    for w in "abc":
        rounds.join(w, 0.0)
    rounds.report("a", 1.0), rounds.report("c", 1.5)
    assert rounds.leave("b", 2.0) == [CLOSE]
    rounds.round_closed(2.0)
    assert rounds.leave("a", 3.0) == []  # c has not reported this round
    assert rounds.leave("c", 4.0) == []  # nobody left: nothing to close


def test_a_reporter_leaving_does_not_count() -> None:
    rounds = clock(2)
    rounds.join("a", 0.0), rounds.join("b", 0.0)
    rounds.report("a", 1.0)
    assert rounds.leave("a", 2.0) == [] and rounds.reported == set()
    assert rounds.report("b", 3.0) == [CLOSE]


def test_round_deadline_closes_on_who_reported() -> None:
    rounds = clock(2)
    rounds.join("a", 0.0), rounds.join("b", 0.0)
    rounds.report("a", 10.0)
    assert rounds.tick(59.0) == [Wait(60.0)]
    assert rounds.tick(60.0) == [CloseRound(deadline_passed=True)]


def test_async_rounds_count_reports() -> None:
    assert not async_round_closes(reports=2, replicas=3, round=4, total_rounds=10)
    assert async_round_closes(reports=3, replicas=3, round=4, total_rounds=10)
    assert not async_round_closes(reports=3, replicas=3, round=10, total_rounds=10)  # all rounds ran


def test_lapsed_leases() -> None:
    seen = {"a": 100.0, "b": 95.0, "c": 89.9}
    assert lapsed(seen, now=100.0, lease_s=10.0) == ["c"]
    assert lapsed(seen, now=100.0, lease_s=1.0) == ["b", "c"]
    assert lapsed({}, now=0.0, lease_s=1.0) == []
