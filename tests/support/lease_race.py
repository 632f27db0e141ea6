"""The lease takeover race, shared by tests/unit/test_lease.py (local files) and
tests/integration/test_lease_s3.py (SeaweedFS S3): two runners find the same expired lease and BOTH
decide to take it over before either acts — the interleaving that, with delete-then-create, let the
second taker delete the first one's fresh lease."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable

import pytest
from vlm_trainer import lease


def wait_until(predicate: Callable[[], bool], timeout: float, message: str) -> None:
    """Poll `predicate` until true; fail with `message` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {message}")
        time.sleep(0.01)


def race_two_takers(
    out: str, monkeypatch: pytest.MonkeyPatch, *, ttl_seconds: float, renew_every: float, timeout: float = 30
) -> list[lease.Lease]:
    """Race two takers over the expired lease of holder "crashed" under `out` (a barrier on
    `LeaseRecord.expired` makes both decide first); returns the winners, renewing every `renew_every`."""
    barrier = threading.Barrier(2, timeout=timeout / 3)
    decided: set[int] = set()
    real_expired = lease.LeaseRecord.expired

    def expired(self: lease.LeaseRecord, now: float | None = None) -> bool:
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
            held = lease.Lease.acquire(out, job="job", stage="align", ttl_seconds=ttl_seconds, holder=name)
            won.append(held)
            held.keep_alive(renew_every, on_lost=lambda err: None)

    threads = [threading.Thread(target=take, args=(f"taker-{i}",)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=timeout)
    assert len(decided) == 2, "both takers saw the expired lease"
    return won


def wait_for_renewals(held: lease.Lease, count: int, timeout: float = 20) -> None:
    """Wait until `held` has renewed its lease `count` more times."""
    seen = [held.record.expires_at]

    def renewed() -> bool:
        if held.record.expires_at != seen[-1]:
            seen.append(held.record.expires_at)
        return len(seen) > count

    wait_until(renewed, timeout, f"{count} renewals of {held.record.holder}'s lease")
