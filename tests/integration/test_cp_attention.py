"""Context-parallel attention against single-process float64 attention: outputs and dQ, dK, dV.

The world-4 spawn covers cp in {1, 2, 4} x {all_gather, p2p} x {MHA, GQA} x {divisible, odd
length} x {one document, packed documents}, block skipping, collective counts, the decode helper
and bad input on several ranks; the world-8 spawn covers tp 2 x cp 4 (heads split over TP, K/V
exchanged over CP). The reference below is plain softmax attention with an explicit
causal-and-same-document mask, written independently of the code under test.
"""
from __future__ import annotations

import itertools

import pytest
import torch

from megatron_ext.layers.attention.attention_math import MaskKind
from megatron_ext.layers.attention.cp_attention import backend_name, context_parallel_attention
from megatron_ext.layers.attention.cp_decode import cp_decode_attention
from megatron_ext.layers.attention.cp_plan import plan_cp_attention
from megatron_ext.parallel.comm_counter import count_collectives
from megatron_ext.data.cp_split import split_batch_for_cp
from megatron_ext.parallel.groups import AxisGroup, build_groups
from megatron_ext.parallel.topology import Topology
from tests.helpers.multirank import run_ranks

TOL = 1e-10
DOCS = {13: [[5, 8], [9, 4]], 16: [[6, 10], [3, 4, 9]]}  # packed documents per row


def reference_attention(q, k, v, seg):
    """Causal attention within documents (``seg [b, s]``), float64, GQA by repetition."""
    g = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(g, 2), v.repeat_interleave(g, 2)
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) / q.shape[-1] ** 0.5
    n = q.shape[1]
    visible = torch.ones(n, n, dtype=torch.bool).tril()[None] & (seg[:, :, None] == seg[:, None])
    s = s.masked_fill(~visible[:, None], float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", s.softmax(-1), v)


def _global_case(seed, b, s, hq, hkv, d, docs):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, s, h, d, generator=gen, dtype=torch.float64)
               for h in (hq, hkv, hkv))
    w = torch.randn(b, s, hq, d, generator=gen, dtype=torch.float64)
    seg = torch.zeros(b, s, dtype=torch.long)
    if docs is not None:
        for i, row in enumerate(docs):
            seg[i] = torch.repeat_interleave(torch.arange(len(row)), torch.tensor(row))
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out = reference_attention(q, k, v, seg)
    (out * w).sum().backward()
    return (q.detach(), k.detach(), v.detach(), w), (out.detach(), q.grad, k.grad, v.grad)


def _localize(t, src):
    """Rows of the global ``t [b, s, ...]`` at source positions ``src [b, L]`` (-1 -> zeros)."""
    out = torch.stack([t[i, src[i].clamp(min=0)] for i in range(t.shape[0])])
    return out * (src >= 0).view(src.shape + (1,) * (t.dim() - 2)).to(t.dtype)


def _run_case(group, cp_rank, cp, strategy, hq, hkv, s, packed, head_slice=None, seed=0):
    """Run one case on this rank; return max abs errors of out, dq, dk, dv (local tokens)."""
    b, d = 2, 8
    docs = DOCS[s] if packed else None
    (q, k, v, w), ref = _global_case(seed, b, s, hq, hkv, d, docs)
    batch = split_batch_for_cp(torch.zeros(b, s, dtype=torch.long), None, cp, cp_rank,
                               doc_lengths=docs)
    src = torch.stack([lay.source[lay.local_slots(cp_rank)] for lay in batch.layouts])
    qs, ks = slice(None), slice(None)
    if head_slice is not None:  # tensor parallel: this rank's heads
        (qa, qe), (ka, ke) = head_slice
        qs, ks = slice(qa, qe), slice(ka, ke)
    ql, kl, vl, wl = (_localize(t, src) for t in (q[:, :, qs], k[:, :, ks], v[:, :, ks],
                                                   w[:, :, qs]))
    ql, kl, vl = (t.clone().requires_grad_() for t in (ql, kl, vl))
    seg = None if (not packed and s % (2 * cp) == 0) else batch.segment_ids
    out = context_parallel_attention(ql, kl, vl, group, token_index=batch.token_index,
                                     segment_ids=seg, strategy=strategy)
    (out * wl).sum().backward()
    ro, rdq, rdk, rdv = ref
    expect = [_localize(ro[:, :, qs], src), _localize(rdq[:, :, qs], src),
              _localize(rdk[:, :, ks], src), _localize(rdv[:, :, ks], src)]
    got = [out.detach(), ql.grad, kl.grad, vl.grad]
    return [(g - e).abs().max().item() for g, e in zip(got, expect)]


