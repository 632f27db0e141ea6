"""Fail safe and say why, with `vlmctl run` for real (TorchX + torchrun, 2 ranks on CPU): configuration
errors fail fast without retries, the trainer's own error reaches the screen as plain text, signals stop
a run cleanly (and a re-run resumes), a killed vlmctl leaves no process behind, nothing is left in /tmp."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from tiny_parts import build_parts, job_file, write_imageless_shard
from vlm_core import storage

VLMCTL = [sys.executable, "-m", "vlm_operator.cli"]
ENV = {**os.environ, "VLM_METRICS_PORT": "off", "COLUMNS": "200"}
# How long the stage's processes may take to go after vlmctl stops or is SIGKILLed: torchrun stops its workers and
# exits in about a second (vlm_operator.orphan_guard sends it one SIGTERM); a loaded machine may take a few.
# The bound is generous on purpose: the test waits for the condition (no process left), not for a time;
# an agent that never exits (torchrun hit by repeated SIGTERMs, issue 19) still fails it.
PROCESSES_GONE_SECONDS = 60


@pytest.fixture(scope="module")
def parts(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return build_parts(tmp_path_factory.mktemp("parts"))


def run(job: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*VLMCTL, "run", job], capture_output=True, text=True, timeout=timeout, env=ENV)


def trainers_of(storage_dir: Path) -> list[psutil.Process]:
    """Live torchrun/trainer processes working on this test's storage folder."""
    out = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if not (str(storage_dir) in cmd and ("vlm_trainer" in cmd or "torch.distributed.run" in cmd or "torchrun" in cmd)):
            continue
        try:
            if p.status() == psutil.STATUS_ZOMBIE:  # exited; only waiting for init to reap it
                continue
        except psutil.NoSuchProcess:
            continue
        out.append(p)
    return out


def wait_for_step(proc: subprocess.Popen, storage_dir: Path, step: int, timeout: float = 180) -> None:
    progress = storage_dir / "job" / "align" / "progress.json"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        try:
            if storage.read_json(str(progress)).get("step", 0) >= step:
                return
        except (OSError, ValueError):
            pass
        time.sleep(0.3)
    raise TimeoutError(f"no step {step} within {timeout} s")


def test_a_missing_model_fails_before_any_process_starts_without_retries(tmp_path: Path, parts: dict) -> None:
    broken = {**parts, "vision": str(tmp_path / "no-such-vision")}
    job = job_file(tmp_path / "job.yaml", "job", broken, tmp_path / "store", max_restarts=3)
    out = run(job)
    assert out.returncode == 1
    assert "configuration error (not retried)" in out.stdout
    assert f"spec.model.visionEncoder: no Hugging Face checkpoint at {tmp_path / 'no-such-vision'}" in out.stdout
    # Preflight refused it: no attempt was made (no torchrun, no torch import, no retry), whatever the
    # machine's speed; the summary table's last column counts the attempts.
    row = next((line for line in out.stdout.splitlines() if " align " in line and " failed " in line), "")
    assert re.findall(r"\d+", row)[-1:] == ["0"], out.stdout
    assert not (tmp_path / "store").exists() or not any((tmp_path / "store").rglob("manifest.json"))


def test_a_bad_sample_ends_with_the_trainers_own_error_as_plain_text(tmp_path: Path, parts: dict) -> None:
    """A shard that is a valid tar (preflight passes) but holds a sample with no image: the rank's own
    exception line and its rank are on screen, never read as console markup."""
    bad = write_imageless_shard(tmp_path / "bad.tar", "[/__w/pytorch/gloo/pair.cc:553] caption {i}")
    job = job_file(tmp_path / "job.yaml", "job", {**parts, "shards": [bad]}, tmp_path / "store")
    out = run(job)
    assert out.returncode == 1, out.stdout + out.stderr
    assert "MarkupError" not in out.stdout + out.stderr and "Traceback" not in out.stdout
    assert "trainer error (rank " in out.stdout
    assert not (tmp_path / "store" / "job" / "align" / "final" / "manifest.json").exists()


