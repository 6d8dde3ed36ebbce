"""Activation recomputation: the same gradients as without it (float64, one process, every
parameter), bitwise-identical training in 3 parallel layouts (collectives re-run inside recomputed
layers, reductions overlapped from backward hooks, distributed optimizer), and fewer saved bytes."""
from __future__ import annotations

import torch

from megatron_ext.models.config import load_model_config
from megatron_ext.models.decoder import CausalLM
from megatron_ext.parallel.groups import ParallelGroups, build_groups
from megatron_ext.training.config import TrainConfig
from megatron_ext.training.memory import model_state_bytes
from megatron_ext.training.trainer import Trainer, validate_launch
from tests.helpers.multirank import run_ranks

MODES = ("none", "selective", "full")
COMMON = dict(model="tiny-qwen3-moe", seq_len=30, global_batch_size=4, train_steps=3,
              warmup_steps=1, lr=3e-3, progress=False, tensorboard=False, save_at_end=False,
              save_interval=0, dist_timeout_s=60.0, device="cpu")
LAYOUTS = {  # name -> (layout, micro_batch_size): 2 micro-batches per rank somewhere
    "seed": (dict(attn_tp=2, attn_cp=2, moe_dp=1), 2),               # MOE_FULL, attn-TP sums
    "cp2_moedp2_ep2": (dict(attn_cp=2, moe_dp=2, moe_ep=2), 1),      # dp 2 x cp 2, experts dp 2
    "pp2_cp2": (dict(pp=2, attn_cp=2), 1),                           # 1F1B, 2 micro-batches
}


def _batch(config, b: int = 2, s: int = 24):
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (b, s), generator=gen)
    return ids, torch.arange(s).expand(b, s), torch.roll(ids, -1, dims=1)


def _grads_and_saved_bytes(mode: str):
    """Loss, every gradient and the bytes autograd saved for backward (unique storages) of one
    float64 forward/backward of the tiny model with ``mode``."""
    config = load_model_config("tiny-qwen3-moe")
    model = CausalLM(config, ParallelGroups.single_process(), dtype=torch.float64)
    model.init_weights(seed=3)
    model.set_recompute(mode)
    ids, pos, labels = _batch(config)
    seen: dict = {}

    def pack(t: torch.Tensor):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(ids, position_ids=pos, labels=labels, return_logits=False)
        loss = out.loss.sum() + out.aux_loss
    loss.backward()
    return float(loss), {n: p.grad.clone() for n, p in model.named_parameters()}, \
        sum(seen.values())


def test_recompute_gives_identical_gradients_and_saves_memory():
    """float64, one process: loss and every gradient equal bitwise in each mode; the saved
    activations shrink: selective < none, full < selective."""
    results = {m: _grads_and_saved_bytes(m) for m in MODES}
    loss, grads, _ = results["none"]
    for mode in ("selective", "full"):
        assert results[mode][0] == loss, mode
        for name, g in grads.items():
            assert torch.equal(results[mode][1][name], g), (mode, name)
    saved = {m: r[2] for m, r in results.items()}
    print("saved-for-backward bytes:", saved)
    assert saved["selective"] < saved["none"] and saved["full"] < saved["selective"] / 2, saved


def _layouts_rank(rank: int, world: int, root: str) -> dict:
    out = {}
    for name, (layout, mbs) in LAYOUTS.items():
        groups = None
        for mode in MODES:
            cfg = TrainConfig(**COMMON, **layout, micro_batch_size=mbs, recompute=mode,
                              output_dir=f"{root}/{name}-{mode}")
            groups = groups or build_groups(cfg.topology(world), timeout_s=60)
            trainer = Trainer(cfg, groups, validate_launch(cfg, world))
            assert trainer.optimizer.distributed
            _, _, _, optim = model_state_bytes(trainer.plan.model_config, groups.topology, rank,
                                               bf16=False, distributed=True)
            slack = 8 * sum(groups.axis(b.shard_axis).size for b in trainer.optimizer.buckets
                            if b.shard_axis)  # bucket padding
            assert abs(trainer.optimizer.state_bytes() - optim) <= slack, (name, optim)
            history, early = [], []
            for _ in range(cfg.train_steps):
                m = trainer.train_step()
                history.append((m.loss, m.aux_loss, m.grad_norm))
                early.append(trainer.optimizer.reducer.launched_in_backward)
            trainer.optimizer.wait_params()
            params = {n: p.detach().clone() for n, p in trainer.named_params}
            out[(name, mode)] = (history, params, early)
    return out


def test_recompute_in_parallel_layouts_trains_bitwise_like_no_recompute(tmp_path):
    """4 ranks, fp32, distributed optimizer with overlapped reductions: the seed layout, attn_cp 2
    x attn_dp 2 with experts moe_ep 2 x moe_dp 2, and pp 2 x attn_cp 2 — three steps with
    selective and full recompute give bitwise the losses, aux losses, gradient norms and
    parameters of the run without recompute; bucket reductions started inside backward; each
    rank's sharded AdamW state is the estimator's figure (up to bucket padding)."""
    results = run_ranks(_layouts_rank, 4, str(tmp_path), timeout=300)
    for rank, out in enumerate(results):
        for name in LAYOUTS:
            history, params, early = out[(name, "none")]
            assert sum(early) > 0, (rank, name, early)
            for mode in ("selective", "full"):
                got_history, got_params, _ = out[(name, mode)]
                assert got_history == history, (rank, name, mode, got_history, history)
                for n, p in params.items():
                    assert torch.equal(got_params[n], p), (rank, name, mode, n)
