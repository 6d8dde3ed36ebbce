"""The CUDA fast paths (Triton RMSNorm, SwiGLU, vocab-parallel cross-entropy, MoE gather/combine;
cuDNN/flash attention) against the CPU reference path in float64 on the same bf16 inputs:
forward and gradients. Marked ``gpu``: skipped on machines without CUDA (run with
``pytest -m gpu`` on a GPU machine)."""
from __future__ import annotations

import contextlib
import copy
from unittest import mock

import pytest
import torch
import torch.nn.functional as F

from megatron_ext.layers.cross_entropy import vocab_parallel_cross_entropy
from megatron_ext.layers.attention.cp_attention import context_parallel_attention
from megatron_ext.layers.mlp import swiglu
from megatron_ext.layers.moe import MoELayer
from megatron_ext.layers.norm import rms_norm, rms_norm_reference
from megatron_ext.parallel.groups import AxisGroup, ParallelGroups

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
BF16 = torch.bfloat16


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _inputs(*shapes, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(scale * torch.randn(s, generator=g)).to(BF16) for s in shapes]


def _both(fn, cpu_inputs, grad_out_shape=None):
    """Run ``fn`` on CUDA bf16 and on CPU float64 copies of the same values; return
    (outputs, input grads) for each."""
    results = []
    for device, dtype in (("cuda", BF16), ("cpu", torch.float64)):
        xs = [t.to(device=device, dtype=dtype).requires_grad_() for t in cpu_inputs]
        out = fn(*xs)
        g = torch.Generator().manual_seed(7)
        gout = torch.randn(out.shape, generator=g).to(device=device, dtype=out.dtype)
        (out * gout).sum().backward()
        results.append((out, [x.grad for x in xs]))
    return results


def test_triton_rms_norm_matches_float64():
    x, w = _inputs((300, 2048), (2048,))
    w = (1 + 0.1 * w.float()).to(BF16)
    assert torch.cuda.is_available()
    (o_gpu, g_gpu), (o_ref, g_ref) = _both(
        lambda a, b: rms_norm(a, b, 1e-6) if a.is_cuda else rms_norm_reference(a, b, 1e-6), [x, w])
    assert _rel(o_gpu, o_ref) < 1e-2
    assert _rel(g_gpu[0], g_ref[0]) < 1e-2 and _rel(g_gpu[1], g_ref[1]) < 1e-2


def test_triton_swiglu_matches_float64():
    gate, up = _inputs((257, 768), (257, 768), seed=1)
    (o_gpu, g_gpu), (o_ref, g_ref) = _both(swiglu, [gate, up])
    assert _rel(o_gpu, o_ref) < 1e-2
    assert all(_rel(a, b) < 1e-2 for a, b in zip(g_gpu, g_ref))


def test_triton_weighted_swiglu_matches_torch_path_and_float64():
    """The routed experts' activation: Triton kernels (bf16, fp32 and bf16 row weights, rows wider
    than one backward block) against the torch path on the same CUDA tensors (the same rounding
    steps: all but a few bits equal) and against float64."""
    from megatron_ext.layers import weighted_swiglu as ws

    gate, up, dout = _inputs((300, 1500), (300, 1500), (300, 1500), seed=9)
    for w_dtype in (torch.float32, BF16):
        w = torch.rand(300, generator=torch.Generator().manual_seed(10)).to(w_dtype)
        args = [t.cuda() for t in (gate, up, w)]
        assert ws._use_triton(args[0])
        fast = [ws._forward_triton(*args), *ws._backward_triton(*args, dout.cuda())]
        plain = [ws._forward_torch(*args), *ws._backward_torch(*args, dout.cuda())]
        wide = [t.double() for t in (gate, up, w)]
        ref = [ws._forward_torch(*wide), *ws._backward_torch(*wide, dout.double())]
        for name, a, b, r in zip(("out", "dgate", "dup", "dw"), fast, plain, ref):
            if name != "dw":
                assert float((a != b).float().mean()) < 1e-3, (w_dtype, name)
            assert _rel(a, b) < 1e-3, (w_dtype, name)
            assert _rel(a, r) < 1e-2, (w_dtype, name)


