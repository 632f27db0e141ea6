"""One writer per stage output: a live holder makes the second runner refuse, naming it; a crashed
holder's lease (no longer renewed) is taken over once it expires; release frees it."""

from __future__ import annotations

import threading
import time

import pytest
from lease_race import race_two_takers, wait_for_renewals, wait_until
from vlm_core import storage
from vlm_trainer import lease


def test_a_live_holder_makes_the_second_runner_refuse_naming_it(tmp_path) -> None:
    out = f"file://{tmp_path}/job/align"
    first = lease.Lease.acquire(out, job="job", stage="align", ttl_seconds=0.6, holder="host-a/pid-1")
    first.keep_alive(0.1)
    started = time.monotonic()
    with pytest.raises(lease.LeaseHeldError, match="being written by host-a/pid-1"):
        lease.Lease.acquire(out, job="job", stage="align", ttl_seconds=0.6, holder="host-b/pid-2")
    assert time.monotonic() - started < 1.0  # refused as soon as a renewal is seen
    first.release()
    assert not storage.exists(f"{out}/{lease.LEASE_FILE}")
    lease.Lease.acquire(out, job="job", stage="align", holder="host-b/pid-2").release()


def test_a_crashed_holders_lease_is_taken_over_when_it_expires(tmp_path) -> None:
    out = f"file://{tmp_path}/job/align"
    lease.Lease.acquire(out, job="job", stage="align", ttl_seconds=0.5, holder="crashed")  # never renewed
    taken = lease.Lease.acquire(out, job="job", stage="align", ttl_seconds=0.5, holder="restart")
    assert lease.read(f"{out}/{lease.LEASE_FILE}").holder == "restart"
    taken.release()


def test_only_one_of_many_concurrent_takers_wins(tmp_path) -> None:
    out = f"file://{tmp_path}/job/align"
    won: list[lease.Lease] = []

    def take(name: str) -> None:
        try:
            held = lease.Lease.acquire(out, job="job", stage="align", ttl_seconds=1.0, holder=name)
            held.keep_alive(0.1)
            won.append(held)
        except lease.LeaseHeldError:
            pass

    threads = [threading.Thread(target=take, args=(f"t{i}",)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1
    assert lease.read(f"{out}/{lease.LEASE_FILE}").holder == won[0].record.holder
    won[0].release()


def _expired_lease(out: str) -> None:
    lease.Lease.acquire(out, job="job", stage="align", ttl_seconds=0.05, holder="crashed")  # never renewed
    wait_until(lambda: lease.read(f"{out}/{lease.LEASE_FILE}").expired(), 10, "the crashed holder's lease to expire")


def test_two_takers_of_an_expired_lease_cannot_both_win(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = f"file://{tmp_path}/job/align"
    _expired_lease(out)
    won = race_two_takers(out, monkeypatch, ttl_seconds=1.0, renew_every=0.1)
    try:
        assert [w.record.holder for w in won] == [lease.read(f"{out}/{lease.LEASE_FILE}").holder]
        wait_for_renewals(won[0], 3)  # the winner keeps renewing, no one lost anything
        assert won[0].lost is None and lease.read(f"{out}/{lease.LEASE_FILE}").holder == won[0].record.holder
    finally:
        for w in won:
            w.release()
    assert not storage.exists(f"{out}/{lease.LEASE_FILE}")


def test_a_holder_whose_lease_was_taken_stops_loudly(tmp_path, caplog: pytest.LogCaptureFixture) -> None:
    out = f"file://{tmp_path}/job/align"
    slow = lease.Lease.acquire(out, job="job", stage="align", ttl_seconds=0.2, holder="slow")
    # it missed its renewals (a long pause): the lease expired and was taken over
    wait_until(lambda: lease.read(f"{out}/{lease.LEASE_FILE}").expired(), 10, "the slow holder's lease to expire")
    taker = lease.Lease.acquire(out, job="job", stage="align", ttl_seconds=5, holder="taker")
    lost: list[lease.LeaseLostError] = []
    stopped = threading.Event()
    slow.keep_alive(0.05, on_lost=lambda err: (lost.append(err), stopped.set()))
    assert stopped.wait(5), "the keep-alive never reported the lost lease"
    assert "held by taker" in str(lost[0]) and slow.lost is lost[0]
    assert any(r.levelname == "ERROR" and "lost the lease" in r.getMessage() for r in caplog.records)
    slow.release()  # releases nothing: the lease is the taker's
    assert lease.read(f"{out}/{lease.LEASE_FILE}").holder == "taker"
    taker.release()