def test_ctrl_c_stops_cleanly_with_a_resume_hint_and_the_rerun_resumes(tmp_path: Path, parts: dict) -> None:
    store = tmp_path / "store"
    job = job_file(tmp_path / "job.yaml", "job", parts, store, steps=100_000, every=2)
    # vlmctl's temporary folders go to a TMPDIR of this test's own, so another run on the machine cannot
    # add folders that look like litter
    private_tmp = tmp_path / "tmp"
    private_tmp.mkdir()
    proc = subprocess.Popen([*VLMCTL, "run", job], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**ENV, "TMPDIR": str(private_tmp)})
    wait_for_step(proc, store, 3)
    assert list(private_tmp.glob("vlmctl-job-*")), "the run keeps its logs in the private TMPDIR"
    proc.send_signal(signal.SIGINT)
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130, output
    assert "interrupted by SIGINT during stage 'align'" in output
    assert f"vlmctl run {job}` again to resume" in output
    assert "Traceback" not in output and "SignalException" not in output
    deadline = time.monotonic() + PROCESSES_GONE_SECONDS
    while trainers_of(store) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not trainers_of(store)
    assert not list(private_tmp.glob("vlmctl-job-*"))  # no litter
    committed = storage.latest_checkpoint(f"file://{store}/job/align")
    assert committed is not None and committed[0] >= 2

    # the re-run resumes from that checkpoint (stopped again once it is past it), and says which
    # checkpoint folders it passed over and why, in the normal output
    (store / "job" / "align" / "checkpoint-999").mkdir()  # an interrupted save: no manifest
    (store / "job" / "align" / "progress.json").unlink()  # wait for the new run's own progress
    proc = subprocess.Popen([*VLMCTL, "run", job], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=ENV)
    first_progress = None
    deadline = time.monotonic() + 180
    while first_progress is None and time.monotonic() < deadline:
        try:
            first_progress = storage.read_json(str(store / "job" / "align" / "progress.json"))["step"]
        except (OSError, ValueError, KeyError):
            time.sleep(0.2)
    # the re-run's first reported step continues after the checkpoint (not from step 1)
    assert first_progress is not None and first_progress > committed[0]
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode == 143, output
    assert "Traceback" not in output


def test_sigkill_of_vlmctl_leaves_no_trainer_behind(tmp_path: Path, parts: dict) -> None:
    store = tmp_path / "store"
    job = job_file(tmp_path / "job.yaml", "job", parts, store, steps=100_000, every=50)
    proc = subprocess.Popen([*VLMCTL, "run", job], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
    wait_for_step(proc, store, 2)
    assert trainers_of(store), "the stage's processes are running"
    proc.kill()
    killed = time.monotonic()
    proc.wait(10)
    seen = []
    while (alive := trainers_of(store)) and time.monotonic() < killed + PROCESSES_GONE_SECONDS:
        seen.append((round(time.monotonic() - killed, 1), [(p.pid, p.name()) for p in alive]))
        time.sleep(0.2)
    gone_after = time.monotonic() - killed
    left = trainers_of(store)
    for p in left:  # do not leak them into the rest of the suite
        p.kill()
    assert not left, f"{len(left)} left, {gone_after:.1f} s after the kill: {seen[-3:]}"


def test_the_stage_lease_is_exclusive_on_a_real_s3_server(s3_server) -> None:
    """S3's conditional create (If-None-Match: *), as SeaweedFS enforces it: one holder at a time."""
    from vlm_trainer import lease

    out = f"s3://{s3_server.bucket}/lease-test-{time.time_ns()}/job/align"
    first = lease.Lease.acquire(out, job="job", stage="align", ttl_seconds=20, holder="runner-a")
    first.keep_alive(1.0)
    with pytest.raises(lease.LeaseHeldError, match="being written by runner-a"):
        lease.Lease.acquire(out, job="job", stage="align", ttl_seconds=20, holder="runner-b")
    first.release()
    lease.Lease.acquire(out, job="job", stage="align", holder="runner-b").release()


def test_two_concurrent_runs_of_one_job_the_second_refuses(tmp_path: Path, parts: dict) -> None:
    store = tmp_path / "store"
    job = job_file(tmp_path / "job.yaml", "job", parts, store, steps=100_000, every=50)
    first = subprocess.Popen([*VLMCTL, "run", job], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
    try:
        wait_for_step(first, store, 1)
        second = run(job)
        assert second.returncode == 1, second.stdout
        text = " ".join(second.stdout.split())
        assert "LeaseHeldError" in text and "is being written by" in text and "not retried" in text
        assert first.poll() is None  # the first run goes on untouched
    finally:
        first.send_signal(signal.SIGINT)
        first.communicate(timeout=60)


def test_a_non_finite_loss_never_commits_a_final(tmp_path: Path, parts: dict) -> None:
    """A vision encoder whose weights hold Inf (a corrupted checkpoint): the loss is NaN at step 1, the
    stage stops naming the step, is not retried, and neither a checkpoint nor final/ is published."""
    import shutil

    from safetensors.torch import load_file, save_file

    vision = tmp_path / "vision"
    shutil.copytree(parts["vision"], vision)
    weights = next(vision.glob("*.safetensors"))
    state = load_file(str(weights))
    name = next(k for k in state if k.endswith("weight") and state[k].dim() > 1)
    state[name][0, 0] = float("inf")
    save_file(state, str(weights), metadata={"format": "pt"})
    store = tmp_path / "store"
    out = run(job_file(tmp_path / "job.yaml", "job", {**parts, "vision": str(vision)}, store, max_restarts=2))
    text = " ".join(out.stdout.split())
    assert out.returncode == 1, out.stdout
    assert "NonFiniteError: step 1" in text and "not retried" in text
    assert not list(store.rglob("manifest.json"))  # no checkpoint, no final/