def test_triton_cross_entropy_matches_float64():
    (logits,) = _inputs((64, 32000), scale=3.0, seed=2)
    labels = torch.randint(0, 32000, (64,), generator=torch.Generator().manual_seed(3))
    labels[::7] = -100
    single = AxisGroup.single("attn_tp")

    def loss(lg):
        if lg.is_cuda:
            return vocab_parallel_cross_entropy(lg, labels.cuda(), single)
        return F.cross_entropy(lg, labels, reduction="none", ignore_index=-100)

    (o_gpu, g_gpu), (o_ref, g_ref) = _both(loss, [logits])
    assert _rel(o_gpu, o_ref) < 1e-2 and _rel(g_gpu[0], g_ref[0]) < 2e-2
    assert torch.all(o_gpu[::7] == 0)


def test_cuda_attention_kernels_match_float64():
    """cuDNN (long causal blocks) and flash paths of the single-rank attention, GQA."""
    single = AxisGroup.single("attn_cp")
    for s in (1024, 77):
        q, k, v = _inputs((2, s, 8, 128), (2, s, 2, 128), (2, s, 2, 128), seed=s)
        index = torch.arange(s).expand(2, s)

        def attn(q_, k_, v_):
            return context_parallel_attention(q_, k_, v_, single, token_index=index.to(q_.device))

        (o_gpu, g_gpu), (o_ref, g_ref) = _both(attn, [q, k, v])
        assert _rel(o_gpu, o_ref) < 2e-2, s
        assert all(_rel(a, b) < 3e-2 for a, b in zip(g_gpu, g_ref)), s


def test_moe_layer_cuda_path_matches_float64(monkeypatch):
    """Gather-based dispatch/combine (Triton) + grouped GEMM in bf16 against (a) the same bf16
    layer with the torch-ops dispatch (rounding-level agreement) and (b) the CPU float64 path, where
    its error may be no worse than the torch-ops bf16 path's own (bf16 routing sensitivity)."""
    from megatron_ext.layers.moe import dispatch

    groups = ParallelGroups.single_process()
    layers = {}
    for key, device, dtype in (("triton", "cuda", BF16), ("torch", "cuda", BF16),
                               ("ref", "cpu", torch.float64)):
        layers[key] = MoELayer(256, 8, 2, 128, groups, norm_topk_prob=True,
                               shared_expert_intermediate_size=256, shared_expert_gate=True,
                               dtype=dtype, device=device)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p_ref in layers["ref"].named_parameters():
            scale = 3.0 if name.endswith("gate.weight") and "shared" not in name else 0.1
            value = (torch.randn(p_ref.shape, generator=g) * scale).to(BF16)
            p_ref.copy_(value.double())
            for key in ("triton", "torch"):
                dict(layers[key].named_parameters())[name].copy_(value)
    (x,) = _inputs((500, 256), seed=6)
    gout = torch.randn(500, 256, generator=torch.Generator().manual_seed(8))
    outs = {}
    for key, layer in layers.items():
        if key == "torch":
            monkeypatch.setattr(dispatch, "_triton_applies", lambda rows: False)
        p = next(layer.parameters())
        xi = x.to(device=p.device, dtype=p.dtype).requires_grad_()
        out = layer(xi)[0]
        (out * gout.to(device=p.device, dtype=p.dtype)).sum().backward()
        outs[key] = [out, xi.grad] + [q.grad for q in layer.parameters()]
        monkeypatch.undo()
    names = ["output", "input grad"] + [n for n, _ in layers["ref"].named_parameters()]
    for name, fast, plain, ref in zip(names, outs["triton"], outs["torch"], outs["ref"]):
        assert _rel(fast, plain) < 1e-2, name
        assert _rel(fast, ref) <= 1.5 * _rel(plain, ref) + 1e-3, name


@pytest.mark.parametrize("b,hq,hkv,d,sk", [(4, 32, 4, 128, 3000), (64, 8, 8, 64, 513),
                                           (2, 16, 2, 128, 40000), (256, 8, 4, 128, 600)])
def test_split_k_decode_attention_matches_float64(b, hq, hkv, d, sk):
    """The Triton flash-decoding kernel (bf16 cache, several splits — or one, without the merge
    kernel: 256 rows —, masked slots, a row that sees nothing) against the float64 composition
    on the same values: out and log-sum-exp."""
    import math

    from megatron_ext.layers.attention import cp_decode

    g = torch.Generator().manual_seed(b + sk)
    q, k, v = (torch.randn(shape, generator=g).to(BF16)
               for shape in ((b, 1, hq, d), (b, hkv, sk, d), (b, hkv, sk, d)))
    valid = torch.rand(b, sk, generator=g) > 0.2
    valid[:, sk // 4: sk // 2] = False
    valid[0] = False
    scale = 1 / math.sqrt(d)
    assert cp_decode._triton_applies(q.cuda(), k.cuda(), v.cuda())
    packed = cp_decode.triton_decode_packed(q.cuda(), k.cuda(), v.cuda(), valid.cuda()[:, None],
                                            scale)
    out, lse = packed[..., :-1], packed[..., -1].transpose(1, 2)
    ref_out, ref_lse = cp_decode.partial_decode_attention(
        q.double(), k.double(), v.double(), valid[:, None], scale)
    seen = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse.cpu()), seen)
    assert _rel(out[1:], ref_out[1:]) < 1e-2 and float(out[0].abs().max()) == 0.0
    assert float((lse.cpu().double()[seen] - ref_lse[seen]).abs().max()) < 1e-2


