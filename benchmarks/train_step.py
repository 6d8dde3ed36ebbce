"""1-GPU training step: megatron_ext's CausalLM vs transformers' Qwen3MoeForCausalLM on the same
shape, in the same run.

    python benchmarks/train_step.py            # needs transformers (carry the wheel, BENCHMARKS.md)

Shape (issue 7): preset ``bench-qwen3-moe`` — 8 layers, hidden 2048, 16 heads / 4 KV heads × 128,
64 experts top-8, expert width 768, vocab 32000; batch 4 × 4096 tokens; bf16 parameters;
``torch.optim.AdamW(fused=True)`` for both (so only the model differs); loss = mean next-token
cross-entropy (no auxiliary loss on either side). transformers runs SDPA attention and its default
``grouped_mm`` experts. Step time = median of ``--steps`` after ``--warmup`` (CUDA events around
forward + backward + optimizer step + zero_grad). MFU = model FLOP/s / 989 TFLOP/s (H100/H200
dense bf16 datasheet); also shown against the bf16 matmul rate measured in the same run.
FLOPs per token: 3 × forward, forward = 2 × (q, k, v, o, router, top-k experts' three
projections, LM head) + causal attention 2 × 2 × (S/2) × heads × head_dim per layer.
"""
from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks._common import table, write_results  # noqa: E402
from megatron_ext.parallel.groups import ParallelGroups  # noqa: E402
from models.config import ModelConfig  # noqa: E402
from models.decoder import CausalLM  # noqa: E402

PEAK_BF16 = 989e12


def flops_per_token(cfg: ModelConfig, seq: int) -> float:
    h, q, kv = cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    per_layer = 2 * (h * q + 2 * h * kv + q * h)                       # q, k, v, o
    per_layer += 2 * 2 * (seq / 2) * q                                 # causal scores + PV
    if cfg.num_experts:
        per_layer += 2 * h * cfg.num_experts                           # router
        per_layer += cfg.num_experts_per_tok * 3 * 2 * h * cfg.moe_intermediate_size
    else:
        per_layer += 3 * 2 * h * cfg.intermediate_size
    fwd = cfg.num_layers * per_layer + 2 * h * cfg.vocab_size          # LM head
    return 3 * fwd


def matmul_rate(device) -> float:
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        a @ b
    end.record()
    end.synchronize()
    return 10 * 2 * 8192**3 / (start.elapsed_time(end) / 1000)


def profile_step(step, label: str, rows: int = 14) -> str:
    """Top CUDA kernels of one step (where the time goes), as a text table."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    return f"== {label}\n" + prof.key_averages().table(sort_by="self_device_time_total",
                                                       row_limit=rows, max_name_column_width=60)


PROFILES: list[str] = []


def time_steps(step, warmup: int, steps: int, label: str = "") -> float:
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    times = []
    for _ in range(steps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    if os.environ.get("TRAIN_STEP_PROFILE"):
        try:
            PROFILES.append(profile_step(step, label))
        except Exception as exc:  # noqa: BLE001 - the timing above stands without it
            PROFILES.append(f"== {label}: profile failed: {exc}")
    return statistics.median(times)


def ours(cfg, ids, device, warmup, steps):
    model = CausalLM(cfg, ParallelGroups.single_process(), dtype=torch.bfloat16, device=device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    b, s = ids.shape
    pos = torch.arange(s, device=device).expand(b, s)
    labels = torch.full_like(ids, -100)
    labels[:, :-1] = ids[:, 1:]
    count = int((labels != -100).sum())

    def step():
        out = model(ids, position_ids=pos, labels=labels, return_logits=False,
                    compute_aux_loss=False)
        (out.loss.sum() / count).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    t = time_steps(step, warmup, steps, "megatron_ext")
    with torch.no_grad():
        loss = float(model(ids, position_ids=pos, labels=labels, return_logits=False,
                           compute_aux_loss=False).loss.sum() / count)
    return t, loss


def hf(cfg, ids, device, warmup, steps):
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM

    d = cfg.to_hf_dict()
    d.pop("architectures", None)
    hf_cfg = AutoConfig.for_model(d.pop("model_type"), **d)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(hf_cfg, attn_implementation="sdpa",
                                                 dtype=torch.bfloat16)
    impl = getattr(model.config, "_experts_implementation", "?")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

    def step():
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    t = time_steps(step, warmup, steps, "transformers")
    with torch.no_grad():
        loss = float(model(input_ids=ids, labels=ids).loss)
    return t, loss, f"transformers {transformers.__version__}, experts={impl}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--skip-hf", action="store_true")
    args = parser.parse_args()
    device = torch.device("cuda", 0)
    torch.cuda.set_device(device)
    cfg = ModelConfig.preset("bench-qwen3-moe")
    gen = torch.Generator(device=device).manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), generator=gen, device=device)
    tokens = args.batch * args.seq
    fpt = flops_per_token(cfg, args.seq)
    rate = matmul_rate(device)
    name = torch.cuda.get_device_name(0)
    print(f"device: {name}, torch {torch.__version__}; bf16 8192^3 matmul {rate / 1e12:.0f} "
          f"TFLOP/s; {fpt / 1e9:.2f} GFLOP/token", flush=True)
    rows, results = [], {}
    runs = [("megatron_ext", ours)] + ([] if args.skip_hf else [("transformers", hf)])
    for label, fn in runs:
        torch.cuda.reset_peak_memory_stats()
        res = fn(cfg, ids, device, args.warmup, args.steps)
        t, loss = res[0], res[1]
        if len(res) > 2:
            label = res[2]
        peak = torch.cuda.max_memory_allocated() / 2**30
        tps = tokens / t
        results[label] = {"step_s": t, "tok_per_s": tps, "mfu_datasheet": tps * fpt / PEAK_BF16,
                          "mfu_measured": tps * fpt / rate, "peak_GiB": peak, "loss": loss}
        rows.append([label, t * 1000, tps, 100 * tps * fpt / PEAK_BF16, 100 * tps * fpt / rate,
                     peak, loss])
        print(label, results[label], flush=True)
        gc.collect()
        torch.cuda.empty_cache()
    ratio = None
    if len(rows) == 2:
        ratio = rows[0][2] / rows[1][2]
    write_results("train_step", {"device": name, "matmul_TFLOPs": rate / 1e12,
                                 "flops_per_token": fpt, "results": results, "ratio": ratio})
    print(f"\n1-GPU training step, batch {args.batch}x{args.seq}, bf16, AdamW, {name}")
    print(table(["model", "step ms", "tokens/s", "MFU % (989)", "MFU % (measured mm)",
                 "peak GiB", "loss"], rows))
    if ratio:
        print(f"megatron_ext / transformers tokens/s: {ratio:.2f}x", flush=True)
    if PROFILES:
        out = os.environ.get("OUT") or "bench_results"
        with open(os.path.join(out, "train_profile.txt"), "w") as fh:
            fh.write("\n\n".join(PROFILES))


if __name__ == "__main__":
    main()