def _groups_for_cp(world):
    """``{cp: (AxisGroup, cp_rank)}`` for cp 1, 2, 4 inside a world of 4 (same order on every
    rank: build_groups creates every group collectively)."""
    out = {1: AxisGroup.single("attn_cp")}
    for cp in (2, 4):
        out[cp] = build_groups(Topology(world=world, attn_cp=cp)).attn_cp
    return out


def _world4(rank, world):
    groups = _groups_for_cp(world)
    errors = {}
    for cp, strategy, (hq, hkv), s, packed in itertools.product(
            (1, 2, 4), ("all_gather", "p2p"), ((4, 4), (4, 2)), (16, 13), (False, True)):
        g = groups[cp]
        errors[(cp, strategy, hq, hkv, s, packed)] = _run_case(g, g.rank, cp, strategy, hq, hkv,
                                                               s, packed, seed=s + hkv)
    return {"errors": errors, "skip": _check_skipping(groups[2]),
            "counts": _check_counts(groups[4]), "decode": _check_decode(groups),
            "diagonal": _check_diagonal(groups[2]), "kept": _check_kept_bytes(groups[2]),
            "bad": _check_bad_input(groups[4])}


def _check_skipping(group):
    """cp 2, one document of 16 tokens: rank 0 holds chunks 0 and 3, rank 1 chunks 1 and 2."""
    q = torch.zeros(1, 8, 2, 8, dtype=torch.float64)
    batch = split_batch_for_cp(torch.zeros(1, 16, dtype=torch.long), None, 2, group.rank)
    from megatron_ext.layers.attention.cp_attention import source_calls

    plan = plan_cp_attention(q, q, q, group, token_index=batch.token_index)
    out = {key: [(grp.kind.value, grp.ranges) for grp in groups]
           for key, groups in plan.groups.items()}
    out["calls"] = {src: [(c.q_range, c.group.kind.value, c.group.ranges, c.part)
                          for c in source_calls(plan, src)] for src in range(2)}
    return out


def _check_kept_bytes(group):
    """Bytes autograd keeps for one cp 2 call per strategy (the training estimator counts the
    difference: p2p keeps the K/V its forward ring ended with)."""
    from megatron_ext.layers.attention.cp_attention import context_parallel_attention

    batch = split_batch_for_cp(torch.zeros(1, 16, dtype=torch.long), None, 2, group.rank)
    q = torch.randn(1, 8, 4, 8, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 8, 2, 8, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 8, 2, 8, dtype=torch.float64, requires_grad=True)
    out = {"kv_bytes": 2 * k.numel() * k.element_size()}
    for strategy in ("all_gather", "p2p"):
        seen = {}

        def pack(t):
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            context_parallel_attention(q, k, v, group, token_index=batch.token_index,
                                       strategy=strategy)
        out[strategy] = sum(seen.values())
    return out


def _check_diagonal(group):
    """Which plans run a rank's own K/V as one causal call over its whole local sequence: the
    standard one-document split; not packed documents, nor a rank holding padding."""
    from megatron_ext.layers.attention.cp_attention import diagonal_is_one_causal_block

    out = {}
    for name, s, docs in (("standard", 16, None), ("packed", 16, [[7, 9]]), ("padded", 13, None)):
        batch = split_batch_for_cp(torch.zeros(1, s, dtype=torch.long), None, 2, group.rank,
                                   doc_lengths=docs)
        q = torch.zeros(1, batch.token_index.shape[-1], 2, 8, dtype=torch.float64)
        seg = batch.segment_ids if (docs or s % 4) else None
        plan = plan_cp_attention(q, q, q, group, token_index=batch.token_index, segment_ids=seg)
        out[name] = diagonal_is_one_causal_block(plan)
    return out


def _check_counts(group):
    out = {}
    for strategy in ("all_gather", "p2p"):
        q = torch.randn(1, 4, 2, 8, dtype=torch.float64, requires_grad=True)
        tok = split_batch_for_cp(torch.zeros(1, 16, dtype=torch.long), None, 4,
                                 group.rank).token_index
        with count_collectives() as log:
            o = context_parallel_attention(q, q, q, group, token_index=tok, strategy=strategy)
            o.sum().backward()
        assert {r.axis for r in log.records} == {"attn_cp"}
        out[strategy] = {f"{kind}/{phase}": log.count(kind=kind, phase=phase)
                         for kind in ("all_gather", "reduce_scatter", "send_recv")
                         for phase in ("forward", "backward")}
    return out