def test_cp_partials_merge_kernel_matches_torch():
    """The one-kernel log-sum-exp merge of CP ranks' packed decode partials (a rank that saw
    nothing, a query nobody saw) against the torch composition, float64 reference values."""
    from megatron_ext.layers.attention.cp_decode import merge_cp_partials

    g = torch.Generator().manual_seed(5)
    parts = torch.randn(2, 16, 1, 8, 129, generator=g)
    parts[..., 128] = 3 * torch.randn(2, 16, 1, 8, generator=g)
    parts[0, 3, 0, :, 128] = float("-inf")
    parts[:, 5, 0, 2, 128] = float("-inf")
    parts[:, 5, 0, 2, :128] = 0
    want = merge_cp_partials(parts.double(), torch.float64, use_kernel=False)
    got = merge_cp_partials(parts.cuda(), BF16, use_kernel=True)
    assert got.dtype == BF16 and got.shape == want.shape
    assert _rel(got, want) < 1e-2 and float(got[5, 0, 2].abs().max()) == 0.0


def test_cp_block_merge_kernel_matches_float64():
    """The one-pass log-sum-exp merge of two CP attention blocks (strided views, a float32
    accumulator, -inf where a block or both saw nothing), into float32 and straight into a bf16
    output, against the torch composition in float64."""
    from megatron_ext.layers.attention.attention_math import merge_partial

    g = torch.Generator().manual_seed(3)
    acc = torch.randn(2, 6, 16, 128, generator=g)
    big = torch.randn(2, 9, 16, 128, generator=g)
    la = 3 * torch.randn(2, 16, 9, generator=g)
    lb = 3 * torch.randn(2, 16, 6, generator=g)
    la[0, 1, 3], lb[1, 2, 4] = float("-inf"), float("-inf")
    la[1, 5, 2 + 3], lb[1, 5, 3] = float("-inf"), float("-inf")  # token 3: nothing seen
    want_o, want_l = merge_partial(acc.double(), la[..., 2:8].double(), big[:, 1:7].double(),
                                   lb.double())
    cu = [t.cuda() for t in (acc, big, la, lb)]
    got_o, got_l = merge_partial(cu[0], cu[2][..., 2:8], cu[1][:, 1:7].to(BF16), cu[3])
    want_b = merge_partial(acc.double(), la[..., 2:8].double(),
                           big[:, 1:7].to(BF16).double(), lb.double())[0]
    assert got_o.dtype == torch.float32 and _rel(got_o, want_b) < 1e-6
    assert torch.equal(torch.isinf(got_l.cpu()), torch.isinf(want_l))
    fin = torch.isfinite(want_l)
    assert float((got_l.cpu().double() - want_l)[fin].abs().max()) < 1e-5
    into = torch.empty(2, 8, 16, 128, device="cuda", dtype=BF16)
    out, _ = merge_partial(cu[0], cu[2][..., 2:8], cu[1][:, 1:7].to(BF16), cu[3],
                           into=into[:, 1:7])
    assert out.data_ptr() == into[:, 1:7].data_ptr() and _rel(out, want_b) < 1e-2
    assert float(out[1, 3, 5].abs().max()) == 0.0


def test_fused_rotary_matches_float64_in_inference():
    """The one-pass RoPE kernel (no-grad CUDA half precision) against the float64 composition,
    and autograd still takes the composition (the kernel has no backward)."""
    from megatron_ext.layers.rope import RotaryEmbedding, _fused_applies, apply_rotary

    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 17, 8, 128, generator=g).to(BF16)
    pos = torch.randint(0, 5000, (3, 17), generator=g)
    rope = RotaryEmbedding(128, 1e6)
    cos, sin = rope(pos, dtype=torch.float64)
    want = apply_rotary(x.double(), cos, sin)
    cos_c, sin_c = (t.to(BF16).cuda() for t in (cos, sin))
    with torch.no_grad():
        assert _fused_applies(x.cuda(), cos_c, sin_c)
        got = apply_rotary(x.cuda(), cos_c, sin_c)
    assert got.dtype == BF16 and _rel(got, want) < 1e-2
    xg = x.cuda().requires_grad_()
    assert not _fused_applies(xg, cos_c, sin_c)
    apply_rotary(xg, cos_c, sin_c).sum().backward()
    assert xg.grad is not None


