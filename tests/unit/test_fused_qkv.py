"""The decode fast path's q/k/v fusion (layers/attention/fused_qkv.py) on CPU tensors: fusing keeps
every weight's values and makes them views of one buffer; a model whose weights are views of a
trainer's flat buffer (gradient buckets) is never re-pointed (the optimizer's updates would stop
reaching it); a replaced storage is noticed."""
from __future__ import annotations

import torch

from megatron_ext.layers.attention.block import AttentionBlock
from megatron_ext.parallel.groups import ParallelGroups


def _block(bias: bool = False) -> AttentionBlock:
    torch.manual_seed(0)
    return AttentionBlock(64, 8, 2, 16, ParallelGroups.single_process(), qk_norm=True,
                          qkv_bias=bias)


def test_fuse_keeps_values_and_views_one_buffer():
    for bias in (False, True):
        blk = _block(bias)
        before = {n: p.detach().clone() for n, p in blk.named_parameters()}
        fused = blk.fused_qkv
        assert fused.standalone() and not fused._fused()
        fused._fuse()
        assert fused._fused()
        for n, p in blk.named_parameters():
            assert torch.equal(p, before[n]), n
        q, k, v = (m.weight for m in fused.linears)
        assert q.untyped_storage().data_ptr() == v.untyped_storage().data_ptr()
        assert torch.equal(fused._weight, torch.cat([before[f"{x}_proj.weight"]
                                                     for x in "qkv"]))
        with torch.no_grad():   # a checkpoint load copies in place: the fused buffer sees it
            blk.k_proj.weight.fill_(0.5)
        assert fused._fused() and (fused._weight[128:160] == 0.5).all()
        blk.v_proj.weight.data = blk.v_proj.weight.data.clone()   # a replaced storage
        assert not fused._fused()


def test_weights_in_a_trainer_buffer_are_never_fused():
    blk = _block()
    flat = torch.zeros(sum(m.weight.numel() for m in blk.fused_qkv.linears) + 7)
    start = 7
    for m in blk.fused_qkv.linears:   # as grad_buffer.adopt_storage does
        view = flat[start:start + m.weight.numel()].view_as(m.weight)
        view.copy_(m.weight.data)
        m.weight.data = view
        start += m.weight.numel()
    assert not blk.fused_qkv.standalone()
