"""Multi-rank checks of the dense layers, run inside spawned ranks by ``tests/test_layers.py`` (kept
free of pytest so ranks import little): each parallel layer vs the single-process layer on the
same global weights — forward, input grads, every parameter's grad after its ``grad_sync``."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from megatron_ext.layers.attention.block import AttentionBlock
from megatron_ext.layers.cross_entropy import vocab_parallel_cross_entropy
from megatron_ext.layers.embedding import VocabParallelEmbedding, VocabParallelLMHead
from megatron_ext.layers.linear import ColumnParallelLinear, RowParallelLinear
from megatron_ext.layers.mlp import DenseMLP
from megatron_ext.communication.collectives import all_reduce
from megatron_ext.parallel.comm_counter import count_collectives
from megatron_ext.data.cp_split import split_batch_for_cp
from megatron_ext.parallel.groups import ParallelGroups, build_groups
from megatron_ext.parallel.param_meta import get_spec
from megatron_ext.parallel.topology import Topology
from tests.helpers.parallel_check import assert_close, assert_grads_match, load_from_reference

SINGLE = ParallelGroups.single_process()
F64 = torch.float64

LAYOUTS = [dict(attn_tp=2), dict(attn_tp=4), dict(attn_tp=2, attn_cp=2)]
HID, VOCAB = 16, 24


def _rand(gen: torch.Generator, *shape: int, scale: float = 1.0) -> torch.Tensor:
    return scale * torch.randn(*shape, generator=gen, dtype=F64)


def _init(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = _rand(gen, *p.shape)
            p.copy_(1 + 0.2 * noise if "norm" in name else 0.4 * noise)
    return module


def _check_linears(groups: ParallelGroups, seed: int) -> None:
    """Column (with bias; also 2 replicated partitions) feeding row (partial / reduced)."""
    tp, d = groups.attn_tp, groups.coords.attn_dp
    n_dp = groups.topology.attn_dp
    gen = torch.Generator().manual_seed(seed)
    x_all, g_all = _rand(gen, n_dp, 5, HID), _rand(gen, n_dp, 5, HID)
    for parts in sorted({tp.size, max(tp.size // 2, 1)}):
        for reduce in (False, True):
            ref_c = _init(ColumnParallelLinear(HID, 8, SINGLE.attn_tp, bias=True, dtype=F64),
                          seed)
            ref_r = _init(RowParallelLinear(8, HID, SINGLE.attn_tp, reduce_results=True,
                                            bias=True, dtype=F64), seed + 1)
            col = ColumnParallelLinear(HID, 8, tp, bias=True, num_partitions=parts, dtype=F64)
            row = RowParallelLinear(8, HID, tp, reduce_results=reduce, bias=True, dtype=F64)
            load_from_reference(col, ref_c)
            load_from_reference(row, ref_r)
            xr = x_all.clone().requires_grad_()
            hidden_r = ref_c(xr)
            (ref_r(hidden_r) * g_all).sum().backward()
            x = x_all[d].clone().requires_grad_()
            hidden = col(x)
            what = f"linears {groups.topology} partitions={parts} reduce={reduce}"
            cols = get_spec(col.weight).global_slices()[0]
            assert_close(hidden, hidden_r[d][..., cols], atol=1e-12, rtol=0,
                         what=f"{what} column fwd")
            if parts < tp.size:  # replicated pieces feed different consumers: split the row
                per = hidden.shape[-1] // (tp.size // parts)
                k = tp.rank % (tp.size // parts)
                hidden = hidden[..., k * per:(k + 1) * per]
            if hidden.shape[-1] != 8 // tp.size:
                continue
            out = row(hidden)
            out = out if reduce else all_reduce(out, tp)
            assert_close(out, ref_r(hidden_r)[d], atol=1e-12, rtol=0, what=f"{what} row fwd")
            (out * g_all[d]).sum().backward()
            assert_close(x.grad, xr.grad[d], atol=1e-12, rtol=0, what=f"{what} input grad")
            assert_grads_match(col, ref_c, groups, atol=1e-12, what=what + " column")
            assert_grads_match(row, ref_r, groups, atol=1e-12, what=what + " row")


def _check_vocab(groups: ParallelGroups, seed: int) -> None:
    # (vocabulary, vocab_multiple): divides; padded (tp 4: the last rank holds 5 real rows of
    # 6); padded so far that the last tp-4 rank holds only padding (all its logits -inf)
    for vocab, multiple in ((VOCAB, 1), (VOCAB - 1, 1), (VOCAB - 1, 4)):
        _check_vocab_size(groups, seed, vocab, multiple)


def _check_vocab_size(groups: ParallelGroups, seed: int, VOCAB: int, multiple: int) -> None:
    tp, d = groups.attn_tp, groups.coords.attn_dp
    n_dp = groups.topology.attn_dp
    gen = torch.Generator().manual_seed(seed)
    ids_all = torch.randint(0, VOCAB, (n_dp, 2, 5), generator=gen)
    labels_all = torch.randint(0, VOCAB, (n_dp, 2, 5), generator=gen)
    labels_all[:, 0, 1] = -100
    labels_all[:, 1, 2] = VOCAB - 1  # the last real column, next to the padding
    g_all = _rand(gen, n_dp, 2, 5, HID)
    for tied in (False, True):
        for reduce in (False, True):
            ref_e = _init(VocabParallelEmbedding(VOCAB, HID, SINGLE.attn_tp, dtype=F64), seed)
            ref_h = _init(VocabParallelLMHead(HID, VOCAB, SINGLE.attn_tp, dtype=F64,
                                              tied_embedding=ref_e if tied else None), seed + 1)
            emb = VocabParallelEmbedding(VOCAB, HID, tp, reduce_results=reduce, dtype=F64,
                                         vocab_multiple=multiple)
            head = VocabParallelLMHead(HID, VOCAB, tp, tied_embedding=emb if tied else None,
                                       dtype=F64, vocab_multiple=multiple)
            load_from_reference(emb, ref_e)
            load_from_reference(head, ref_h)
            hr = ref_e(ids_all)
            hr.retain_grad()
            logits_r = ref_h(torch.tanh(hr))
            loss_r = F.cross_entropy(logits_r.reshape(-1, VOCAB), labels_all.reshape(-1),
                                     reduction="none").reshape(labels_all.shape)
            ((hr * g_all).sum() + loss_r.sum()).backward()
            h = emb(ids_all[d])
            h = h if reduce else all_reduce(h, tp)
            h.retain_grad()
            logits = head(torch.tanh(h))
            loss = vocab_parallel_cross_entropy(logits, labels_all[d], tp, vocab_size=VOCAB)
            what = f"vocab {VOCAB} (x{multiple}) {groups.topology} tied={tied} reduce={reduce}"
            assert_close(h, hr[d], atol=1e-12, rtol=0, what=f"{what} embedding fwd")
            assert_close(head.gather_logits(logits), logits_r[d], atol=1e-12,
                         rtol=0, what=f"{what} logits")
            assert_close(loss, loss_r[d], atol=1e-12, rtol=0, what=f"{what} loss")
            with torch.no_grad():  # evaluation's path: no softmax kept for backward
                assert_close(vocab_parallel_cross_entropy(logits, labels_all[d], tp,
                                                          vocab_size=VOCAB), loss, atol=0,
                             rtol=0, what=f"{what} loss without grad")
            ((h * g_all[d]).sum() + loss.sum()).backward()
            assert_close(h.grad, hr.grad[d], atol=1e-12, rtol=0, what=f"{what} hidden grad")
            assert_grads_match(emb, ref_e, groups, atol=1e-12, what=what + " embedding")
            if not tied:
                assert_grads_match(head, ref_h, groups, atol=1e-12, what=what + " head")


def _check_mlp(groups: ParallelGroups, seed: int) -> None:
    tp, d = groups.attn_tp, groups.coords.attn_dp
    gen = torch.Generator().manual_seed(seed)
    x_all, g_all = _rand(gen, groups.topology.attn_dp, 5, HID), _rand(gen, 2, 5, HID)
    ref = _init(DenseMLP(HID, 24, SINGLE, dtype=F64), seed)
    mlp = DenseMLP(HID, 24, groups, dtype=F64)
    load_from_reference(mlp, ref)
    xr = x_all.clone().requires_grad_()
    (ref(xr) * g_all[:x_all.shape[0]]).sum().backward()
    x = x_all[d].clone().requires_grad_()
    with count_collectives() as log:
        partial = mlp(x)
    assert log.count(phase="forward") == 0
    out = all_reduce(partial, tp)
    (out * g_all[d]).sum().backward()
    what = f"mlp {groups.topology}"
    assert_close(out, ref(xr)[d], atol=1e-12, rtol=0, what=f"{what}")
    assert_close(x.grad, xr.grad[d], atol=1e-12, rtol=0, what=f"{what} input grad")
    assert_grads_match(mlp, ref, groups, atol=1e-12, what=what)


def _check_attention(groups: ParallelGroups, seed: int, heads: int, kv_heads: int,
                     seq: int) -> None:
    """Full sequences in the reference; CP ranks hold load-balanced chunks (padded if needed)."""
    topo, tp, cp = groups.topology, groups.attn_tp, groups.attn_cp
    d = groups.coords.attn_dp
    gen = torch.Generator().manual_seed(seed)
    b = 2
    x_all, g_all = _rand(gen, topo.attn_dp, b, seq, HID), _rand(gen, topo.attn_dp, b, seq, HID)
    kw = dict(qk_norm=True, qkv_bias=True, o_bias=True, rope_theta=100.0, dtype=F64)
    ref = _init(AttentionBlock(HID, heads, kv_heads, 4, SINGLE, **kw), seed)
    block = AttentionBlock(HID, heads, kv_heads, 4, groups, **kw)
    load_from_reference(block, ref)
    xr = x_all.clone().requires_grad_()
    positions = torch.arange(seq).expand(b, seq)
    (torch.stack([ref(xr[i], positions) for i in range(topo.attn_dp)]) * g_all).sum().backward()
    out_r = torch.stack([ref(xr[i], positions) for i in range(topo.attn_dp)]).detach()

    src = torch.arange(seq).expand(b, seq)
    batch = split_batch_for_cp(src, None, cp.size, cp.rank, pad_token_id=-1)
    real = batch.input_ids >= 0
    take = batch.input_ids.clamp(min=0)
    rows = torch.arange(b).unsqueeze(1)
    x = (x_all[d][rows, take] * real.unsqueeze(-1)).requires_grad_()
    with count_collectives() as log:
        partial = block(x, batch.position_ids, token_index=batch.token_index,
                        segment_ids=batch.segment_ids)
    assert log.count(axis="attn_tp", phase="forward") == 0, log.records
    out = all_reduce(partial, tp)
    (out * g_all[d][rows, take] * real.unsqueeze(-1)).sum().backward()
    what = f"attention {topo} heads={heads}/{kv_heads} seq={seq}"
    assert_close(out[real], out_r[d][rows, take][real], atol=1e-10, rtol=0, what=f"{what} fwd")
    assert_close(x.grad[real], xr.grad[d][rows, take][real], atol=1e-10, rtol=0,
                 what=f"{what} input grad")
    assert_grads_match(block, ref, groups, atol=1e-10, what=what)


def run_layouts(rank: int, world: int) -> int:
    """Every layout and layer; returns how many checks passed on this rank."""
    checked = 0
    for i, sizes in enumerate(LAYOUTS):
        groups = build_groups(Topology(world=world, **sizes))
        seed = 1000 * i
        if groups.topology.attn_cp == 1:
            _check_linears(groups, seed)
            _check_vocab(groups, seed + 1)
            _check_mlp(groups, seed + 2)
            checked += 3
        _check_attention(groups, seed + 3, heads=4, kv_heads=2,
                         seq=7 if groups.topology.attn_cp > 1 else 6)
        _check_attention(groups, seed + 4, heads=8, kv_heads=4, seq=8)
        checked += 2
    return checked
