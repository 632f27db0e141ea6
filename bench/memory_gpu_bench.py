"""Estimated vs measured peak GPU memory for ddp, fsdp, zero2, zero3, LoRA and QLoRA on ONE GPU.

Each case runs in its own process (clean CUDA allocator and process group): build a LLaVA model from
configs (no download; default a TinyLlama-shaped 1.1B LM + SigLIP-base vision tower), apply the
strategy as the trainer does, run 3 training steps of random tokens and images, and report
`torch.cuda.max_memory_allocated()` against the estimate's tensors (the estimate without its fixed
CUDA/NCCL overhead, which the allocator does not see) and `max_memory_reserved()` against the
estimate's total minus the fixed part.

Recipes (what `vlm_core.accounting.recipe` assumes): ddp and LoRA keep fp32 weights and compute under
bf16 autocast; fsdp is FSDP2 `fully_shard` with bf16 parameters for compute and fp32 sharded masters
and reduction; zero2/zero3 are DeepSpeed with a bf16 model (fp32 master and Adam state in its
optimizer, torch Adam); QLoRA loads the LM's decoder linears in NF4 with double quantisation
(bitsandbytes), bf16 elsewhere, fp32 adapters, torch AdamW (not paged: paged state would be outside
the allocator's count).

    python bench/memory_gpu_bench.py --out bench/results/memory_gpu.json            # all cases, on CUDA
    python bench/memory_gpu_bench.py --device cpu --size tiny --cases ddp,lora,fsdp  # smoke run, no GPU

Needs torch with CUDA, transformers, peft, deepspeed (zero2/zero3) and bitsandbytes (QLoRA).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time

CASES = ("ddp", "fsdp", "zero2", "zero3", "lora", "qlora")
SIZES = {
    # TinyLlama-1.1B's shape and SigLIP-base/16 at 224 px (196 image tokens)
    "1b": ({"model_type": "llama", "hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22,
            "num_attention_heads": 32, "num_key_value_heads": 4, "vocab_size": 32000, "tie_word_embeddings": False},
           {"model_type": "siglip_vision_model", "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
            "num_attention_heads": 12, "patch_size": 16, "image_size": 224, "vision_use_head": False}),
    "tiny": ({"model_type": "llama", "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 4, "vocab_size": 512, "tie_word_embeddings": False},
             {"model_type": "siglip_vision_model", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
              "num_attention_heads": 4, "patch_size": 8, "image_size": 32, "vision_use_head": False}),
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stage_input(case: str, micro: int, seq: int, device: str):
    from vlm_core import accounting as A

    strategy = case if case in ("ddp", "fsdp", "zero2", "zero3") else "ddp"
    lora = case in ("lora", "qlora")
    return A.StageInput(stage_type="instruct", trainable=("projector", "language_model"), strategy=strategy,
                        precision="bf16", micro_batch=micro, seq_len=seq, world_size=1,
                        lora_rank=16 if lora else None, qlora=case == "qlora", on_gpu=device == "cuda")


def run_case(case: str, size: str, micro: int, seq: int, device_name: str) -> dict:  # noqa: C901 (one case per branch)
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from transformers import LlavaConfig, LlavaForConditionalGeneration
    from vlm_core import accounting as A
    from vlm_trainer.model import apply_freezing

    lm_cfg, vision_cfg = SIZES[size]
    shape = A.ModelShape.from_configs(vision_cfg, lm_cfg)
    device = torch.device(device_name)
    cuda = device.type == "cuda"
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    if case in ("fsdp", "zero2", "zero3"):
        dist.init_process_group("nccl" if cuda else "gloo", rank=0, world_size=1)
    image_id = lm_cfg["vocab_size"] - 1
    cfg = LlavaConfig(vision_config=vision_cfg, text_config=lm_cfg, image_token_index=image_id,
                      image_seq_length=shape.image_tokens, projector_hidden_act="gelu", vision_feature_layer=-2,
                      vision_feature_select_strategy="full", tie_word_embeddings=False)
    torch.manual_seed(0)
    bf16_model = case in ("zero2", "zero3")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda and not bf16_model)
    if case == "qlora":
        from transformers import BitsAndBytesConfig

        tmp = tempfile.mkdtemp(prefix="qlora-bench-")
        LlavaForConditionalGeneration(cfg).save_pretrained(tmp)
        bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                 bnb_4bit_compute_dtype=torch.bfloat16,
                                 llm_int8_skip_modules=["vision_tower", "multi_modal_projector", "lm_head"])
        model = LlavaForConditionalGeneration.from_pretrained(tmp, quantization_config=bnb, dtype=torch.bfloat16,
                                                              device_map={"": 0})
    else:
        model = LlavaForConditionalGeneration(cfg).to(torch.bfloat16 if bf16_model else torch.float32)
    apply_freezing(model, ["projector", "language_model"])
    if case in ("lora", "qlora"):
        from peft import LoraConfig, get_peft_model

        for p in model.model.language_model.parameters():
            p.requires_grad_(False)
        model.lm_head.weight.requires_grad_(False)
        lm_targets = r"model\.language_model\.layers\.\d+\.(self_attn|mlp)\.(q|k|v|o|gate|up|down)_proj"
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=lm_targets,
                                                 modules_to_save=["multi_modal_projector"]))
    model.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    engine = None
    if case == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        for layer in list(model.model.language_model.layers) + list(model.model.vision_tower.vision_model.encoder.layers
                                                                     if hasattr(model.model.vision_tower, "vision_model")
                                                                     else model.model.vision_tower.encoder.layers):
            fully_shard(layer, mp_policy=mp)
        fully_shard(model, mp_policy=mp)
        params = [p for p in model.parameters() if p.requires_grad]
    if case in ("zero2", "zero3"):
        import deepspeed

        ds = {"train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": 1, "bf16": {"enabled": True},
              "zero_optimization": {"stage": 2 if case == "zero2" else 3},
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-5, "torch_adam": True}}}
        engine, optimizer, _, _ = deepspeed.initialize(model=model, model_parameters=params, config=ds)
        model = engine
    else:
        optimizer = torch.optim.AdamW(params, lr=1e-5)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    g = torch.Generator().manual_seed(1)
    started = time.perf_counter()
    for _ in range(3):
        ids = torch.randint(0, image_id, (micro, seq), generator=g)
        ids[:, : shape.image_tokens] = image_id
        labels = torch.where(ids == image_id, -100, ids)
        pixels = torch.randn(micro, 3, shape.vision.image_size, shape.vision.image_size, generator=g)
        ids, labels, pixels = ids.to(device), labels.to(device), pixels.to(device)
        pixels = pixels.to(torch.bfloat16) if (bf16_model or case == "qlora") else pixels
        with autocast:
            out = model(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixels, use_cache=False)
            logits = out.logits[:, :-1].float()
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100)
        del out, logits
        if engine is not None:
            engine.backward(loss)
            engine.step()
        else:
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    if cuda:
        torch.cuda.synchronize()
    est = A.estimate_memory(shape, stage_input(case, micro, seq, device.type))
    fixed = A.OVERHEAD_FIXED_BYTES if cuda else 0
    tensors = est.total_bytes - est.components["overhead"]
    row = {
        "case": case, "size": size, "params": shape.params, "micro_batch": micro, "seq_len": seq,
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "estimate_components_bytes": est.components, "estimate_tensors_bytes": tensors,
        "estimate_total_minus_fixed_bytes": est.total_bytes - fixed,
        "measured_max_allocated_bytes": torch.cuda.max_memory_allocated() if cuda else None,
        "measured_max_reserved_bytes": torch.cuda.max_memory_reserved() if cuda else None,
        "seconds_3_steps": round(time.perf_counter() - started, 2), "loss": float(loss),
    }
    if cuda:
        row["error_tensors_vs_allocated_percent"] = round(100 * (tensors / row["measured_max_allocated_bytes"] - 1), 1)
        row["error_total_vs_reserved_percent"] = round(
            100 * (row["estimate_total_minus_fixed_bytes"] / row["measured_max_reserved_bytes"] - 1), 1)
    if dist.is_initialized():
        dist.destroy_process_group()
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--size", choices=list(SIZES), default="1b")
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", default=None, help="write all rows as JSON here")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # child mode: run one case, print its JSON row
    args = ap.parse_args(argv)
    if args.one:
        print("ROW " + json.dumps(run_case(args.one, args.size, args.micro_batch, args.seq_len, args.device)), flush=True)
        return 0
    rows = []
    for case in args.cases.split(","):
        if case not in CASES:
            raise SystemExit(f"--cases: unknown case {case!r}; known: {', '.join(CASES)}")
        cmd = [sys.executable, __file__, "--one", case, "--size", args.size, "--micro-batch", str(args.micro_batch),
               "--seq-len", str(args.seq_len), "--device", args.device]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        row_lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("ROW ")]
        if proc.returncode or not row_lines:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
            row = {"case": case, "error": " | ".join(tail)}
            print(f"{case:<6} FAILED: {row['error']}", flush=True)
        else:
            row = json.loads(row_lines[-1][4:])
            gib = 2**30
            measured = row["measured_max_allocated_bytes"]
            print(f"{case:<6} estimate {row['estimate_tensors_bytes'] / gib:7.2f} GiB tensors"
                  + (f" | measured max allocated {measured / gib:7.2f} GiB "
                     f"({row['error_tensors_vs_allocated_percent']:+.1f}%), reserved "
                     f"{row['measured_max_reserved_bytes'] / gib:7.2f} GiB" if measured is not None
                     else " | (no CUDA: nothing measured)"), flush=True)
        rows.append(row)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"command": "python " + " ".join(sys.argv), "rows": rows}, f, indent=2)
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
