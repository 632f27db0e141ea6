"""`vlmctl`: validate, estimate, run locally, render Kubernetes objects, run the operator, run the quickstart,
calibrate a curate stage's thresholds.

Torch-free: training runs in torchrun child processes, the quickstart's data and model preparation in
`python -m vlm_quickstart` children, `curate calibrate` in a child process (`contract.CURATE_CALIBRATE_MODULE`).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import yaml
from vlm_core import contract
from vlm_core.redact import redact, redact_obj
from vlm_core.spec import SpecError, VLMTrainingJob, load_job
from vlm_core.storage_errors import StorageError


def _load_or_exit(path: str) -> VLMTrainingJob:
    try:
        return load_job(path)
    except FileNotFoundError:
        print(f"error: {redact(path)}: no such file", file=sys.stderr)
        raise SystemExit(2) from None
    except OSError as err:  # permission denied, a device, ...
        print(f"error: {redact(path)}: cannot read: {err.strerror or err}", file=sys.stderr)
        raise SystemExit(2) from None
    except SpecError as err:
        print(f"{redact(path)}: invalid VLMTrainingJob", file=sys.stderr)
        for p in err.problems:
            print(f"  {redact(p)}", file=sys.stderr)
        raise SystemExit(1) from None


def cmd_validate(args: argparse.Namespace) -> int:
    job = _load_or_exit(args.job)
    print(f"{args.job}: valid VLMTrainingJob {job.name!r} with {len(job.spec.stages)} stage(s): "
          + " -> ".join(f"{s.name} ({s.type})" for s in job.spec.stages))
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from vlm_core import reruns

    from vlm_operator.local_ui import run_with_progress

    job = _load_or_exit(args.job)
    if args.rerun_from is not None:
        try:
            reruns.covered(job, args.rerun_from, field="--rerun-from")
        except ValueError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
    try:
        return run_with_progress(job, verbose=args.verbose, job_file=args.job, rerun_from=args.rerun_from)
    except StorageError as err:  # storage failing mid-run, after its preflight passed: named, no traceback
        print(f"error: {redact(str(err))}", file=sys.stderr)
        return 1


def cmd_describe(args: argparse.Namespace) -> int:
    from vlm_operator import describe

    job = _load_or_exit(args.job)
    try:
        rows = describe.describe(job)
    except StorageError as err:  # named, no traceback (as run and estimate)
        print(f"error: {redact(str(err))}", file=sys.stderr)
        return 2
    print(json.dumps([r.as_dict() for r in rows], indent=2) if args.output == "json" else describe.render(job, rows))
    return 0


def cmd_render(args: argparse.Namespace) -> int:
    from vlm_operator.builders import render_job
    from vlm_operator.planner import resolve_stages

    job = _load_or_exit(args.job)
    # -n wins; else the job's own metadata.namespace; else "default" (as kubectl apply would do).
    objs = render_job(job, args.namespace or job.metadata.namespace or "default", resolve_stages(job))
    # The spec refuses inline credentials; anything credential-shaped that still got this far is masked.
    sys.stdout.write(yaml.safe_dump_all(redact_obj(objs), sort_keys=False))
    return 0


def cmd_estimate(args: argparse.Namespace) -> int:
    from vlm_operator import estimate

    job = _load_or_exit(args.job)
    try:
        shape = estimate.load_shape(job, args.model_configs)
        report = estimate.estimate_job(job, shape, gpu=args.gpu, mfu=args.mfu, budget_gpu_hours=args.budget)
    except (OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=2) if args.output == "json" else estimate.render_table(report))
    return 0


def cmd_operator(args: argparse.Namespace) -> int:
    from vlm_operator import run_operator

    return run_operator.main(args.rest)


def cmd_quickstart(args: argparse.Namespace) -> int:
    from vlm_operator.local_ui import run_with_progress

    qdir = os.path.abspath(args.dir)
    py = sys.executable
    print(f"quickstart: preparing synthetic data and stage-0 models in {qdir}", flush=True)
    rc = subprocess.call([py, "-m", "vlm_quickstart", "prepare", "--dir", qdir, "--seed", str(args.seed),
                          "--instruct", args.instruct, "--variant", args.variant])
    if rc:
        return rc
    if args.variant != "default":
        return _quickstart_steps(qdir, args.verbose)
    for name in ("job.yaml", "raw.yaml", "naive.yaml"):
        path = os.path.join(qdir, name)
        job = _load_or_exit(path)
        print(f"\nquickstart: running {path} ({' -> '.join(s.name for s in job.spec.stages)})", flush=True)
        rc = run_with_progress(job, verbose=args.verbose, job_file=path, rerun_from=_quickstart_rerun(job))
        if rc:
            return rc
    return subprocess.call([py, "-m", "vlm_quickstart", "evaluate", "--dir", qdir])


def _size(text: str) -> int:
    """`256MB`, `64MiB`, `1GB`, `100000` (bytes) -> bytes."""
    units = {"": 1, "B": 1, "K": 1 << 10, "KB": 10**3, "KIB": 1 << 10, "M": 1 << 20, "MB": 10**6, "MIB": 1 << 20,
             "G": 1 << 30, "GB": 10**9, "GIB": 1 << 30}
    t = text.strip().upper()
    digits = t.rstrip("KMGIB")
    try:
        return int(float(digits) * units[t[len(digits):]])
    except (ValueError, KeyError):
        raise argparse.ArgumentTypeError(f"a size such as 256MB, 64MiB or 1GB, got {text!r}") from None


def cmd_data_import(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
    from vlm_core import dataimport

    settings = dataimport.ImportSettings(
        inputs=args.inputs, output=args.output, image_root=args.image_root, shard_bytes=args.shard_size,
        workers=args.workers, dry_run=args.dry_run, format=args.format,
    )
    console = Console(stderr=True)
    bar = Progress(TextColumn("import"), BarColumn(), MofNCompleteColumn(), TextColumn("records"),
                   TimeRemainingColumn(), console=console, disable=not console.is_terminal, transient=True)
    task = bar.add_task("import", total=None)
    try:
        with bar:
            summary = dataimport.run_import(settings, lambda done, total: bar.update(task, completed=done, total=total))
    except (dataimport.ImportProblem, ValueError) as err:
        print(f"error: {redact(str(err))}", file=sys.stderr)
        return 2
    except StorageError as err:
        print(f"error: {redact(str(err))}", file=sys.stderr)
        return 1
    print(json.dumps(summary.as_dict(), indent=2) if args.summary == "json" else dataimport.render(summary))
    return 0


def cmd_curate_calibrate(args: argparse.Namespace) -> int:
    """Measure near-duplicate thresholds on a curate stage's own input (in a child: `contract.CURATE_CALIBRATE_MODULE`)."""
    from vlm_core.stage_classes import curate_stage

    from vlm_operator.planner import resolve_stage

    job = _load_or_exit(args.job)
    curate = [(i, c) for i, s in enumerate(job.spec.stages) if (c := curate_stage(s)) is not None]
    names = [s.name for _, s in curate]
    chosen = [(i, s) for i, s in curate if args.stage in (None, s.name)]
    if not chosen:
        print(f"error: --stage: {args.stage!r} is not a curate stage of {job.name!r} (curate stages: "
              f"{', '.join(repr(n) for n in names) or 'none'})", file=sys.stderr)
        return 2
    index, stage = chosen[0]
    resolved = curate_stage(resolve_stage(job, index).stage)
    assert resolved is not None
    shards = resolved.input.shards
    f = stage.filters
    cmd = [sys.executable, "-m", contract.CURATE_CALIBRATE_MODULE, "--shards", *shards, "--sample", str(args.sample),
           "--pool", str(args.pool), "--seed", str(args.seed), "--suite", args.suite, "--hashes", *f.near_dedup.hashes,
           "--min-side", str(f.image.min_side), "--max-aspect", str(f.image.max_aspect_ratio)]
    for flag in ("write", "json"):
        if getattr(args, flag):
            cmd += [f"--{flag}", getattr(args, flag)]
    print(f"curate calibrate: stage {stage.name!r}, {len(shards)} shard pattern(s)", flush=True)
    return subprocess.call(cmd)


