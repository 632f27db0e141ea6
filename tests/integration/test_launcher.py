"""The pod's entry point around torchrun (`python -m vlm_trainer.launch -- torchrun ...`), with real torchrun
and 2 processes: torchrun alone exits 1 whatever failed; the launcher exits with the code the contract's
table gives the first failing rank's exception and writes that rank's record to the termination file."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from vlm_core import contract

WORKER = textwrap.dedent('''
    import os, sys
    from torch.distributed.elastic.multiprocessing.errors import record
    from vlm_trainer.__main__ import _ranked_error_handler

    def main():
        if os.environ["RANK"] == "1":
            kind = sys.argv[1]
            if kind == "exit":
                os._exit(9)  # a crash: no record
            raise type(kind, (RuntimeError,), {})("3 of 100 samples bad > data.maxBadSampleShare 0.01; "
                                                   "AWS_SECRET_ACCESS_KEY=hunter2")
    record(main, error_handler=_ranked_error_handler())()
''')


def launch(tmp_path: Path, kind: str) -> tuple[subprocess.CompletedProcess, str]:
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    termination = tmp_path / f"termination-{kind}"
    termination.write_text("")
    env = {**os.environ, contract.TERMINATION_LOG_ENV: str(termination), "OMP_NUM_THREADS": "1"}
    env.pop(contract.ERROR_FILE_ENV, None)
    proc = subprocess.run(
        [sys.executable, "-m", contract.LAUNCHER_MODULE, "--", sys.executable, "-m", "torch.distributed.run",
         "--standalone", "--nproc_per_node=2", "--max_restarts=0", str(worker), kind],
        env=env, capture_output=True, text=True, timeout=120,
    )
    return proc, termination.read_text()


@pytest.mark.parametrize("kind, code", [("BadDataError", 65), ("ConnectionResetError", 75)])
def test_the_first_failing_ranks_exception_becomes_the_exit_code_and_termination_message(
    tmp_path: Path, kind: str, code: int
) -> None:
    proc, message = launch(tmp_path, kind)
    assert proc.returncode == code, proc.stderr[-3000:]
    error = contract.parse_error_record(message)
    assert error is not None and error.rank == 1 and error.type_name == kind
    assert error.failure.exit_code == code
    assert "3 of 100 samples bad" in error.message and "hunter2" not in message
    assert "py_callstack" not in message and len(message.encode()) <= contract.TERMINATION_MESSAGE_MAX
    line = next(x for x in proc.stderr.splitlines() if x.startswith("vlm launcher: "))  # its one line, redacted
    assert line.startswith(f"vlm launcher: rank 1: {kind}: 3 of 100") and "hunter2" not in line
    assert line.endswith(f"-> exit code {code} ({error.failure.reason}: "
                         + ("a restart may succeed)" if error.retryable else "not retried)"))


def test_a_crash_without_a_record_keeps_torchruns_exit_code(tmp_path: Path) -> None:
    proc, message = launch(tmp_path, "exit")
    assert proc.returncode == 1, proc.stderr[-3000:]  # torchrun's own code: not in the table, a restart may help
    assert message == "" and contract.failure_of_exit_code(proc.returncode) is None