def _check_decode(groups):
    """New tokens against a cache spread unevenly over the CP ranks == full attention."""
    res = {}
    for cp in (2, 4):
        g = groups[cp]
        gen = torch.Generator().manual_seed(7)
        b, sq, hq, hkv, d = 2, 3, 4, 2, 8
        lens = [5, 2, 7, 4][:cp]
        q = torch.randn(b, sq, hq, d, generator=gen, dtype=torch.float64)
        k = torch.randn(b, sum(lens), hkv, d, generator=gen, dtype=torch.float64)
        v = torch.randn(b, sum(lens), hkv, d, generator=gen, dtype=torch.float64)
        valid = torch.rand(b, sq, sum(lens), generator=gen) > 0.3
        valid[:, :, 0] = True
        a = sum(lens[:g.rank])
        e = a + lens[g.rank]
        got = cp_decode_attention(q, k[:, a:e], v[:, a:e], g, kv_valid=valid[:, :, a:e])
        ref = _masked_reference(q, k, v, valid)
        got_all = cp_decode_attention(q, k[:, a:e], v[:, a:e], g)
        ref_all = _masked_reference(q, k, v, torch.ones_like(valid))
        res[cp] = max((got - ref).abs().max().item(), (got_all - ref_all).abs().max().item())
    return res


