"""A stage pod's entry point: `python -m vlm_trainer.launch -- torchrun <args>`.

torchrun exits 1 whatever made a worker fail (a rank exiting with code N, or raising, still ends torchrun
with 1), so a Job's `podFailurePolicy` could not tell a deterministic failure from a transient one. This
launcher runs torchrun with torchelastic's error file in a folder of its own and, when torchrun fails,
reads the first failing rank's record (the trainer's `record`-ed main writes it, with its rank), then

- writes that record, redacted and without its traceback, to the container's termination message
  (`contract.TERMINATION_LOG`, or `$VLM_TERMINATION_LOG`): the operator reads it from the pod's status;
- exits with the code `contract.FAILURES` gives the exception type (a deterministic failure's own code,
  else the transient code), or torchrun's own exit code when no rank left a record (a kill, a crash).

Torch-free: it only starts torchrun and waits. SIGTERM/SIGINT are passed on to torchrun (in a pod this
process is PID 1, which gets no default signal handling).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from types import FrameType

from vlm_core import contract


def exit_code_for(error: contract.TrainerError | None, torchrun_code: int) -> int:
    """The pod's exit code: the table's code for the first failing rank's exception, torchrun's own code
    when no rank left a record."""
    if torchrun_code == 0:
        return 0
    return error.failure.exit_code if error is not None else torchrun_code


def read_record(path: str) -> contract.TrainerError | None:
    try:
        with open(path) as f:
            return contract.parse_error_record(f.read())
    except OSError:
        return None


def write_termination_message(error: contract.TrainerError, code: int, path: str) -> None:
    """Best effort: a missing or read-only termination file must not hide the exit code."""
    try:
        with open(path, "w") as f:
            f.write(contract.error_record(error, code))
    except OSError as err:
        print(f"vlm launcher: could not write the termination message to {path}: {err}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["--"]:
        args = args[1:]
    if not args:
        print(f"usage: python -m {contract.LAUNCHER_MODULE} -- torchrun <args>", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="vlm-launch-") as folder:
        error_file = os.path.join(folder, "error.json")
        proc = subprocess.Popen(args, env={**os.environ, contract.ERROR_FILE_ENV: error_file})

        def forward(signum: int, _frame: FrameType | None) -> None:
            if proc.poll() is None:
                proc.send_signal(signum)

        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, forward)
        returncode = proc.wait()
        torchrun_code = 128 - returncode if returncode < 0 else returncode  # killed by a signal: 128 + n
        error = read_record(error_file) if torchrun_code else None
    code = exit_code_for(error, torchrun_code)
    if error is not None:
        failure = error.failure
        write_termination_message(error, code, os.environ.get(contract.TERMINATION_LOG_ENV, contract.TERMINATION_LOG))
        retried = "a restart may succeed" if failure.retryable else "not retried"
        print(f"vlm launcher: {error} -> exit code {code} ({failure.reason}: {retried})", file=sys.stderr, flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
