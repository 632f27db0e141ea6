"""The stage lease on a real S3 server (SeaweedFS): two runners racing for a crashed holder's expired
lease cannot both win (the takeover is a PUT with If-Match on the expired object's ETag), the winner
keeps renewing, and the loser of a renewal learns it lost the lease (tests/unit/test_lease.py runs the
same races on local files)."""

from __future__ import annotations

import contextlib
import threading
import time
import uuid

import pytest
from s3_server import SeaweedS3
from vlm_core import storage
from vlm_trainer import lease


def test_on_s3_two_takers_of_an_expired_lease_cannot_both_win_and_a_taken_holder_learns_it(
    s3_server: SeaweedS3, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = f"s3://{s3_server.bucket}/lease-{uuid.uuid4().hex[:8]}/job/align"
    uri = f"{out}/{lease.LEASE_FILE}"
    crashed = lease.Lease.acquire(out, job="job", stage="align", ttl_seconds=0.3, holder="crashed")  # never renewed
    barrier = threading.Barrier(2, timeout=10)
    decided: set[int] = set()
    real_expired = lease.LeaseRecord.expired

    def expired(self: lease.LeaseRecord, now: float | None = None) -> bool:  # both decide before either acts
        result = real_expired(self, now)
        if result and self.holder == "crashed" and threading.get_ident() not in decided:
            decided.add(threading.get_ident())
            with contextlib.suppress(threading.BrokenBarrierError):
                barrier.wait()
        return result

    monkeypatch.setattr(lease.LeaseRecord, "expired", expired)
    won: list[lease.Lease] = []

    def take(name: str) -> None:
        with contextlib.suppress(lease.LeaseHeldError):
            held = lease.Lease.acquire(out, job="job", stage="align", ttl_seconds=3.0, holder=name)
            won.append(held)
            held.keep_alive(0.2, on_lost=lambda err: None)

    threads = [threading.Thread(target=take, args=(f"taker-{i}",)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    try:
        assert len(decided) == 2
        assert [w.record.holder for w in won] == [lease.read(uri).holder]
        renewed = won[0].record.expires_at
        deadline = time.monotonic() + 20
        while won[0].record.expires_at == renewed and time.monotonic() < deadline:
            time.sleep(0.05)
        assert won[0].lost is None and lease.read(uri).holder == won[0].record.holder  # it renewed, still its own
        with pytest.raises(lease.LeaseLostError, match=f"held by {won[0].record.holder}"):
            crashed.renew()  # the crashed holder, come back: told it lost, writes nothing
    finally:
        for w in won:
            w.release()
    assert not storage.exists(uri)