def _masked_reference(q, k, v, valid):
    g = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(g, 2), v.repeat_interleave(g, 2)
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) / q.shape[-1] ** 0.5
    s = s.masked_fill(~valid[:, None], float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", s.softmax(-1), v)


def _expect_error(fn, *needles):
    try:
        fn()
    except ValueError as exc:
        msg = str(exc)
        missing = [n for n in needles if n not in msg]
        return "ok" if not missing else f"message lacks {missing}: {msg}"
    return "no error"


def _check_bad_input(group):
    """Bad input on one rank -> the same ValueError on every rank (never a hang)."""
    r = group.rank
    tok = torch.arange(4) + 4 * r
    q = torch.zeros(1, 4, 4, 8, dtype=torch.float64)
    kv = torch.zeros(1, 4, 2, 8, dtype=torch.float64)
    out = {}
    # rank 1 holds two more tokens than the others
    s = 6 if r == 1 else 4
    out["lengths"] = _expect_error(lambda: context_parallel_attention(
        torch.zeros(1, s, 4, 8, dtype=torch.float64), torch.zeros(1, s, 2, 8, dtype=torch.float64),
        torch.zeros(1, s, 2, 8, dtype=torch.float64), group,
        token_index=torch.arange(s)), "inconsistent", "s_local=6")
    # rank 2's k/v have 3 heads, not a divisor of 4
    kv_bad = torch.zeros(1, 4, 3, 8, dtype=torch.float64) if r == 2 else kv
    out["heads"] = _expect_error(lambda: context_parallel_attention(
        q, kv_bad, kv_bad, group, token_index=tok), "mismatched head counts", "CP rank 2")
    out["decode_heads"] = _expect_error(lambda: cp_decode_attention(
        q, kv_bad, kv_bad, group), "mismatched head counts")
    out["strategy"] = _expect_error(lambda: context_parallel_attention(
        q, kv, kv, group, token_index=tok, strategy="ring"), "strategy")
    # and the group still works afterwards (nobody is stuck in a collective)
    o = context_parallel_attention(q, kv, kv, group, token_index=tok)
    out["after"] = tuple(o.shape)
    return out


def _world8(rank, world):
    pg = build_groups(Topology(world=world, attn_tp=2, attn_cp=4))
    tp, cp = pg.attn_tp, pg.attn_cp
    hq, hkv = 8, 4
    hs = ((tp.rank * hq // 2, (tp.rank + 1) * hq // 2), (tp.rank * hkv // 2,
                                                          (tp.rank + 1) * hkv // 2))
    errors = {}
    for strategy, s, packed in itertools.product(("all_gather", "p2p"), (16, 13), (False, True)):
        errors[(strategy, s, packed)] = _run_case(cp, cp.rank, 4, strategy, hq, hkv, s, packed,
                                                  head_slice=hs, seed=3)
    return errors


# ------------------------------------------------------------------------------------- tests
@pytest.fixture(scope="module")
def world4():
    return run_ranks(_world4, 4, timeout=240)


def test_cp_attention_matches_reference_all_combinations(world4):
    for rank, res in enumerate(world4):
        assert len(res["errors"]) == 3 * 2 * 2 * 2 * 2
        for case, errs in res["errors"].items():
            assert max(errs) < TOL, f"rank {rank} case {case}: out/dq/dk/dv errors {errs}"


def test_cp_attention_skips_fully_masked_blocks(world4):
    # the fused diagonal call only where a rank's local tokens are real and in global order: a
    # padded split of 13 tokens pads chunk 3 (rank 0's), rank 1's chunks 1, 2 are whole
    assert world4[0]["diagonal"] == {"standard": True, "packed": False, "padded": False}
    assert world4[1]["diagonal"] == {"standard": True, "packed": False, "padded": True}
    full, causal = MaskKind.FULL.value, MaskKind.CAUSAL.value
    calls = {k: world4[r]["skip"].pop("calls") for r, k in ((0, "r0"), (1, "r1"))}
    # rank 0: chunk 0 sees only itself; chunk 3 sees chunk 0 (own part 0), chunks 1, 2 (rank 1)
    assert world4[0]["skip"] == {
        (0, 0): [(causal, ((0, 4),))], (0, 1): [],
        (1, 0): [(full, ((0, 4),)), (causal, ((4, 8),))], (1, 1): [(full, ((0, 8),))]}
    # rank 1: chunk 1 sees chunk 0 and itself; chunk 2 sees chunk 0, chunk 1 and itself
    assert world4[1]["skip"] == {
        (0, 0): [(full, ((0, 4),))], (0, 1): [(causal, ((0, 4),))],
        (1, 0): [(full, ((0, 4),))], (1, 1): [(full, ((0, 4),)), (causal, ((4, 8),))]}
    # kernel calls: own K/V = one causal call over all 8 local tokens on both ranks; rank 0's
    # chunk 3 against both of rank 1's chunks (one part); rank 1's two chunks both see all of
    # chunk 0: one call of all 8 queries against it, not one per chunk
    assert calls["r0"] == {0: [((0, 8), causal, ((0, 8),), None)],
                           1: [((4, 8), full, ((0, 8),), 1)]}
    assert calls["r1"] == {0: [((0, 8), full, ((0, 4),), None)],
                           1: [((0, 8), causal, ((0, 8),), None)]}


def test_p2p_keeps_one_more_local_kv_than_all_gather(world4):
    for res in world4:
        kept = res["kept"]
        assert kept["p2p"] - kept["all_gather"] == kept["kv_bytes"], kept


def test_cp_attention_collective_counts(world4):
    for res in world4:
        ag, p2p = res["counts"]["all_gather"], res["counts"]["p2p"]
        # header + token/segment indices + K/V; backward: K/V again, then dK/dV reduce-scatter
        assert ag == {"all_gather/forward": 3, "all_gather/backward": 1,
                      "reduce_scatter/forward": 0, "reduce_scatter/backward": 1,
                      "send_recv/forward": 0, "send_recv/backward": 0}
        # cp=4 ring: 3 K/V steps forward; backward from the K/V the forward ended with: 2 K/V steps
        # + 3 dK/dV hops
        assert p2p == {"all_gather/forward": 2, "all_gather/backward": 0,
                       "reduce_scatter/forward": 0, "reduce_scatter/backward": 0,
                       "send_recv/forward": 3, "send_recv/backward": 5}


def test_cp_decode_matches_full_cache_attention(world4):
    for res in world4:
        for cp, err in res["decode"].items():
            assert err < TOL, f"decode cp={cp}: error {err}"


def test_cp_attention_bad_input_raises_on_every_rank(world4):
    for rank, res in enumerate(world4):
        bad = res["bad"]
        for key in ("lengths", "heads", "decode_heads", "strategy"):
            assert bad[key] == "ok", f"rank {rank} {key}: {bad[key]}"
        assert bad["after"] == (1, 4, 4, 8)


def test_cp_attention_tp2_cp4_eight_ranks():
    results = run_ranks(_world8, 8, timeout=240)
    for rank, errors in enumerate(results):
        assert len(errors) == 8
        for case, errs in errors.items():
            assert max(errs) < TOL, f"rank {rank} case {case}: out/dq/dk/dv errors {errs}"


def test_single_process_is_plain_causal_attention():
    """A one-rank group: no collectives, token_index optional, float64 exact, GQA."""
    (q, k, v, w), (ro, rdq, rdk, rdv) = _global_case(1, 2, 11, 6, 2, 8, None)
    q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
    with count_collectives() as log:
        out = context_parallel_attention(q, k, v, AxisGroup.single("attn_cp"))
        (out * w).sum().backward()
    assert len(log) == 0
    for got, ref in ((out, ro), (q.grad, rdq), (k.grad, rdk), (v.grad, rdv)):
        assert (got - ref).abs().max().item() < TOL


def test_single_process_local_errors():
    g = AxisGroup.single("attn_cp")
    q = torch.zeros(1, 4, 4, 8)
    with pytest.raises(ValueError, match="mismatched head counts"):
        context_parallel_attention(q, torch.zeros(1, 4, 3, 8), torch.zeros(1, 4, 3, 8), g)
    with pytest.raises(ValueError, match="do not match q"):
        context_parallel_attention(q, torch.zeros(1, 5, 2, 8), torch.zeros(1, 5, 2, 8), g)
    with pytest.raises(ValueError, match="token_index shape"):
        context_parallel_attention(q, q, q, g, token_index=torch.arange(5))
    with pytest.raises(ValueError, match="backend"):
        context_parallel_attention(q, q, q, g, backend="flash")


def test_backend_selection_reports_torch_without_te():
    q = torch.zeros(1, 4, 2, 8)
    assert backend_name() == "torch"
    assert backend_name(q) == "torch"
    with pytest.raises(ValueError, match="backend='te' is not usable"):
        context_parallel_attention(q, q, q, AxisGroup.single("attn_cp"), backend="te")


def test_block_math_split_and_merge_equals_one_block():
    """Two key blocks merged by log-sum-exp == one block; block backward (given the final out
    and lse) summed over blocks == autograd of the reference; queries seeing nothing give 0."""
    from megatron_ext.layers.attention.attention_math import block_backward, block_forward, merge_partial

    gen = torch.Generator().manual_seed(5)
    b, sq, sk, hq, hkv, d = 2, 6, 9, 4, 2, 8
    q = torch.randn(b, sq, hq, d, generator=gen, dtype=torch.float64, requires_grad=True)
    k = torch.randn(b, sk, hkv, d, generator=gen, dtype=torch.float64, requires_grad=True)
    v = torch.randn(b, sk, hkv, d, generator=gen, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(b, sq, sk, generator=gen) > 0.4
    mask[0, 2] = False  # a query that sees nothing
    mask[1, 3] = True
    scale = d ** -0.5
    ks, vs = k.repeat_interleave(2, 2), v.repeat_interleave(2, 2)
    s = torch.einsum("bqhd,bkhd->bhqk", q, ks) * scale
    p = torch.nan_to_num(s.masked_fill(~mask[:, None], float("-inf")).softmax(-1))
    ref = torch.einsum("bhqk,bkhd->bqhd", p, vs)
    dout = torch.randn(ref.shape, generator=gen, dtype=torch.float64)
    (ref * dout).sum().backward()
    cut = 4
    o1, l1, _ = block_forward(q, k[:, :cut], v[:, :cut], scale, MaskKind.GENERAL, mask[..., :cut])
    o2, l2, _ = block_forward(q, k[:, cut:], v[:, cut:], scale, MaskKind.GENERAL, mask[..., cut:])
    out, lse = merge_partial(*merge_partial(None, None, o1, l1), o2, l2)
    assert (out - ref).abs().max() < TOL
    assert torch.isinf(lse[0, :, 2]).all() and (out[0, 2] == 0).all()
    g1 = block_backward(dout, q, k[:, :cut], v[:, :cut], out, lse, scale, MaskKind.GENERAL,
                        mask[..., :cut])
    g2 = block_backward(dout, q, k[:, cut:], v[:, cut:], out, lse, scale, MaskKind.GENERAL,
                        mask[..., cut:])
    assert (g1[0] + g2[0] - q.grad).abs().max() < TOL
    assert (torch.cat([g1[1], g2[1]], 1) - k.grad).abs().max() < TOL
    assert (torch.cat([g1[2], g2[2]], 1) - v.grad).abs().max() < TOL
