"""One writer per stage output: a live holder makes the second runner refuse, naming it; a crashed
holder's lease (no longer renewed) is taken over once it expires; release frees it."""

from __future__ import annotations

import threading
import time

import pytest
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
