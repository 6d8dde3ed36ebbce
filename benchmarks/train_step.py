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

Before timing, ``--checks`` (default on) runs the GPU fast paths of this step against float64
references (cuDNN/FlashAttention blocks incl. a CP-style FULL block, the gather-based MoE
combine inside a whole bf16 MoE layer, Triton RMSNorm / SwiGLU / cross-entropy) and times each
against the torch composition it replaces, at this model's sizes (``component`` table).
"""
from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks._common import require_cuda, table, write_results  # noqa: E402
from megatron_ext.parallel.groups import ParallelGroups  # noqa: E402
from megatron_ext.models.config import ModelConfig  # noqa: E402
from megatron_ext.models.decoder import CausalLM  # noqa: E402

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


def profile_step(step, label: str, rows: int = 22) -> str:
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


# ------------------------------------------------------------------------- checks + components
def _rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    a, ref = a.detach().double(), ref.detach().double()
    return float((a - ref).norm() / ref.norm().clamp_min(1e-30))


def _bench(fn, iters: int = 10) -> float:
    """Median ms of ``fn`` (CUDA events), after two warm-up calls."""
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def kernel_checks(device) -> dict:
    """Relative errors (vs float64) of the fast paths and of the torch paths they replace."""
    from megatron_ext.layers.attention import attention_math as am
    from megatron_ext.layers.cross_entropy import vocab_parallel_cross_entropy
    from megatron_ext.layers.mlp import swiglu
    from megatron_ext.layers.moe import MoELayer
    from megatron_ext.layers.norm import rms_norm, rms_norm_reference

    single = ParallelGroups.single_process()
    bf16, f64 = torch.bfloat16, torch.float64
    gen = torch.Generator(device=device).manual_seed(3)
    out: dict = {}

    def rnd(*shape, scale=1.0):
        return torch.randn(*shape, generator=gen, device=device) * scale

    # attention blocks: CAUSAL (1 GPU) and FULL with more keys than queries (a CP remote block)
    for kind, sq, sk in ((am.MaskKind.CAUSAL, 512, 512), (am.MaskKind.FULL, 256, 512)):
        q, k, v = rnd(2, sq, 16, 128).to(bf16), rnd(2, sk, 4, 128).to(bf16), rnd(2, sk, 4, 128)
        v = v.to(bf16)
        dout = rnd(2, sq, 16, 128).to(bf16)
        scale = am.default_scale(128)
        ro, rl = am._math_forward(q.double(), k.double(), v.double(), scale, kind, None)
        rg = am._math_backward(dout.double(), q.double(), k.double(), v.double(), ro, rl, scale,
                               kind, None)
        for kernel in ("cudnn", "flash"):
            am.set_cuda_kernel(kernel)
            o, lse, aux = am.block_forward(q, k, v, scale, kind)
            g = am.block_backward(dout, q, k, v, o, lse, scale, kind, None, aux)
            out[f"attn {kind.value} {kernel} ({aux[0] if aux else 'math'})"] = dict(
                out=_rel(o, ro), lse_abs=float((lse.double() - rl).abs().max()),
                dq=_rel(g[0], rg[0]), dk=_rel(g[1], rg[1]), dv=_rel(g[2], rg[2]))
        am.set_cuda_kernel("auto")

    # whole MoE layer (gather dispatch/combine, sort counts, Triton SwiGLU) bf16 vs float64
    torch.manual_seed(4)
    layer = MoELayer(256, 16, 4, 128, single, norm_topk_prob=True,
                     shared_expert_intermediate_size=256, shared_expert_gate=True,
                     dtype=bf16, device=device)
    ref_layer = MoELayer(256, 16, 4, 128, single, norm_topk_prob=True,
                         shared_expert_intermediate_size=256, shared_expert_gate=True,
                         dtype=f64, device=device)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0.0, 0.1, generator=gen)
        for p, r in zip(layer.parameters(), ref_layer.parameters()):
            r.copy_(p)
    x, gout = rnd(1000, 256).to(bf16), rnd(1000, 256)
    xb, xr = x.clone().requires_grad_(), x.double().requires_grad_()
    yb, yr = layer(xb).hidden, ref_layer(xr).hidden
    (yb.double() * gout).sum().backward()
    (yr * gout.double()).sum().backward()
    grads = {n: _rel(p.grad, r.grad) for (n, p), r in zip(layer.named_parameters(),
                                                         ref_layer.parameters())}
    out["moe layer"] = dict(out=_rel(yb, yr), dx=_rel(xb.grad, xr.grad),
                            worst_param=max(grads.values()))

    # MoE dispatch adjoint + combine (Triton on CUDA) alone vs float64, full and EP-style halves
    from megatron_ext.layers.moe.dispatch import combine, gather_rows, local_dispatch, row_weights
    experts = torch.argsort(torch.rand(3000, 64, generator=gen, device=device), -1)[:, :8]
    for first, num_local in ((0, 64), (32, 32)):
        a = local_dispatch(experts, first, num_local, 64)
        x, w = rnd(3000, 2048).to(bf16), torch.rand(3000, 8, generator=gen, device=device)
        gy = rnd(3000, 2048).to(bf16)
        grads = []
        for dt in (bf16, f64):
            xi = x.detach().to(dt).requires_grad_()
            wi = w.detach().to(dt).requires_grad_()
            rows = gather_rows(xi, a, 8)
            scale = torch.linspace(0.5, 2, rows.shape[0], device=device, dtype=dt)
            y = combine(rows * (scale * row_weights(wi, a))[:, None], a, 8)
            y.backward(gy.to(dt))
            grads.append((y, xi.grad, wi.grad))
        (y1, dx1, dw1), (y2, dx2, dw2) = grads
        out[f"moe combine experts {first}..{first + num_local - 1}"] = dict(
            out=_rel(y1, y2), dx=_rel(dx1, dx2), dw=_rel(dw1, dw2))

    # RMSNorm (hidden and QK-norm widths), SwiGLU, cross-entropy
    for cols in (2048, 128):
        x = rnd(4096, cols, scale=2.0).to(bf16).requires_grad_()
        w = (1.0 + 0.1 * rnd(cols)).to(bf16).requires_grad_()
        x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
        x2, w2 = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
        dy = rnd(4096, cols).to(bf16)
        y, y2 = rms_norm(x, w, 1e-6), rms_norm_reference(x2, w2, 1e-6)
        y64 = rms_norm_reference(x64, w64, 1e-6)
        y.backward(dy), y2.backward(dy), y64.backward(dy.double())
        out[f"rmsnorm {cols}"] = dict(
            y=_rel(y, y64), y_torch=_rel(y2, y64), y_bits_differ=float((y != y2).float().mean()),
            dx=_rel(x.grad, x64.grad), dx_torch=_rel(x2.grad, x64.grad),
            dw=_rel(w.grad, w64.grad), dw_torch=_rel(w2.grad, w64.grad))
    g, u = rnd(4096, 768, scale=2.0).to(bf16).requires_grad_(), rnd(4096, 768).to(bf16)
    u.requires_grad_()
    g2, u2 = g.detach().clone().requires_grad_(), u.detach().clone().requires_grad_()
    d = rnd(4096, 768).to(bf16)
    swiglu(g, u).backward(d)
    (torch.nn.functional.silu(g2) * u2).backward(d)
    out["swiglu vs torch"] = dict(dg_bits_differ=float((g.grad != g2.grad).float().mean()),
                                  du_bits_differ=float((u.grad != u2.grad).float().mean()),
                                  out_bits_differ=float((swiglu(g, u) != (
                                      torch.nn.functional.silu(g2) * u2)).float().mean()))
    logits = rnd(2048, 32000, scale=3.0).to(bf16).requires_grad_()
    labels = torch.randint(0, 32000, (2048,), generator=gen, device=device)
    labels[::7] = -100
    l64 = logits.detach().double().requires_grad_()
    loss = vocab_parallel_cross_entropy(logits, labels, single.attn_tp)
    ref = torch.nn.functional.cross_entropy(l64, labels, reduction="none", ignore_index=-100)
    w = rnd(2048)
    (loss * w).sum().backward()
    (ref * w.double()).sum().backward()
    out["cross-entropy"] = dict(loss=_rel(loss, ref), dlogits=_rel(logits.grad, l64.grad))
    return out


def component_times(cfg: ModelConfig, batch: int, seq: int, device) -> list[list]:
    """ms of one forward + backward of each replaced piece, new vs the torch composition it
    replaces (old), at the model's sizes (one layer's worth)."""
    from megatron_ext.layers.attention import attention_math as am
    from megatron_ext.layers.attention.cp_attention import (_ContextParallelAttention,
                                                  context_parallel_attention)
    from megatron_ext.layers.attention.cp_plan import plan_cp_attention
    from megatron_ext.layers.cross_entropy import vocab_parallel_cross_entropy
    from megatron_ext.layers.mlp import swiglu
    from megatron_ext.layers.moe.dispatch import combine, gather_rows, local_dispatch, row_weights
    from megatron_ext.layers.norm import rms_norm, rms_norm_reference

    single = ParallelGroups.single_process()
    bf16 = torch.bfloat16
    tokens, h, k = batch * seq, cfg.hidden_size, cfg.num_experts_per_tok
    rows = []

    def fb(fn, *inputs):
        def run():
            for t in inputs:
                t.grad = None
            fn().float().sum().backward()
        return _bench(run)

    q = torch.randn(batch, seq, cfg.num_heads, cfg.head_dim, device=device, dtype=bf16)
    kv = [torch.randn(batch, seq, cfg.num_kv_heads, cfg.head_dim, device=device, dtype=bf16)
          for _ in range(2)]
    for t in (q, *kv):
        t.requires_grad_()
    plan = plan_cp_attention(q, kv[0], kv[1], single.attn_cp)
    scale = am.default_scale(cfg.head_dim)
    am.set_cuda_kernel("flash")  # the earlier path: FlashAttention-2 through the block loop
    old = fb(lambda: _ContextParallelAttention.apply(q, kv[0], kv[1], plan, single.attn_cp,
                                                     "all_gather", scale), q, *kv)
    am.set_cuda_kernel("auto")
    rows.append(["attention (flash block loop -> cuDNN single block)", old,
                 fb(lambda: context_parallel_attention(q, kv[0], kv[1], single.attn_cp,
                                                       plan=plan), q, *kv)])

    experts = torch.argsort(torch.rand(tokens, cfg.num_experts, device=device), -1)[:, :k]
    x = torch.randn(tokens, h, device=device, dtype=bf16, requires_grad=True)
    w = torch.rand(tokens, k, device=device, dtype=bf16, requires_grad=True)

    def old_moe_io():
        local = experts.reshape(-1)
        sel = torch.argsort(local, stable=True)
        tok = torch.div(sel, k, rounding_mode="floor")
        torch.bincount(local[sel], minlength=cfg.num_experts)
        y = x[tok] * 1.5
        wr = w.reshape(-1)[sel].unsqueeze(-1)
        return x.new_zeros(tokens, h).index_add(0, tok, y * wr)

    def new_moe_io():
        a = local_dispatch(experts, 0, cfg.num_experts, cfg.num_experts)
        return combine(gather_rows(x, a, k) * (1.5 * row_weights(w, a))[:, None], a, k)

    rows.append(["MoE dispatch+combine (index/index_add -> gathers)", fb(old_moe_io, x, w),
                 fb(new_moe_io, x, w)])
    xn = torch.randn(tokens, h, device=device, dtype=bf16, requires_grad=True)
    wn = torch.ones(h, device=device, dtype=bf16, requires_grad=True)
    rows.append(["RMSNorm hidden (torch -> Triton)", fb(lambda: rms_norm_reference(xn, wn, 1e-6),
                                                        xn, wn),
                 fb(lambda: rms_norm(xn, wn, 1e-6), xn, wn)])
    qn = torch.randn(batch, seq, cfg.num_heads, cfg.head_dim, device=device, dtype=bf16,
                     requires_grad=True)
    wq = torch.ones(cfg.head_dim, device=device, dtype=bf16, requires_grad=True)
    rows.append(["QK-norm q (torch -> Triton)", fb(lambda: rms_norm_reference(qn, wq, 1e-6),
                                                   qn, wq),
                 fb(lambda: rms_norm(qn, wq, 1e-6), qn, wq)])
    g = torch.randn(tokens * k, cfg.moe_intermediate_size, device=device, dtype=bf16,
                    requires_grad=True)
    u = torch.randn_like(g, requires_grad=True)
    rows.append(["expert SwiGLU (torch -> Triton)",
                 fb(lambda: torch.nn.functional.silu(g) * u, g, u), fb(lambda: swiglu(g, u), g, u)])
    logits = torch.randn(tokens, cfg.vocab_size, device=device, dtype=bf16, requires_grad=True)
    labels = torch.randint(0, cfg.vocab_size, (tokens,), device=device)

    def ce_torch():
        lf = logits.float()
        return torch.nn.functional.cross_entropy(lf, labels, reduction="none")
    rows.append(["cross-entropy (torch fp32 -> Triton)", fb(ce_torch, logits),
                 fb(lambda: vocab_parallel_cross_entropy(logits, labels, single.attn_tp),
                    logits)])
    return rows


def ours(cfg, ids, device, warmup, steps, impl: str = "native"):
    model = CausalLM(cfg, ParallelGroups.single_process(), dtype=torch.bfloat16, device=device,
                     transformer_impl=impl)
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
    parser.add_argument("--transformer-impl", nargs="+", default=["native"],
                        choices=["native", "te", "auto"],
                        help="our model's layer implementations to time (same run)")
    parser.add_argument("--no-checks", action="store_true", help="skip kernel checks/components")
    args = parser.parse_args()
    require_cuda(__file__)
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
    checks, components = {}, []
    if not args.no_checks:
        checks = kernel_checks(device)
        for name, errs in checks.items():
            print(f"check {name}: " + ", ".join(f"{k}={v:.2e}" for k, v in errs.items()),
                  flush=True)
        components = component_times(cfg, args.batch, args.seq, device)
        gc.collect()
        torch.cuda.empty_cache()
    rows, results = [], {}
    runs = [(f"megatron_ext {impl}" if len(args.transformer_impl) > 1 or impl != "native"
             else "megatron_ext", lambda *a, impl=impl: ours(*a, impl=impl))
            for impl in args.transformer_impl]
    runs += [] if args.skip_hf else [("transformers", hf)]
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
    if len(rows) >= 2 and not args.skip_hf:
        ratio = rows[0][2] / rows[-1][2]
    write_results("train_step", {"device": name, "matmul_TFLOPs": rate / 1e12,
                                 "flops_per_token": fpt, "results": results, "ratio": ratio,
                                 "checks": checks, "components_ms": components})
    if components:
        print("\nper layer, fwd+bwd ms (old torch composition -> new)")
        print(table(["piece", "old ms", "new ms"], components))
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
