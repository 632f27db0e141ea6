"""`vlmctl estimate job.yaml`: memory per GPU, compute, time and data-size advice per stage, before running.

The numbers come from `vlm_core.accounting` (the same accounting admission and the trainer's MFU
use); the model's shape from its config.json files, read through the storage layer (or from a local
folder of config.json files with `--model-configs`, for checkpoints this machine cannot reach).
"""

from __future__ import annotations

import os
from typing import Any

from vlm_core import accounting as A
from vlm_core.spec import VLMTrainingJob
from vlm_core.stage_classes import training_stage

from vlm_operator import admission

DEFAULT_GPU = "H100"
DEFAULT_MFU = 0.40


def load_shape(job: VLMTrainingJob, configs_dir: str | None = None) -> A.ModelShape:
    """The model's shape; with `configs_dir`, `<configs_dir>/<last path part of the URI>/config.json`."""
    model = job.spec.model
    if configs_dir is None:
        return admission.load_shape(model, admission.model_storage_options(job, job.spec.storage.fsspec_options()))

    def read(uri: str, field: str) -> dict[str, Any]:
        return admission.read_config(os.path.join(configs_dir, uri.rstrip("/").rsplit("/", 1)[-1]), field)

    vision = read(model.vision_encoder, "spec.model.visionEncoder")
    language = read(model.language_model, "spec.model.languageModel")
    return A.ModelShape.from_configs(vision, language,
                                     feature_select=model.vision_feature_select_strategy)


def estimate_job(
    job: VLMTrainingJob, shape: A.ModelShape, *, gpu: str | None = None, mfu: float = DEFAULT_MFU,
    budget_gpu_hours: float | None = None,
) -> dict[str, Any]:
    """The whole report as JSON-able data (bytes, FLOPs, seconds)."""
    if not 0 < mfu <= 1:
        raise ValueError(f"--mfu: must be in (0, 1], got {mfu:g}")
    card = A.gpu_named(gpu or DEFAULT_GPU)
    stages = []
    for any_stage in job.spec.stages:
        stage = training_stage(any_stage)
        if stage is None:  # data stages (curate) train nothing: no model memory or FLOPs
            continue
        inp = A.stage_input(stage, on_gpu=True)
        mem = A.estimate_memory(shape, inp)
        declared = stage.resources.gpu_memory_gib
        limit_gib, source = ((declared, "resources.gpuMemoryGiB") if declared is not None
                             else (card.memory_gib, f"--gpu {card.name}") if gpu else (None, None))
        fits = None if limit_gib is None else mem.total_bytes <= limit_gib * A.GIB
        alts: list[dict[str, Any]] = []
        if fits is False and limit_gib is not None:
            alts = [{"patch": dict(a.patch), "bytes_per_gpu": a.bytes_per_gpu, "gpus": a.gpus, "text": a.text}
                    for a in admission.alternatives(shape, stage, limit_gib * A.GIB)]
        comp = A.stage_compute(
            shape, inp, max_steps=stage.max_steps, epochs=stage.epochs, num_samples=stage.data.num_samples,
            global_batch=stage.batch.global_size, mfu=mfu, peak_flops_per_second=card.peak_flops_per_second,
        )
        book = A.param_book(shape, inp)
        stages.append({
            "name": stage.name,
            "type": stage.type,
            "settings": admission.describe(stage),
            "trained_params": book.trained,
            "memory": {
                "components_bytes": mem.components,
                "total_bytes": mem.total_bytes,
                "offloaded_bytes_per_gpu": mem.offloaded_bytes,
                "limit_bytes": int(limit_gib * A.GIB) if limit_gib is not None else None,
                "limit_source": source,
                "fits": fits,
                "alternatives": alts,
            },
            "compute": {
                "steps": comp.steps,
                "samples": comp.samples,
                "tokens": comp.tokens,
                "text_tokens": comp.text_tokens,
                "flops": comp.flops,
                "tokens_per_trained_param": comp.tokens_per_trained_param,
                "seconds": comp.seconds,
                "gpus": inp.world_size,
                "gpu_hours": comp.gpu_hours,
            },
            "warnings": comp.warnings + list(mem.notes),
        })
    report: dict[str, Any] = {
        "job": job.name,
        "gpu": {"name": card.name, "memory_gib": card.memory_gib, "peak_flops_per_second": card.peak_flops_per_second},
        "mfu": mfu,
        "model": {"params": shape.params, "params_by_part": shape.params_by_part, "image_tokens": shape.image_tokens},
        "overhead": {"fixed_bytes": A.OVERHEAD_FIXED_BYTES, "fraction_of_tensors": A.OVERHEAD_FRACTION},
        "stages": stages,
    }
    if budget_gpu_hours is not None:
        if budget_gpu_hours <= 0:
            raise ValueError(f"--budget: GPU-hours must be > 0, got {budget_gpu_hours:g}")
        flops = budget_gpu_hours * 3600 * card.peak_flops_per_second * mfu
        n, d = A.compute_optimal(flops)
        report["budget"] = {"gpu_hours": budget_gpu_hours, "flops": flops, "optimal_params": n, "optimal_tokens": d,
                            "lm_params": shape.lm.params}
    return report