@pytest.mark.parametrize("qk_norm", [True, False], ids=["qk-norm", "no-norm"])
def test_fused_qkv_decode_pass_matches_the_separate_kernels(qk_norm):
    """The decode step's fused q/k/v GEMM + norm/RoPE/cache-write pass against the separate
    projections, Triton RMSNorm, fused rotary and cache append on the GPU (same rounding points:
    within one bf16 ulp), and against float64 on the CPU; the projections' weights end up as
    views of the fused buffer with their values unchanged."""
    from megatron_ext.layers.attention.block import AttentionBlock
    from megatron_ext.layers.rope import apply_rotary
    from megatron_ext.serving.kv_cache import KVCache

    groups = ParallelGroups.single_process()
    torch.manual_seed(0)
    blk = AttentionBlock(256, 16, 4, 64, groups, qk_norm=qk_norm, dtype=BF16,
                         device="cuda").eval()
    with torch.no_grad():
        for p in blk.parameters():
            p.normal_(0, 0.2)
    before = {n: p.detach().clone() for n, p in blk.named_parameters()}
    b = 5
    x = torch.randn(b, 1, 256, device="cuda", dtype=BF16)
    prefill = torch.randn(b, 7, 4, 64, device="cuda", dtype=BF16)
    pos = torch.full((b, 1), 7, device="cuda")
    results = []
    for fused in (True, False):
        cache = KVCache(groups.attn_cp, b, 7, 3, device="cuda")
        layer = cache.layer(0)
        layer.store(prefill, -prefill)
        cache.start_decoding()
        cos, sin = blk._rotary(pos, BF16, None, None)
        with torch.no_grad():
            if fused:
                assert blk.fused_qkv.applies(x, 1, 64)
                q = blk.fused_qkv.decode(x, cos, sin, 16, 4, 64, layer)
                k_all, v_all, _ = layer.appended()
            else:
                q = blk.q_proj(x).view(b, 1, 16, 64)
                k = blk.k_proj(x).view(b, 1, 4, 64)
                v = blk.v_proj(x).view(b, 1, 4, 64)
                if qk_norm:
                    q, k = blk.q_norm(q), blk.k_norm(k)
                q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
                k_all, v_all, _ = layer.append(k, v)
        results.append((q.clone(), k_all.clone(), v_all.clone()))
    assert blk.fused_qkv._fused()
    for n, p in blk.named_parameters():
        assert torch.equal(p, before[n]), n
    for got, want in zip(*results):
        ulp = 2 ** -7 * want.float().abs().clamp_min(2 ** -10)
        assert ((got.float() - want.float()).abs() <= ulp).all()
    # float64 reference of q (the projections, norm and rotation in float64)
    w = {n: p.double().cpu() for n, p in blk.named_parameters()}
    x64 = x.double().cpu().view(b, 256)
    q64 = (x64 @ w["q_proj.weight"].T).view(b, 16, 64)
    if qk_norm:
        q64 = q64 * torch.rsqrt(q64.pow(2).mean(-1, keepdim=True) + blk.q_norm.eps) \
            * w["q_norm.weight"]
    c, s = cos.double().cpu().view(b, 1, 64), sin.double().cpu().view(b, 1, 64)
    q64 = q64 * c + torch.cat([-q64[..., 32:], q64[..., :32]], -1) * s
    assert _rel(results[0][0].view(b, 16, 64), q64) < 1e-2


# ------------------------------------------------- fused decode experts (layers/moe/decode_experts)
@contextlib.contextmanager
def _fused_decode(on: bool):
    """The MoE layer's fused decode path switched on (as its predicate says) or off (the gather +
    grouped GEMMs + weighted SwiGLU path)."""
    from megatron_ext.layers.moe import decode_experts

    real = decode_experts.fused_experts_apply
    with mock.patch.object(decode_experts, "fused_experts_apply",
                           lambda *args: on and real(*args)):
        yield


