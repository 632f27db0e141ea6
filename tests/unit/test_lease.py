"""One writer per stage output: the second runner is refused naming the holder; an expired lease is
taken over; release frees it."""

from __future__ import annotations

import threading
import time

import pytest
from vlm_trainer import lease, storage


def test_second_runner_is_refused_naming_the_holder(tmp_path) -> None:
    out = f"file://{tmp_path}/job/align"
    first = lease.Lease.acquire(out, job="job", stage="align", holder="host-a/pid-1")
    with pytest.raises(lease.LeaseHeldError, match="being written by host-a/pid-1"):
        lease.Lease.acquire(out, job="job", stage="align", holder="host-b/pid-2")
    first.release()
    assert not storage.exists(f"{out}/{lease.LEASE_FILE}")
    lease.Lease.acquire(out, job="job", stage="align", holder="host-b/pid-2").release()


def test_an_expired_lease_is_taken_over(tmp_path) -> None:
    out = f"file://{tmp_path}/job/align"
    lease.Lease.acquire(out, job="job", stage="align", ttl_seconds=0.2, holder="crashed")  # never renewed
    time.sleep(0.3)
    taken = lease.Lease.acquire(out, job="job", stage="align", holder="next")
    assert lease.read(f"{out}/{lease.LEASE_FILE}").holder == "next"
    taken.release()


def test_renewal_keeps_it_and_only_one_of_many_concurrent_takers_wins(tmp_path) -> None:
    out = f"file://{tmp_path}/job/align"
    results: list[str] = []

    def take(name: str) -> None:
        try:
            lease.Lease.acquire(out, job="job", stage="align", holder=name)
            results.append(name)
        except lease.LeaseHeldError:
            pass

    threads = [threading.Thread(target=take, args=(f"t{i}",)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 1
    held = lease.read(f"{out}/{lease.LEASE_FILE}")
    assert held.holder == results[0]
