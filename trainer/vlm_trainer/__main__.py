"""Entry point of one trainer process: `python -m vlm_trainer --config <path-or-URI>` (plain or under torchrun).

The config is a resolved `TrainerConfig` JSON (the planner writes it; on Kubernetes a ConfigMap mounts
it). Without `--config`, `$VLM_TRAINER_CONFIG` and then the mounted file are tried. Exit code 0 means
the stage's final/ is committed (now or by an earlier run).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from vlm_core import contract, storage
from vlm_core.redact import redact_logging
from vlm_core.spec import TrainerConfig

from vlm_trainer.progress import emit


def config_uri(cli_value: str | None) -> str:
    if cli_value:
        return cli_value
    if os.environ.get(contract.CONFIG_ENV):
        return os.environ[contract.CONFIG_ENV]
    mounted = os.path.join(contract.CONFIG_MOUNT_DIR, contract.CONFIG_FILE)
    if os.path.exists(mounted):
        return mounted
    raise SystemExit(
        f"no trainer config: pass --config <path-or-URI>, set ${contract.CONFIG_ENV}, or mount {mounted}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vlm_trainer", description=__doc__.splitlines()[0])
    parser.add_argument("--config", help=f"path or storage URI of the TrainerConfig JSON (or ${contract.CONFIG_ENV})")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    redact_logging()

    config = TrainerConfig.load(storage.read_json(config_uri(args.config)))
    final = contract.stage_final(config.storage.uri, config.job, config.stage.name)
    if storage.verify_committed(final).ok:
        # Done by an earlier run: say so without loading torch (re-running a finished job does nothing).
        # This is the one "stage already done" check; the trainer itself never repeats it.
        if os.environ.get("RANK", "0") == "0":
            emit(contract.EVENT_SKIP, stage=config.stage.name, reason=f"{final} is already committed")
        return 0

    # Imported after the config parses, so a bad config fails fast without loading torch/transformers.
    # torchelastic's `record` writes a failing rank's exception to $TORCHELASTIC_ERROR_FILE (structured),
    # which torchrun hands up to whoever launched it.
    from torch.distributed.elastic.multiprocessing.errors import record

    _stop_with_parent()
    return record(_train, error_handler=_ranked_error_handler())(config)


def _stop_with_parent() -> None:
    """Under torchrun, a rank whose agent dies (even by SIGKILL) gets SIGTERM instead of living on.

    SIGTERM keeps its default action on purpose (set here, in case a launcher left it ignored): the rank
    ends at once, wherever it is. A Python handler would only run when the main thread is back in the
    interpreter, i.e. not while it waits inside a gloo/NCCL collective for a peer that is already gone,
    and torchrun would wait out its shutdown timeout. Dying mid-checkpoint is safe: `storage.commit_dir`
    writes manifest.json last, a folder without it is never loaded (the resume passes over it and says
    so), and older checkpoints are only pruned after the new one is committed (the save's local temporary
    folder is left behind, as with any kill)."""
    if "TORCHELASTIC_RUN_ID" not in os.environ and "LOCAL_RANK" not in os.environ:
        return
    import ctypes
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM), 0, 0, 0)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass


def _ranked_error_handler():  # noqa: ANN202 (torch's ErrorHandler, imported lazily)
    """torchelastic's error handler, with this process' rank added to the record it writes."""
    from torch.distributed.elastic.multiprocessing.errors import ErrorHandler

    class RankedErrorHandler(ErrorHandler):
        def record_exception(self, e: BaseException) -> None:
            super().record_exception(e)
            path = self._get_error_file_path()
            if not path or not os.path.exists(path):
                return
            with open(path) as f:
                doc = json.load(f)
            doc.setdefault("message", {}).setdefault("extraInfo", {})["rank"] = os.environ.get("RANK", "0")
            with open(path, "w") as f:
                json.dump(doc, f)

    return RankedErrorHandler()


def _train(config: TrainerConfig) -> int:
    import transformers

    from vlm_trainer.parallel import dist_env, init_distributed, set_threads, shutdown_distributed
    from vlm_trainer.stages import run_stage

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    env = dist_env()
    set_threads(env)
    init_distributed(env)
    try:
        run_stage(config, env)
    finally:
        shutdown_distributed()
    return 0


def exit_now(code: int) -> None:
    """End the process without the interpreter's teardown: after torch and transformers are imported,
    tearing the modules down took 4-6 s per stage here (measured, bench/startup_bench.py), seconds every
    stage pays between its last write and the next stage's launch. Everything the stage writes is
    written and closed before this (final/, eval.json, the lease); output streams are flushed here."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    exit_now(main())