def _decode_rows(num_local: int, tokens: int, seed: int, big: int = 37, past: int = 13):
    """Rows grouped by local expert: a third of the experts get none, one gets ``big`` (three
    BLOCK_M chunks), the rest 1-4; then ``past`` rows past the groups (a fixed-size dispatch)
    whose token index is far out of range, so reading them would fault."""
    g = torch.Generator().manual_seed(seed)
    counts = torch.randint(1, 5, (num_local,), generator=g)
    counts[::3] = 0
    counts[num_local // 2 + 1] = big
    valid = int(counts.sum())
    token_index = torch.cat([torch.randint(0, tokens, (valid,), generator=g),
                             torch.full((past,), 10**9)])
    return counts, token_index, valid


def check_fused_decode_experts(num_local: int, inter: int, hidden: int, dtype: torch.dtype,
                               weighted: bool, device: str = "cuda", big: int = 37) -> None:
    """``RoutedExperts.forward_tokens`` (two fused kernels) against ``forward`` on the gathered
    rows (grouped GEMMs on CUDA bf16, the matmul loop for fp16) and float64: the same rounding
    steps, so rounding-level agreement; the activation alone equals the float64 projections
    rounded to ``dtype`` then weighted-SwiGLU'd in all but a few elements. ``big``: the rows of
    the one big expert (several chunks; enough of them make the kernels take 32-row chunks)."""
    from megatron_ext.layers.moe.decode_experts import block_rows, gate_up_act
    from megatron_ext.layers.moe.experts import RoutedExperts
    from megatron_ext.layers.weighted_swiglu import _forward_torch

    torch.manual_seed(num_local + inter)
    experts = RoutedExperts(num_local, hidden, inter, ParallelGroups.single_process(),
                            dtype=dtype, device=device)
    wide = copy.deepcopy(experts).double()
    tokens = 64
    counts, token_index, valid = (t.to(device) if isinstance(t, torch.Tensor) else t
                                  for t in _decode_rows(num_local, tokens, seed=inter, big=big))
    x = torch.randn(tokens, hidden, device=device).to(dtype)
    w = torch.rand(token_index.numel(), device=device).to(dtype) if weighted else None
    rows, w_valid = x[token_index[:valid]], None if w is None else w[:valid]
    block_m = block_rows(token_index.numel(), num_local)
    assert big > 2 * block_m     # the big expert walks three chunks or more
    with torch.no_grad():
        assert experts.fused_decode_applies(x, token_index.numel())
        fused = experts.forward_tokens(x, token_index, counts, w)[:valid]
        act = gate_up_act(x, token_index, counts, w, experts.gate_proj, experts.up_proj)[:valid]
        plain = experts(rows, counts, w_valid)
        ref = wide(rows.double(), counts.cpu(), None if w is None else w_valid.double())
        # the activation: float64 GEMMs rounded to dtype, then the weighted SwiGLU's rounding
        sizes = counts.tolist()
        gate = torch.cat([r @ g.T for r, g in zip(rows.double().split(sizes), wide.gate_proj)])
        up = torch.cat([r @ u.T for r, u in zip(rows.double().split(sizes), wide.up_proj)])
        ones = torch.ones(valid, device=device, dtype=dtype)
        want = _forward_torch(gate.to(dtype), up.to(dtype), ones if w is None else w_valid)
    assert fused.dtype == dtype and _rel(fused, plain) < 5e-3
    assert _rel(fused, ref) <= 1.5 * _rel(plain, ref) + 1e-4
    assert (act != want).float().mean() < 0.02 and _rel(act, want) < 2e-3


@pytest.mark.parametrize("num_local,inter,hidden,big", [(128, 384, 2048, 37), (64, 768, 2048, 37),
                                                        (8, 40, 72, 37), (8, 40, 72, 90)])
@pytest.mark.parametrize("dtype", [BF16, torch.float16])
def test_fused_decode_experts_match_grouped_gemms_and_float64(num_local, inter, hidden, big,
                                                              dtype):
    """16-row chunks, and 32-row ones (``big`` 90: ~13 rows per expert on average)."""
    for weighted in (True, False):
        check_fused_decode_experts(num_local, inter, hidden, dtype, weighted, big=big)


def check_fused_decode_moe_layer(dtype: torch.dtype, device: str = "cuda") -> None:
    """A decode-sized MoE layer forward without grad, fused path vs the gather + grouped GEMM
    path: the whole layer (every expert local) and each rank of moe_ep 2 (with the fixed-size
    dispatch a captured step uses) and of moe_tp 2, built from the same weights."""
    from megatron_ext.layers.moe import moe_layer
    from megatron_ext.parallel.param_meta import get_spec
    from megatron_ext.parallel.topology import Topology

    hidden, experts, top_k, inter, tokens = 256, 16, 4, 96, 24
    torch.manual_seed(1)
    full = MoELayer(hidden, experts, top_k, inter, ParallelGroups.single_process(),
                    norm_topk_prob=True, dtype=dtype, device=device)
    with torch.no_grad():
        full.gate.weight.normal_(0, 0.5)
    x = torch.randn(tokens, hidden, device=device).to(dtype)
    layers = [(full, False)]
    for ep, tp in ((2, 1), (1, 2)):
        for rank in range(2):
            groups = ParallelGroups.without_process_groups(
                Topology(world=2, moe_ep=ep, moe_tp=tp, moe_dp=1), rank)
            part = MoELayer(hidden, experts, top_k, inter, groups, norm_topk_prob=True,
                            dtype=dtype, device=device)
            with torch.no_grad():
                for p, q in zip(part.parameters(), full.parameters()):
                    p.copy_(get_spec(p).take_local(q))
            layers.append((part, ep > 1))
    sums = {}
    with torch.no_grad():
        for layer, partial in layers:
            assert layer.experts.fused_decode_applies(x, tokens * top_k)
            outs = []
            for on in (True, False):
                with _fused_decode(on), mock.patch.object(moe_layer, "_capturing",
                                                         lambda _x: partial):
                    outs.append(layer(x, with_stats=False).hidden)
            assert _rel(outs[0], outs[1]) < 5e-3
            key = "full" if layer is full else ("ep" if partial else "tp")
            sums[key] = sums.get(key, 0) + outs[0].double()
    assert _rel(sums["ep"], sums["full"]) < 5e-3 and _rel(sums["tp"], sums["full"]) < 5e-3


@pytest.mark.parametrize("dtype", [BF16, torch.float16])
def test_fused_decode_experts_in_moe_layer(dtype):
    check_fused_decode_moe_layer(dtype)


def test_fused_decode_experts_capture_in_a_cuda_graph():
    """A moe_ep 2 rank's decode forward captured in a CUDA graph (fixed-size dispatch, counts on
    the device, no host sync) replays to the eager fused result; new inputs copied in change it
    as eager does (the same rows summed in the same order: equal bits)."""
    from megatron_ext.parallel.topology import Topology

    groups = ParallelGroups.without_process_groups(Topology(world=2, moe_ep=2, moe_dp=1), 1)
    layer = MoELayer(2048, 128, 8, 384, groups, dtype=BF16, device="cuda")
    static = torch.randn(64, 2048, device="cuda").to(BF16)
    with torch.no_grad():
        eager = layer(static, with_stats=False).hidden
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            layer(static, with_stats=False)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = layer(static, with_stats=False).hidden
        for _ in range(2):
            graph.replay()
            torch.cuda.synchronize()
            assert torch.equal(out, eager)
            static.copy_(torch.randn_like(static, dtype=torch.float32).to(BF16))
            eager = layer(static, with_stats=False).hidden


# ------------------------------------------------------------ MoE routing kernels (issue 16)
ROUTE_TOKENS, ROUTE_EXPERTS, ROUTE_TOP_K = (1, 7, 64, 256, 1024), (8, 60, 128), (1, 2, 8)


def _dispatch_modes(num_experts: int):
    """``(first_expert, num_local, fixed_size)`` of the kernel's two modes: a rank holding every
    expert, and every rank's share under moe_ep 2 and 4 during a capture (``fixed_size``)."""
    yield 0, num_experts, False
    for ep in (2, 4):
        if num_experts % ep == 0:
            share = num_experts // ep
            for r in range(ep):
                yield r * share, share, True


def check_align_kernel(tokens: int, num_experts: int, top_k: int, device: str) -> int:
    """:func:`local_dispatch` (the kernel where it applies) against its torch path on the same
    expert ids (each token's ``top_k`` distinct experts, as a router picks them): every field
    bit-identical, same dtypes. Returns the number of dispatches compared."""
    from dataclasses import fields

    from megatron_ext.layers.moe.dispatch import LocalAssignments, local_dispatch

    g = torch.Generator().manual_seed(tokens * 1000 + num_experts * 10 + top_k)
    experts = torch.rand(tokens, num_experts, generator=g).topk(top_k, dim=-1).indices
    experts = experts.to(device)
    done = 0
    for first, num_local, fixed in _dispatch_modes(num_experts):
        got = local_dispatch(experts, first, num_local, num_experts, fixed_size=fixed)
        want = local_dispatch(experts, first, num_local, num_experts, fixed_size=fixed,
                              use_kernel=False)
        for f in fields(LocalAssignments):
            a, b = getattr(got, f.name), getattr(want, f.name)
            case = (tokens, num_experts, top_k, first, num_local, f.name)
            assert (a is None) == (b is None), case
            if b is not None:
                assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), case
        done += 1
    return done