def _quickstart_steps(qdir: str, verbose: bool) -> int:
    """A variant's steps, in the order its `prepare` wrote them (quickstart.json): job files run through the local
    backend, and quickstart steps between them (the hallucination variant's on-policy `pairs`); then `evaluate`."""
    from vlm_operator.local_ui import run_with_progress

    py = sys.executable
    with open(os.path.join(qdir, "quickstart.json")) as f:
        steps = json.load(f)["steps"]
    for step in steps:
        if step[0] == "run":
            job = _load_or_exit(step[1])
            print(f"\nquickstart: running {step[1]} ({' -> '.join(s.name for s in job.spec.stages)})", flush=True)
            rc = run_with_progress(job, verbose=verbose, job_file=step[1], rerun_from=_quickstart_rerun(job))
        else:
            print(f"\nquickstart: {step[0]}", flush=True)
            rc = subprocess.call([py, "-m", "vlm_quickstart", *step, "--dir", qdir])
        if rc:
            return rc
    return subprocess.call([py, "-m", "vlm_quickstart", "evaluate", "--dir", qdir])


def _quickstart_rerun(job: VLMTrainingJob) -> str | None:
    """The quickstart writes its own job files, so where a stage done earlier differs from them (another seed or
    recipe, data prepared anew, an older release) it reruns from that stage, saying so; `vlmctl run` refuses instead."""
    from vlm_operator.describe import describe

    first = next((r for r in describe(job) if r.state == "differs"), None)
    if first is None:
        return None
    print(f"quickstart: stage {first.name!r} was run earlier with other settings or inputs ({'; '.join(first.changes[:3])}"
          f"{'; ...' if len(first.changes) > 3 else ''}): running it and the stages after it again (earlier outputs "
          "kept aside)", flush=True)
    return first.name


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vlmctl", description="Staged VLM training: align -> instruct -> dpo.")
    sub = p.add_subparsers(dest="command", required=True)

    v = sub.add_parser("validate", help="check a job file; every problem is printed with its field path")
    v.add_argument("job", help="job YAML file, or - for standard input")
    v.set_defaults(func=cmd_validate)

    r = sub.add_parser("run", help="run a job's stages on this machine (torchrun via TorchX)")
    r.add_argument("job")
    r.add_argument("-v", "--verbose", action="store_true", help="print every trainer log line")
    r.add_argument("--rerun-from", metavar="STAGE", help="run STAGE and every stage after it again: their previous "
                   "outputs are kept aside under <storage.uri>/<job>/.replaced/<time>/ (never deleted)")
    r.set_defaults(func=cmd_run)

    ds = sub.add_parser("describe", help="each stage: done (with what it was run with), differs (and what changed), "
                        "or pending")
    ds.add_argument("job")
    ds.add_argument("-o", "--output", choices=["table", "json"], default="table")
    ds.set_defaults(func=cmd_describe)

    d = sub.add_parser("render", help="print the Kubernetes objects the operator creates (a dry run)")
    d.add_argument("job")
    d.add_argument(
        "-n", "--namespace", default=None, help="namespace (default: the job's metadata.namespace, else 'default')"
    )
    d.set_defaults(func=cmd_render)

    e = sub.add_parser("estimate", help="memory per GPU, compute and time per stage (reads config.json only)")
    e.add_argument("job")
    e.add_argument("-o", "--output", choices=["table", "json"], default="table", help="json: the same numbers in bytes")
    e.add_argument("--gpu", help="GPU product for peak FLOP/s (and memory where the spec declares none): "
                   "H200, H100, A100-80GB, A100-40GB, L40S, A10G, L4, RTX4090, RTX3090, V100-32GB, T4; default H100")
    e.add_argument("--mfu", type=float, default=0.40, help="model FLOP utilisation for the time estimate (default 0.40)")
    e.add_argument("--budget", type=float, metavar="GPU_HOURS", help="which LM size this budget trains compute-optimally")
    e.add_argument("--model-configs", metavar="DIR", help="read <DIR>/<checkpoint name>/config.json instead of the URIs")
    e.set_defaults(func=cmd_estimate)

    dt = sub.add_parser("data", help="bring your data: convert datasets into this project's shards")
    dsub = dt.add_subparsers(dest="data_command", required=True)
    di = dsub.add_parser(
        "import", help="LLaVA / ShareGPT / ShareGPT4V / preference JSON(L) or Hugging Face Parquet -> WebDataset shards",
        description="Convert records (LLaVA JSON + image folder, ShareGPT / ShareGPT4V, preference JSON with "
        "chosen/rejected, Hugging Face Parquet with embedded images) into WebDataset shards the stages read. "
        "Re-running continues after the shards already committed; --dry-run checks everything and writes nothing.")
    di.add_argument("inputs", nargs="+", metavar="INPUT", help=".json / .jsonl / .parquet files (path, file://, s3://, "
                    "gs://; brace patterns allowed), read in order")
    di.add_argument("--output", required=True, help="where the shards go (path, file://, s3://, gs://)")
    di.add_argument("--image-root", help="folder image paths are relative to (default: each input file's folder)")
    di.add_argument("--shard-size", type=_size, default=256 << 20, help="shard size limit, e.g. 256MB (default 256MiB)")
    di.add_argument("--workers", type=int, default=2, help="worker processes (default 2; 0 or 1: in this process)")
    di.add_argument("--format", choices=["conversation", "preference"],
                    help="the samples' format (default: the first usable record's); records of the other are skipped")
    di.add_argument("--dry-run", action="store_true", help="read and check everything, write nothing")
    di.add_argument("--summary", choices=["text", "json"], default="text", help="the summary's form (json: the numbers)")
    di.set_defaults(func=cmd_data_import)

    o = sub.add_parser("operator", help="run the Kopf operator (see `vlmctl operator --help`)", add_help=False)
    o.add_argument("rest", nargs=argparse.REMAINDER)
    o.set_defaults(func=cmd_operator)

    c = sub.add_parser("curate", help="curate-stage tools (see `vlmctl curate calibrate --help`)")
    csub = c.add_subparsers(dest="curate_command", required=True)
    cal = csub.add_parser("calibrate", help="measure near-duplicate thresholds on a curate stage's own images: "
                          "synthetic copies vs nearest distinct neighbours, precision/recall per threshold")
    cal.add_argument("job")
    cal.add_argument("--stage", help="the curate stage (default: the first)")
    cal.add_argument("--sample", type=int, default=300, help="images copied (default 300)")
    cal.add_argument("--pool", type=int, default=2000, help="images read (default 2000)")
    cal.add_argument("--seed", type=int, default=0)
    cal.add_argument("--suite", choices=["web", "light"], default="web", help="which copies count as duplicates: "
                     "web (re-uploads, crops, edits; default) or light (colour, high-quality re-encode, resize)")
    cal.add_argument("--write", metavar="FILE", help="write the recommended nearDedup settings as a YAML snippet")
    cal.add_argument("--json", metavar="FILE", help="write the whole measurement as JSON")
    cal.set_defaults(func=cmd_curate_calibrate)

    q = sub.add_parser("quickstart", help="build a tiny VLM dataset and models, train curate -> align -> instruct -> dpo")
    q.add_argument("--dir", default="quickstart", help="working folder (data, models, storage, report)")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("-v", "--verbose", action="store_true")
    q.add_argument("--instruct", choices=["full", "zero2", "lora"], default="full",
                   help="instruct stage: full fine-tune (ddp), DeepSpeed ZeRO-2, or LoRA adapters")
    q.add_argument("--variant", choices=["default", "hallucination"], default="default",
                   help="hallucination: data with a language prior the image must overpower; instruct -> on-policy "
                   "preference pairs -> dpo; measures hallucination rate and a POPE-style probe (not part of `make run`)")
    q.set_defaults(func=cmd_quickstart)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["operator"]:  # its own parser owns every option, --help included
        from vlm_operator import run_operator

        return run_operator.main(argv[1:])
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
