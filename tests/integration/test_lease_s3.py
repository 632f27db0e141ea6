"""The stage lease on a real S3 server (SeaweedFS): two runners racing for a crashed holder's expired
lease cannot both win (the takeover is a PUT with If-Match on the expired object's ETag), the winner
keeps renewing, and the loser of a renewal learns it lost the lease (tests/unit/test_lease.py runs the
same races on local files)."""

from __future__ import annotations

import uuid

import pytest
from lease_race import race_two_takers, wait_for_renewals
from s3_server import SeaweedS3
from vlm_core import storage
from vlm_trainer import lease


def test_on_s3_two_takers_of_an_expired_lease_cannot_both_win_and_a_taken_holder_learns_it(
    s3_server: SeaweedS3, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = f"s3://{s3_server.bucket}/lease-{uuid.uuid4().hex[:8]}/job/align"
    uri = f"{out}/{lease.LEASE_FILE}"
    crashed = lease.Lease.acquire(out, job="job", stage="align", ttl_seconds=0.3, holder="crashed")  # never renewed
    won = race_two_takers(out, monkeypatch, ttl_seconds=3.0, renew_every=0.2, timeout=60)
    try:
        assert [w.record.holder for w in won] == [lease.read(uri).holder]
        wait_for_renewals(won[0], 1)
        assert won[0].lost is None and lease.read(uri).holder == won[0].record.holder  # it renewed, still its own
        with pytest.raises(lease.LeaseLostError, match=f"held by {won[0].record.holder}"):
            crashed.renew()  # the crashed holder, come back: told it lost, writes nothing
    finally:
        for w in won:
            w.release()
    assert not storage.exists(uri)