def _ulps(a: torch.Tensor, b: torch.Tensor) -> int:
    """Largest distance in units in the last place between same-signed floats ``a`` and ``b``."""
    as_int = {torch.float32: torch.int32, torch.bfloat16: torch.int16,
              torch.float16: torch.int16}[a.dtype]
    return int((a.view(as_int).long() - b.view(as_int).long()).abs().max())


def check_top_k_kernel(tokens: int, num_experts: int, top_k: int, dtype: torch.dtype,
                       device: str, max_ulps: int = 1) -> None:
    """The fused top-k softmax against the router's torch path, with and without
    ``norm_topk_prob``, on (a) rows of distinct logits (no near-ties): equal experts, weights
    within ``max_ulps``; (b) normal logits (bf16 has exact ties): the kernel's experts are a
    top-k of torch's probabilities (where they differ, torch's probabilities there are equal)
    and the weights agree as in (a)."""
    from megatron_ext.layers.moe.fused_routing import fused_top_k_softmax
    from megatron_ext.layers.moe.router import top_k_softmax

    g = torch.Generator().manual_seed(tokens + num_experts + top_k)
    distinct = torch.stack([torch.randperm(num_experts, generator=g)
                            for _ in range(tokens)]).sub(num_experts // 2).div(8)
    normal = 2 * torch.randn(tokens, num_experts, generator=g)
    for kind, logits in (("distinct", distinct), ("normal", normal)):
        logits = logits.to(device=device, dtype=dtype)
        for norm in (False, True):
            case = (kind, tokens, num_experts, top_k, dtype, norm)
            weights, experts = fused_top_k_softmax(logits, top_k, norm)
            probs, want_w, want_e = top_k_softmax(logits, top_k, norm)
            assert weights.dtype == dtype and experts.dtype == torch.int64, case
            assert weights.shape == experts.shape == (tokens, top_k), case
            if kind == "distinct":
                assert torch.equal(experts, want_e), case
            else:
                assert torch.equal(probs.gather(1, experts), probs.gather(1, want_e)), case
                ordered = experts.sort(1).values
                assert bool((ordered[:, 1:] != ordered[:, :-1]).all()), case
            assert _ulps(weights, want_w) <= max_ulps, case


def test_moe_align_kernel_equals_torch_dispatch():
    """Issue 16: the one-launch counting sort == the torch sort/searchsorted/scatter dispatch,
    bit for bit, for both modes (all experts here; a capture's ``fixed_size`` share)."""
    from megatron_ext.layers.moe.fused_routing import align_kernel_applies

    assert align_kernel_applies(torch.zeros(1024, 8, dtype=torch.int64, device="cuda"), 128)
    done = sum(check_align_kernel(t, e, k, "cuda") for t in ROUTE_TOKENS
               for e in ROUTE_EXPERTS for k in ROUTE_TOP_K if k <= e)
    assert done == len(ROUTE_TOKENS) * len(ROUTE_EXPERTS) * len(ROUTE_TOP_K) * (1 + 2 + 4)


def test_moe_top_k_kernel_matches_torch_router():
    """Issue 16: the fused top-k softmax == the router's torch path (experts equal without
    near-ties, weights within one unit in the last place), bf16/fp16/fp32 logits."""
    from megatron_ext.layers.moe.fused_routing import top_k_kernel_applies

    with torch.no_grad():
        assert top_k_kernel_applies(torch.zeros(64, 128, dtype=BF16, device="cuda"))
    assert not top_k_kernel_applies(torch.zeros(64, 128, dtype=BF16, device="cuda"))  # grad on
    for dtype in (BF16, torch.float16, torch.float32):
        for t in ROUTE_TOKENS:
            for e in ROUTE_EXPERTS:
                for k in ROUTE_TOP_K:
                    # float32: the renormalising sum of k probabilities adds in another
                    # order than torch's reduction, which bounds the difference by ~k ulps
                    # (3 seen at k 8 on an H200); half precision rounds that away
                    check_top_k_kernel(t, e, k, dtype, "cuda",
                                       max_ulps=k if dtype == torch.float32 else 1)


def test_moe_route_kernels_replay_in_a_cuda_graph():
    """A captured router + dispatch (a rank with every expert, and a moe_ep 2 share as
    ``fixed_size``) replays new inputs to exactly what the eager kernels give, and its
    dispatches equal the torch dispatch of the same experts."""
    from dataclasses import fields

    from megatron_ext.layers.moe.dispatch import LocalAssignments, local_dispatch
    from megatron_ext.layers.moe.router import TopKRouter

    torch.manual_seed(0)
    router = TopKRouter(256, 128, 8, norm_topk_prob=True, dtype=BF16, device="cuda")
    x = torch.randn(64, 256, dtype=BF16, device="cuda")

    def step():
        out = router(x, with_stats=False)
        return (out.weights, out.experts, local_dispatch(out.experts, 0, 128, 128),
                local_dispatch(out.experts, 64, 64, 128, fixed_size=True))

    def flat(result):
        w, e, full, share = result
        return [w, e] + [getattr(a, f.name) for a in (full, share)
                         for f in fields(LocalAssignments) if getattr(a, f.name) is not None]

    with torch.no_grad():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = flat(step())
        for seed in (1, 2, 3):
            x.copy_(torch.randn(64, 256, generator=torch.Generator().manual_seed(seed))
                    .to(BF16))
            graph.replay()
            eager = flat(step())
            assert all(torch.equal(a, b) for a, b in zip(captured, eager)), seed
            experts = eager[1]
            for first, num_local, fixed in ((0, 128, False), (64, 64, True)):
                want = local_dispatch(experts, first, num_local, 128, fixed_size=fixed,
                                      use_kernel=False)
                got = local_dispatch(experts, first, num_local, 128, fixed_size=fixed)
                assert all(torch.equal(getattr(got, f.name), getattr(want, f.name))
                           for f in fields(LocalAssignments)
                           if getattr(want, f.name) is not None), (seed, first)


def test_skinny_linear_matches_cublas_and_float64():
    """The one-launch decode projection (router logits, fused q/k/v, output projection): within
    one bf16/fp16 ulp of cuBLAS (both accumulate in float32 and round once; only the order
    differs), bias added as F.linear adds it, close to float64; never with autograd; the router
    routes to a top-8 of its own logits."""
    from megatron_ext.layers.moe.router import TopKRouter
    from megatron_ext.layers.skinny_linear import SkinnyLaunch, skinny_applies, skinny_linear

    torch.manual_seed(0)
    launch = SkinnyLaunch(16, 32, 128, 4, 3)
    for dtype in (BF16, torch.float16):
        for rows, n, k, bias in ((1, 128, 2048, False), (64, 5120, 2048, True),
                                 (37, 60, 200, False), (256, 2048, 4096, False)):
            x = torch.randn(rows, k, device="cuda", dtype=dtype)
            w = torch.randn(n, k, device="cuda", dtype=dtype) * 0.05
            b = torch.randn(n, device="cuda", dtype=dtype) if bias else None
            with torch.no_grad():
                assert skinny_applies(x, w, launch)
                got = skinny_linear(x, w, b, launch).float()
            want = torch.nn.functional.linear(x, w, b).float()
            ulp = 2 ** -7 if dtype == BF16 else 2 ** -10
            # one rounding of the result each, plus float32 sums in another order: bounded by
            # ~k·2^-24 of the summed magnitudes (which cancellation can make large next to the
            # result), and the bias, which may cancel too
            terms = x.float().abs() @ w.float().abs().T + (b.float().abs() if bias else 0)
            assert ((got - want).abs() <= ulp * want.abs() + k * 2 ** -23 * terms
                    + ulp * (b.float().abs() if bias else 0)).all(), (dtype, rows, n)
            ref = x.double() @ w.double().T + (b.double() if bias else 0)
            assert _rel(got, ref) < 5e-3
    assert not skinny_applies(x, w.requires_grad_(), launch)   # autograd: cuBLAS
    router = TopKRouter(2048, 128, 8, norm_topk_prob=True, dtype=BF16, device="cuda")
    x = torch.randn(64, 2048, device="cuda", dtype=BF16)
    with torch.no_grad():
        fast = router(x, None, with_stats=False)
    with torch.enable_grad():
        slow = router(x, None, with_stats=True)   # cuBLAS logits, torch top-k
    torch.testing.assert_close(fast.logits.float(), slow.logits.detach().float(), atol=0.02,
                               rtol=0.02)
    # a top-8 of its own logits (ties in bf16 logits are common: compare the probabilities)
    probs = torch.softmax(fast.logits.float(), -1)
    chosen = probs.gather(1, fast.experts).sort(1, descending=True).values
    assert torch.equal(chosen, probs.topk(8, dim=1).values)
