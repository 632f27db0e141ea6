"""The operator's in-memory view at scale: the Job overlay that closes the watch's lag (no duplicate
gang), the status overlay that closes it for our own status writes (no GET per reconcile), the
handoff-check backoff (storage asked only when it can have changed), the adaptive resync, and the API
client's rate limit."""

from __future__ import annotations

from typing import Any

from vlm_core.storage import Verification
from vlm_operator.kube import RateLimiter
from vlm_operator.reconcile import JobCache, StatusCache, StorageChecks, next_resync_delay


def job(name: str) -> dict[str, Any]:
    return {"metadata": {"name": name}}


def names(jobs: list[Any]) -> list[str]:
    return sorted(j["metadata"]["name"] for j in jobs)


def test_a_job_just_created_is_seen_before_the_watch_reports_it_and_forgotten_after() -> None:
    cache = JobCache()
    cache.created("ns", "demo", job("demo-align-1"))
    assert names(cache.merge("ns", "demo", [job("demo-align-0")])) == ["demo-align-0", "demo-align-1"]
    # the watch caught up: the index's copy wins, the overlay entry is dropped
    indexed = [job("demo-align-0"), {"metadata": {"name": "demo-align-1"}, "status": {"active": 2}}]
    merged = cache.merge("ns", "demo", indexed)
    assert [j.get("status") for j in merged if j["metadata"]["name"] == "demo-align-1"] == [{"active": 2}]
    assert names(cache.merge("ns", "demo", [])) == []  # nothing of ours is left pending


def test_a_job_just_deleted_is_hidden_until_the_watch_drops_it() -> None:
    cache = JobCache()
    cache.deleted("ns", "demo", "demo-align-0")
    assert names(cache.merge("ns", "demo", [job("demo-align-0"), job("x")])) == ["x"]
    assert names(cache.merge("ns", "demo", [])) == []
    assert names(cache.merge("ns", "demo", [job("demo-align-0")])) == ["demo-align-0"]  # a new one, later
    assert names(cache.merge("ns", "other", [job("demo-align-0")])) == ["demo-align-0"]


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_failed_handoff_check_backs_off_until_the_stage_job_changes() -> None:
    clock, calls = Clock(), []
    answer = {"ok": False}

    def check(uri: str) -> Verification:
        calls.append(uri)
        return Verification(answer["ok"], "ok" if answer["ok"] else "no manifest.json")

    checks = StorageChecks(clock)
    marker = {"m": "job-0@t1"}
    verify = checks.verifier("ns", "demo", lambda uri: marker["m"], check)
    assert not verify("s3://b/demo/align/final").ok and len(calls) == 1
    assert not verify("s3://b/demo/align/final").ok and len(calls) == 1  # within the 1 s backoff: cached
    assert checks.pending("ns", "demo") == 1.0
    clock.now += 1.0
    verify("s3://b/demo/align/final")
    assert len(calls) == 2 and checks.pending("ns", "demo") == 2.0  # doubled
    marker["m"] = "job-1@t2"  # a new Job finished: ask at once
    verify("s3://b/demo/align/final")
    assert len(calls) == 3
    answer["ok"] = True
    clock.now += 1.0
    assert verify("s3://b/demo/align/final").ok and checks.pending("ns", "demo") is None


def test_unreachable_storage_is_a_failed_check_not_a_crash() -> None:
    def check(uri: str) -> Verification:
        raise ConnectionError("connect to 127.0.0.1:9 refused")

    v = StorageChecks(Clock()).verifier("ns", "demo", lambda uri: "", check)("s3://b/x/final")
    assert not v.ok and "storage check failed" in v.reason and "refused" in v.reason


def test_the_resync_timer_adapts_to_the_phase() -> None:
    assert next_resync_delay("Running", 10, None) == 30  # progress of a running stage
    assert next_resync_delay("Running", 10, 4.0) == 4.0  # a pending handoff: at its backoff
    assert next_resync_delay("Queued", 10, None) == 60 and next_resync_delay("Pending", 10, None) == 60
    assert next_resync_delay("Succeeded", 10, None) == float("inf")  # finished: events only (and TTL)
    assert next_resync_delay("Failed", 10, None) == float("inf")
    # many running jobs: each one's progress poll spreads out, so all together stay at a fixed rate
    assert next_resync_delay("Running", 10, None, running_jobs=100) == 30
    assert next_resync_delay("Running", 10, None, running_jobs=5000) == 250  # 5,000 / 20 reads per second


def test_a_body_older_than_our_status_write_reads_as_the_status_we_wrote() -> None:
    cache = StatusCache()
    old = {"phase": "Running", "progress": "0/3"}
    assert cache.current("ns", "demo", "u1", old) == old  # nothing written by us: the body's
    cache.wrote("ns", "demo", "u1", {"phase": "Running", "progress": "1/3", "message": None})
    assert cache.current("ns", "demo", "u1", old) == {"phase": "Running", "progress": "1/3"}  # the watch lags
    assert cache.current("ns", "other", "u1", old) == old
    assert cache.current("ns", "demo", "u2", None) is None  # deleted and created again: a new object
    cache.wrote("ns", "demo", "u1", {"phase": "Running", "progress": "1/3"})
    caught_up = {"phase": "Running", "progress": "1/3"}
    assert cache.current("ns", "demo", "u1", caught_up) == caught_up  # the watch delivered our write ...
    assert cache.current("ns", "demo", "u1", old) == old  # ... and the overlay is gone
    cache.wrote("ns", "demo", "u1", caught_up)
    cache.forget("ns", "demo")
    assert cache.current("ns", "demo", "u1", old) == old


def test_the_rate_limit_allows_a_burst_then_qps_and_serves_a_handoff_first() -> None:
    clock = Clock()

    def sleep(s: float) -> None:
        clock.now += s

    limiter = RateLimiter(qps=10, burst=4, clock=clock, sleep=sleep)  # 2 of the 4 kept for handoffs
    assert [limiter.acquire() for _ in range(2)] == [0.0, 0.0]  # ordinary requests: half the burst
    assert limiter.try_acquire() > 0  # the rest is a handoff's
    assert [limiter.acquire(priority=True) for _ in range(2)] == [0.0, 0.0]
    assert 0.3 - 1e-6 <= limiter.acquire() <= 0.31  # then ordinary ones at qps, above the reserve
    clock.now += 0.1
    limiter._priority_waiting = 1  # a handoff waits for the next token: an ordinary request does not get it
    assert limiter.try_acquire() > 0 and limiter.try_acquire(priority=True) == 0.0
    limiter._priority_waiting = 0
    assert RateLimiter(qps=0, burst=1).acquire() == 0.0  # qps 0: no limit


def test_a_pending_handoff_makes_every_request_for_its_job_urgent() -> None:
    """A reconcile of the job already holding its lock (ordinary lane) inherits the handoff's priority."""
    from vlm_operator import kube

    with kube.working_for(("ns", "demo")):
        assert not kube._urgent()
        with kube.priority(("ns", "demo")):
            assert kube._urgent()
            with kube.priority(("ns", "demo")):
                assert kube._urgent()
            assert kube._urgent()
            with kube.working_for(("ns", "other")):
                assert not kube._urgent()
        assert not kube._urgent()
    assert not kube._urgent()
