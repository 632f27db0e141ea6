"""The local backend (the embedded default): run a VLMTrainingJob's stages on this machine.

Each stage is a torchrun job launched through TorchX's `local_cwd` scheduler and its `dist.torchrun`
component, exactly the command a pod runs on Kubernetes. The state lives in storage, not in this
process: a stage is done when its `final/` is committed with the fingerprint of the job file's settings and
inputs (`vlm_core.fingerprint`), so re-running a finished job does nothing, re-running an interrupted one starts
the interrupted stage again, where the trainer resumes from its own last committed checkpoint, and re-running an
edited one is refused naming what changed until the user reruns from a stage (`rerun_from`: those outputs are
kept aside). The same planner decides for both backends.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from vlm_core import contract, fingerprint, reruns, storage
from vlm_core.redact import redact
from vlm_core.spec import TrainerConfig, VLMTrainingJob

from vlm_operator import admission, planner, preflight

LOG_PREFIX_SEP = "]:"


def observe_local(job: VLMTrainingJob, restarts: dict[int, int] | None = None,
                  failed: dict[int, str] | None = None,
                  options: storage.Options | None = None,
                  fatal: Mapping[int, str] | None = None) -> list[planner.StageObservation]:
    """Each stage's observation, recomputed from storage and this run's launches: `restarts` holds the
    planner's restart count of each stage's latest launch (`StartStage.restarts`, as a Job's annotation
    does on Kubernetes), `failed` why that launch failed, `fatal` the stages whose failure no restart
    can fix, with the reason `contract.FAILURES` gives it."""
    restarts = restarts or {}
    failed = failed or {}
    fatal = fatal or {}
    out = []
    for i in range(len(job.spec.stages)):
        v = storage.verify_committed(planner.final_uri(job, i), options=options)
        if v.ok:
            out.append(planner.StageObservation("Succeeded", restarts.get(i, 0), True,
                                                fingerprint=fingerprint.recorded(v.manifest)))
        elif i in failed:
            out.append(planner.StageObservation("Failed", restarts.get(i, 0), False, failed[i],
                                                retryable=i not in fatal, failure=fatal.get(i, "")))
        else:
            out.append(planner.StageObservation("Pending", restarts.get(i, 0), False, v.reason))
    return out


def torchrun_app(config_uri: str, cfg: TrainerConfig, env: dict[str, str] | None = None):
    """The TorchX AppDef of one stage: `torchrun --nproc_per_node W -m <contract.TRAINER_MODULE> --config <uri>`.

    On one machine every node's processes run side by side, so the world size (nodes x procsPerNode) and
    hence the global batch and the data split match the cluster run.
    """
    from torchx.components import dist

    world = cfg.stage.world_size
    threads = max(1, (os.cpu_count() or 1) // world)
    run_env = {"OMP_NUM_THREADS": str(threads), contract.UNBUFFERED_ENV: "1", contract.CONFIG_ENV: config_uri}
    run_env.update(env or {})
    app = dist.torchrun(
        "--config", config_uri,
        m=contract.TRAINER_MODULE,
        j=f"1x{world}",
        name=f"{cfg.job}-{cfg.stage.name}",
        env=run_env,
        cpu=os.cpu_count() or 1,
        gpu=cfg.stage.resources.gpus_per_node,
    )
    # The component runs `bash -c "torchrun ..."`: exec torchrun through the orphan guard, so that it
    # stops when this process dies (TorchX starts it in a session of its own).
    role = app.roles[0]
    if role.entrypoint == "bash" and len(role.args) == 2 and role.args[0] == "-c":
        role.args[1] = f"exec {shlex.quote(sys.executable)} -m vlm_operator.orphan_guard {role.args[1]}"
    return app


@dataclass
class StageResult:
    name: str
    succeeded: bool
    wall_seconds: float
    attempts: int
    message: str = ""


@dataclass
class RunResult:
    succeeded: bool
    stages: list[StageResult] = field(default_factory=list)
    message: str = ""
    changed: planner.SpecChanged | None = None  # set when a committed stage differs from the job file
    set_aside: list[tuple[str, str]] = field(default_factory=list)  # (from, to) of outputs a rerun moved aside


def stage_fingerprint(job: VLMTrainingJob, options: storage.Options | None = None) -> Callable[[int], fingerprint.Fingerprint]:
    """The planner's `fingerprint(index)`: stage `index`'s fingerprint with its inputs as they are in storage."""
    return lambda i: fingerprint.compute(planner.resolve_stage(job, i), options)


def parse_log_line(line: str) -> tuple[int | None, dict | None]:
    """torchrun prefixes lines with `[rank]:`; the rest may be a trainer event (`contract.parse_event`)."""
    rank = None
    body = line.rstrip("\n")
    if body.startswith("[") and LOG_PREFIX_SEP in body[:12]:
        head, body = body.split(LOG_PREFIX_SEP, 1)
        try:
            rank = int(head.strip("[").split(",")[0])
        except ValueError:
            rank = None
    return rank, contract.parse_event(body)


TrainerError = contract.TrainerError  # the first failing rank's exception (the contract's record format)


def trainer_error(error_file: str) -> TrainerError | None:
    """The failing rank's exception from torchelastic's error file, or None if there is none.

    The trainer's main is wrapped in torchelastic's `record` (with its rank added); torchrun copies the
    first failure's record to the file named by `contract.ERROR_FILE_ENV` in its own environment. A pod's
    termination message holds the same record (`contract.error_record`)."""
    try:
        with open(error_file) as f:
            return contract.parse_error_record(f.read())
    except OSError:
        return None


class Interrupted(Exception):
    """The run was stopped by SIGINT/SIGTERM; the stage's processes are gone, its checkpoints kept."""

    def __init__(self, signum: int, stage: str | None, step: int | None):
        self.signum, self.stage, self.step = signum, stage, step
        where = f" during stage {stage!r}" + (f" after step {step}" if step is not None else "") if stage else ""
        super().__init__(f"interrupted by {signal.Signals(signum).name}{where}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # 130 for Ctrl-C, 143 for SIGTERM: the shell's convention


class LocalRunner:
    """Runs one job to completion (or failure) with TorchX's local scheduler."""

    def __init__(self, job: VLMTrainingJob, *, log_dir: str | None = None,
                 on_line: Callable[[str, str, int | None, dict | None], None] | None = None,
                 env: dict[str, str] | None = None, rerun_from: str | None = None):
        self.job = job
        # --rerun-from: checked now (a name that is not a stage fails before anything moves)
        self.rerun = reruns.covered(job, rerun_from, field="--rerun-from") if rerun_from is not None else []
        self.keep_logs = log_dir is not None  # a folder of our own is removed when the run ends
        self.log_dir = log_dir or tempfile.mkdtemp(prefix=f"vlmctl-{job.name}-")
        self.on_line = on_line  # (stage name, raw line, rank, event or None)
        self.env = dict(env or {})
        # This process reads the job's storage with the job's options; the trainers get the endpoint in
        # their own environment (never this process'), credentials from the caller's environment.
        self.storage_options = job.spec.storage.fsspec_options()
        if job.spec.storage.endpoint_url:
            self.env[contract.ENDPOINT_URL_ENV] = job.spec.storage.endpoint_url
        # torchrun must be on PATH for the local scheduler; prefer this interpreter's environment.
        bindir = os.path.dirname(sys.executable)
        if shutil.which("torchrun", path=bindir):
            self.env["PATH"] = bindir + os.pathsep + os.environ.get("PATH", "")
        self.restarts: dict[int, int] = {}  # the planner's restart count of each stage's latest launch
        self.errors: dict[int, str] = {}  # why a stage's latest launch failed
        self.fatal: dict[int, str] = {}  # stages whose last failure no restart can fix: its reason
        self.last_error: TrainerError | None = None  # the latest failed launch's trainer error
        self.last_step: dict[str, int] = {}
        self.current: str | None = None

    def _run_stage(self, cfg: TrainerConfig) -> tuple[bool, str, bool]:
        """Run one stage's torchrun to its end: (succeeded, why not, worth a restart)."""
        from torchx.runner import get_runner
        from torchx.schedulers.local_scheduler import SignalException

        config_uri = storage.join(cfg.output, contract.CONFIG_FILE)
        storage.write_json(config_uri, cfg.dump(), options=self.storage_options)
        error_file = os.path.join(self.log_dir, f"{cfg.stage.name}-error.json")
        if os.path.exists(error_file):
            os.remove(error_file)
        app = torchrun_app(config_uri, cfg, {**self.env, contract.ERROR_FILE_ENV: error_file})
        runner = get_runner()
        self.current = cfg.stage.name
        try:
            handle = runner.run(app, scheduler="local_cwd", cfg={"log_dir": self.log_dir})
            tail: list[str] = []
            for line in runner.log_lines(handle, app.roles[0].name, k=0, should_tail=True):
                rank, event = parse_log_line(line)
                tail = (tail + [line.rstrip()])[-20:]
                if event and event[contract.EVENT_KEY] == contract.EVENT_STEP and isinstance(
                    event.get(contract.KEY_STEP), int
                ):
                    self.last_step[cfg.stage.name] = event[contract.KEY_STEP]
                if self.on_line:
                    self.on_line(cfg.stage.name, line, rank, event)
            status = runner.wait(handle, wait_interval=0.5)
        except SignalException as sig:  # TorchX turns SIGINT/SIGTERM into this; close() stops torchrun
            raise Interrupted(sig.sigval, cfg.stage.name, self.last_step.get(cfg.stage.name)) from None
        except KeyboardInterrupt:
            raise Interrupted(signal.SIGINT, cfg.stage.name, self.last_step.get(cfg.stage.name)) from None
        finally:
            runner.close()
        ok = status is not None and status.state.name == "SUCCEEDED"
        if ok:
            return True, "", True
        state = status.state.name if status else "UNKNOWN"
        error = self.last_error = trainer_error(error_file)
        if error is not None:
            return False, f"torchrun ended {state}; trainer error ({error})", error.retryable
        return False, redact(f"torchrun ended {state}; last lines:\n" + "\n".join(tail)), True

    def run(self) -> RunResult:
        try:
            return self._run()
        finally:
            if not self.keep_logs:
                shutil.rmtree(self.log_dir, ignore_errors=True)

    def _run(self) -> RunResult:
        from torchx.schedulers.local_scheduler import SignalException

        try:
            return self._plan_and_run()
        except SignalException as sig:  # TorchX's handler outside a stage's run (between stages, preflight)
            raise Interrupted(sig.sigval, self.current, self.last_step.get(self.current or "")) from None
        except KeyboardInterrupt:
            raise Interrupted(signal.SIGINT, self.current, self.last_step.get(self.current or "")) from None

    def _plan_and_run(self) -> RunResult:
        result = RunResult(False)
        if self.rerun:  # the outputs of the stages rerun are kept aside, never deleted
            result.set_aside = reruns.set_aside(self.job, self.rerun, reruns.stamp(), options=self.storage_options)
        attempts: dict[int, int] = {}
        started: dict[int, float] = {}
        while True:
            observed = observe_local(self.job, self.restarts, self.errors, self.storage_options, self.fatal)
            action = planner.plan(
                self.job,
                observed,
                admit=admission.checker(self.job, options=self.storage_options),
                preflight=lambda i: preflight.check_stage(self.job, i, self.storage_options),
                fingerprint=stage_fingerprint(self.job, self.storage_options),
            )
            if isinstance(action, planner.SpecChanged):  # nothing reruns by itself
                result.changed, result.message = action, action.message(self.job)
                return result
            if isinstance(action, planner.Done):
                result.succeeded = True
                return result
            if isinstance(action, planner.Fail):  # the planner alone decides: restart budget, preflight
                i = action.index
                result.stages.append(StageResult(self.job.spec.stages[i].name, False,
                                                 time.monotonic() - started.get(i, time.monotonic()),
                                                 attempts.get(i, 0), self.errors.get(i) or action.reason))
                result.message = action.reason
                return result
            if isinstance(action, planner.Suspend):
                result.message = "the job is suspended (spec.suspend); nothing to run"
                return result
            if isinstance(action, planner.Wait):
                result.message = action.reason  # locally nothing else runs: waiting would never end
                return result
            i = action.index
            started.setdefault(i, time.monotonic())
            self.restarts[i] = action.restarts
            self.errors.pop(i, None)
            self.last_error = None
            attempts[i] = attempts.get(i, 0) + 1
            ok, msg, retryable = self._run_stage(action.config)
            if ok and not storage.verify_committed(planner.final_uri(self.job, i), options=self.storage_options).ok:
                ok, msg = False, f"torchrun succeeded but {planner.final_uri(self.job, i)} is not committed"
            if ok:
                result.stages.append(StageResult(action.config.stage.name, True,
                                                 time.monotonic() - started[i], attempts[i]))
            else:
                self.errors[i] = msg
                if not retryable:  # the contract's table (contract.FAILURES) says no restart can fix it
                    self.fatal[i] = self.last_error.failure.reason if self.last_error else planner.FAIL_CONFIGURATION