def _gib(b: float | None) -> str:
    return "-" if b is None else f"{b / A.GIB:.2f}"


def _num(x: float | None, unit: str = "") -> str:
    if x is None:
        return "unknown"
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(x) >= scale:
            return f"{x / scale:.2f}{suffix}{unit}"
    return f"{x:.0f}{unit}"


def render_table(report: dict[str, Any]) -> str:
    """The readable form: per stage, GiB per GPU by component, total, fits?, compute and time."""
    gpu, mfu = report["gpu"], report["mfu"]
    parts = report["model"]["params_by_part"]
    lines = [
        f"job {report['job']}: {_num(report['model']['params'])} parameters (vision {_num(parts['vision_tower'])}, "
        f"projector {_num(parts['projector'])}, LM {_num(parts['language_model'])}); "
        f"{report['model']['image_tokens']} tokens per image",
        f"time at MFU {mfu:.2f} on {gpu['name']} ({gpu['peak_flops_per_second'] / 1e12:.0f} TFLOP/s bf16 peak); "
        f"overhead = {report['overhead']['fixed_bytes'] / A.GIB:.0f} GiB + "
        f"{report['overhead']['fraction_of_tensors']:.0%} of tensors",
    ]
    for s in report["stages"]:
        mem, comp = s["memory"], s["compute"]
        lines += ["", f"stage {s['name']} ({s['type']}: {s['settings']}), {_num(s['trained_params'])} trained parameters",
                  f"  {'component':<18}{'GiB/GPU':>10}"]
        for key, value in mem["components_bytes"].items():
            if value:
                lines.append(f"  {key:<18}{_gib(value):>10}")
        lines.append(f"  {'total':<18}{_gib(mem['total_bytes']):>10}")
        if mem["offloaded_bytes_per_gpu"]:
            lines.append(f"  {'host (offloaded)':<18}{_gib(mem['offloaded_bytes_per_gpu']):>10}")
        if mem["fits"] is None:
            lines.append("  fits? unknown: no resources.gpuMemoryGiB declared (or pass --gpu)")
        else:
            verdict = "yes" if mem["fits"] else "NO"
            lines.append(f"  fits? {verdict}: limit {_gib(mem['limit_bytes'])} GiB ({mem['limit_source']})")
            for alt in mem["alternatives"]:
                lines.append(f"    alternative: {alt['text']}")
        hours = comp["seconds"] / 3600 if comp["seconds"] is not None else None
        lines.append(
            f"  compute: {_num(comp['steps'])} steps, {_num(comp['tokens'])} tokens ({_num(comp['text_tokens'])} text), "
            f"{comp['flops']:.3g} FLOPs" if comp["flops"] is not None else
            "  compute: unknown (set maxSteps, or data.numSamples for an epochs-based stage)"
        )
        if hours is not None:
            lines.append(
                f"  time: {hours:.2f} h on {comp['gpus']} GPUs ({comp['gpu_hours']:.1f} GPU-hours); "
                f"{comp['tokens_per_trained_param']:.3g} text tokens per trained parameter (Chinchilla ~20 for "
                "pretraining)"
            )
        for w in s["warnings"]:
            lines.append(f"  warning: {w}")
    if "budget" in report:
        b = report["budget"]
        lines += ["", f"budget {b['gpu_hours']:g} GPU-hours on {gpu['name']} at MFU {mfu:.2f} = {b['flops']:.3g} FLOPs: "
                  f"compute-optimal LM ~{_num(b['optimal_params'])} parameters on {_num(b['optimal_tokens'])} tokens "
                  f"(C = 6ND, D = 20N); this job's LM has {_num(b['lm_params'])}"]
    return "\n".join(lines)
