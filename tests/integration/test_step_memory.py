"""Transient memory of a training step, measured with :class:`LiveMemory` on CPU: the AdamW step's
temporaries are bounded by its chunk (not all main weights: that set the 2-GPU race's peak), with
bitwise the update of one unchunked AdamW; the cross-entropy keeps one float32 copy of the logits;
the live tracker itself counts what a plain module and optimizer hold."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from megatron_ext.layers.cross_entropy import vocab_parallel_cross_entropy
from megatron_ext.parallel.groups import ParallelGroups
from megatron_ext.parallel.param_meta import get_spec
from megatron_ext.training.live_memory import LiveMemory
from megatron_ext.training.optimizer import LRSchedule, TrainOptimizer
from tests.helpers.pretrain_standin import build_params, global_tensor

OPT = dict(clip_grad=1.0, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8)
SCHEDULE = LRSchedule(lr=1e-2, min_lr=1e-3, warmup_steps=1, total_steps=10)


def test_live_memory_counts_params_grads_moments_and_adam_temporary():
    """The tracker's figures for a plain Linear + foreach AdamW are the textbook ones: parameters,
    then + gradients + input after backward, and inside the second step one more fp32 copy of the
    parameters (AdamW's sqrt(exp_avg_sq)) on top of parameters, gradients and two moments."""
    with LiveMemory() as mem:
        m = torch.nn.Linear(64, 32)
        opt = torch.optim.AdamW(m.parameters(), foreach=True)
        p_bytes = sum(p.numel() * 4 for p in m.parameters())
        assert mem.current == p_bytes
        x = torch.randn(16, 64)
        steps = 0  # AdamW's scalar step counters are torch.tensor literals: no op allocates them
        m(x).sum().backward()
        assert mem.current == 2 * p_bytes + x.numel() * 4
        for _ in range(2):
            with mem.phase("step"):
                opt.step()
            opt.zero_grad()
            assert mem.current == 3 * p_bytes + x.numel() * 4 + steps
            m(x).sum().backward()
    assert mem.peaks["step"] == 5 * p_bytes + x.numel() * 4 + steps


def _run_steps(chunk_bytes: int, steps: int = 3):
    """bf16 parameters with fp32 main weights, ``steps`` AdamW steps; returns the main weights
    and the peak bytes the steps added above what was live before them."""
    groups = ParallelGroups.single_process()
    with LiveMemory() as mem:
        params = build_params(groups, seed=1)
        opt = TrainOptimizer(params, groups, SCHEDULE, **OPT, param_dtype=torch.bfloat16,
                             step_chunk_bytes=chunk_bytes)
        opt.init_state()
        extra = 0
        for step in range(steps):
            opt.zero_grad()
            for name, p in params:
                p.grad = get_spec(p).take_local(global_tensor(name, seed=2) * (step + 1)
                                                ).bfloat16()
            opt.finish_grad_sync()
            before = mem.current
            mem.peaks.pop("step", None)
            with mem.phase("step"):
                opt.step(step)
            extra = max(extra, mem.peaks["step"] - before)
    mains = torch.cat([q.main.detach().reshape(-1) for q in opt.pieces])
    largest = max(q.main.numel() * 4 for q in opt.pieces)
    group_bytes = [sum(m.numel() * 4 for m in g["params"]) for g in opt.adamw.param_groups]
    return mains, extra, group_bytes, largest


def test_chunked_adamw_step_bounds_temporaries_and_updates_bitwise_alike():
    """Chunks of 1 KiB vs no chunking (one group of matrices, one of vectors): bitwise the same
    main weights after 3 steps; the unchunked step's temporaries reach all main weights of its
    matrix group, the chunked one's stay within one chunk (or the largest single tensor, which
    gets a group alone) plus scalars."""
    whole, whole_extra, whole_groups, _ = _run_steps(2**40)
    chunked, chunked_extra, chunked_groups, largest = _run_steps(1024)
    assert torch.equal(whole, chunked)
    assert len(whole_groups) == 2 < len(chunked_groups), (whole_groups, chunked_groups)
    assert sum(whole_groups) == sum(chunked_groups) == whole.numel() * 4
    assert whole_extra >= max(whole_groups), (whole_extra, whole_groups)  # decay group at once
    assert chunked_extra <= max(1024, largest) + 4096, (chunked_extra, largest)
    print(f"AdamW step temporaries: {whole_extra} B unchunked, {chunked_extra} B in 1 KiB "
          f"chunks (main weights {sum(whole_groups)} B)")


def test_cross_entropy_keeps_one_float32_copy_of_the_logits():
    """bf16 logits [tokens, V]: the forward peaks at two float32 [tokens, V] buffers (its copy of
    the logits and logsumexp's temporary; the softmax is then computed in place in the copy, as
    Megatron's cross-entropy does, instead of two more buffers) and keeps one; loss and gradient
    equal F.cross_entropy in float32."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 1000, generator=gen).bfloat16().requires_grad_()
    labels = torch.randint(0, 1000, (64,), generator=gen)
    group = ParallelGroups.single_process().attn_tp
    fp32 = logits.numel() * 4
    with LiveMemory() as mem:
        loss = vocab_parallel_cross_entropy(logits, labels, group)
        held = mem.current
    assert fp32 <= held <= fp32 + 4096, held
    assert mem.peak <= 2 * fp32 + 4096, mem.peak
    loss.sum().backward()
    ref_logits = logits.detach().float().requires_grad_()
    ref = F.cross_entropy(ref_logits, labels, reduction="none")
    ref.sum().backward()
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(logits.grad, ref_logits.grad.bfloat16(), rtol=0, atol=0)
