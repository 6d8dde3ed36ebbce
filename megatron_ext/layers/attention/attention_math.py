"""Block attention that returns its log-sum-exp, forward and backward.

Context-parallel attention splits one causal attention into *blocks*: a set of query tokens
against a set of key/value tokens. Each block is computed on its own and the partial results are
merged by log-sum-exp (:func:`merge_partial`). The backward of a block needs only the *final*
(merged) output and log-sum-exp: with ``P = exp(S - lse_final)`` the block's share of the
gradients is exact, so no per-block state has to be kept.

A block has one of four mask kinds (decided by the caller's plan):

* ``SKIP``    — nothing visible, not computed;
* ``FULL``    — every key visible to every query (no mask);
* ``CAUSAL``  — the block's queries and keys are the same tokens in increasing order: key ``j``
  visible to query ``i`` iff ``j <= i``;
* ``GENERAL`` — an explicit boolean mask ``[b, s_q, s_k]``.

Kernels: on CUDA with fp16/bf16, ``FULL`` and ``CAUSAL`` blocks run a fused kernel that takes an
external ``out`` and ``logsumexp`` in its backward: cuDNN's fused attention
(``aten._scaled_dot_product_cudnn_attention`` with ``compute_log_sumexp=True``, and its backward)
on Hopper and newer for blocks of at least ``CUDNN_MIN_QUERIES`` queries and head_dim <= 128
(the kernel SDPA itself picks there; its backward took about half FlashAttention-2's time in
the 1-GPU training profile, ``benchmarks/results/train_profile.txt``),
otherwise torch's FlashAttention-2 ops (``aten._scaled_dot_product_flash_attention``). Both
return the natural-log ``logsumexp`` of the scaled scores, so blocks of either merge alike.
:func:`set_cuda_kernel` pins one (A/B runs). Everything else (CPU, float32/float64, ``GENERAL``
masks) runs a plain torch implementation in float32 (float64 for float64 inputs), chunked over
queries to bound memory.
Layout everywhere: ``q [b, s_q, hq, d]``, ``k, v [b, s_k, hkv, d]`` with ``hq % hkv == 0``
(query head ``h`` uses key/value head ``h // (hq // hkv)``); ``lse [b, hq, s_q]``.
"""
from __future__ import annotations

import enum
import functools
import math
from typing import Optional

import torch

from megatron_ext.kernels.launch import next_power_of_2
from megatron_ext.kernels.triton_loader import kernel_module

# Bound on score-matrix elements the math path materialises at once (b * hq * chunk * s_k).
MATH_CHUNK_ELEMENTS = 1 << 26

_FLASH_GQA_NATIVE: Optional[bool] = None  # learnt on first GQA flash call (older builds lack it)
_CUDNN_GQA_NATIVE: Optional[bool] = None  # likewise for cuDNN
CUDA_KERNELS = ("auto", "cudnn", "flash")
CUDNN_MIN_QUERIES = 128  # decode steps and tiny blocks stay on FlashAttention-2
_cuda_kernel = "auto"
_cudnn_broken = False  # set when a cuDNN call raised: later calls use FlashAttention-2


class MaskKind(enum.Enum):
    SKIP = "skip"
    FULL = "full"
    CAUSAL = "causal"
    GENERAL = "general"


def accum_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype for partial outputs and gradients."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def uses_flash(q: torch.Tensor, kind: MaskKind) -> bool:
    """Whether a block of this kind runs the CUDA flash kernel."""
    return (q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] % 8 == 0
            and q.shape[-1] <= 256 and kind in (MaskKind.FULL, MaskKind.CAUSAL))


def set_cuda_kernel(name: str) -> None:
    """Pin the fused kernel of ``FULL``/``CAUSAL`` CUDA blocks: ``"auto"`` (default: cuDNN where
    it applies, see the module doc), ``"cudnn"`` (wherever cuDNN takes the shape) or
    ``"flash"``."""
    global _cuda_kernel
    if name not in CUDA_KERNELS:
        raise ValueError(f"attention kernel {name!r} must be one of {CUDA_KERNELS}")
    _cuda_kernel = name


def _cudnn_applies(q: torch.Tensor) -> bool:
    if _cudnn_broken or _cuda_kernel == "flash" or q.shape[-1] > 128:
        return False
    if not hasattr(torch.ops.aten, "_scaled_dot_product_cudnn_attention"):
        return False
    if _cuda_kernel == "cudnn":
        return True
    # by the query count only: every block of one CP call has as many queries, so one call
    # uses one kernel (its backward takes any of its blocks' aux state)
    return torch.cuda.get_device_capability(q.device)[0] >= 9 and q.shape[1] >= CUDNN_MIN_QUERIES


def default_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)


# --------------------------------------------------------------------------------- math kernel
def _allowed(kind: MaskKind, mask: Optional[torch.Tensor], sq: int, sk: int,
             device: torch.device) -> Optional[torch.Tensor]:
    """Boolean visibility broadcastable to ``[b, 1, 1, sq, sk]`` (None = everything visible)."""
    if kind == MaskKind.FULL:
        return None
    if kind == MaskKind.CAUSAL:
        if sq != sk:
            raise ValueError(f"a CAUSAL block needs as many queries as keys, got {sq} and {sk}")
        return torch.ones(sq, sk, dtype=torch.bool, device=device).tril()
    if kind == MaskKind.GENERAL:
        if mask is None or mask.shape[-2:] != (sq, sk):
            raise ValueError(f"a GENERAL block needs a mask [b, {sq}, {sk}], got "
                             f"{None if mask is None else tuple(mask.shape)}")
        return mask[:, None, None]
    raise ValueError(f"block kind {kind} is not computed")


def _heads_first(q: torch.Tensor, hkv: int, dtype: torch.dtype) -> torch.Tensor:
    """``[b, s, hq, d]`` -> ``[b, hkv, g, s, d]``."""
    b, s, hq, d = q.shape
    return q.to(dtype).view(b, s, hkv, hq // hkv, d).permute(0, 2, 3, 1, 4)


def _heads_last(x: torch.Tensor) -> torch.Tensor:
    """``[b, hkv, g, s, d]`` -> ``[b, s, hkv * g, d]``."""
    b, hkv, g, s, d = x.shape
    return x.permute(0, 3, 1, 2, 4).reshape(b, s, hkv * g, d)


def _q_chunks(b: int, hq: int, sq: int, sk: int) -> list[tuple[int, int]]:
    step = max(1, MATH_CHUNK_ELEMENTS // max(1, b * hq * sk))
    return [(i, min(sq, i + step)) for i in range(0, sq, step)]


def _math_forward(q, k, v, scale, kind, mask):
    acc = accum_dtype(q.dtype)
    b, sq, hq, d = q.shape
    sk, hkv = k.shape[1], k.shape[2]
    allowed = _allowed(kind, mask, sq, sk, q.device)
    kh = k.to(acc).permute(0, 2, 1, 3).unsqueeze(2)  # [b, hkv, 1, sk, d]
    vh = v.to(acc).permute(0, 2, 1, 3).unsqueeze(2)
    outs, lses = [], []
    for a, e in _q_chunks(b, hq, sq, sk):
        qh = _heads_first(q[:, a:e], hkv, acc)
        s = torch.matmul(qh, kh.transpose(-1, -2)) * scale  # [b, hkv, g, c, sk]
        if allowed is not None:
            s = s.masked_fill(~allowed[..., a:e, :], float("-inf"))
        lse = torch.logsumexp(s, dim=-1)  # -inf where a query sees nothing
        p = torch.exp(s - torch.where(torch.isinf(lse), 0.0, lse).unsqueeze(-1))
        outs.append(_heads_last(torch.matmul(p, vh)))
        lses.append(lse.reshape(b, hq, e - a))
    return torch.cat(outs, 1), torch.cat(lses, -1)


def _math_backward(dout, q, k, v, out, lse, scale, kind, mask):
    acc = accum_dtype(q.dtype)
    b, sq, hq, d = q.shape
    sk, hkv = k.shape[1], k.shape[2]
    g = hq // hkv
    allowed = _allowed(kind, mask, sq, sk, q.device)
    kh = k.to(acc).permute(0, 2, 1, 3).unsqueeze(2)
    vh = v.to(acc).permute(0, 2, 1, 3).unsqueeze(2)
    dk = torch.zeros(b, hkv, sk, d, dtype=acc, device=q.device)
    dv = torch.zeros_like(dk)
    dqs = []
    for a, e in _q_chunks(b, hq, sq, sk):
        qh = _heads_first(q[:, a:e], hkv, acc)
        doh = _heads_first(dout[:, a:e], hkv, acc)
        oh = _heads_first(out[:, a:e], hkv, acc)
        l = lse[..., a:e].to(acc).reshape(b, hkv, g, e - a, 1)
        s = torch.matmul(qh, kh.transpose(-1, -2)) * scale
        p = torch.exp(s - torch.where(torch.isinf(l), 0.0, l))
        p = torch.where(torch.isinf(l), 0.0, p)
        if allowed is not None:
            p = p.masked_fill(~allowed[..., a:e, :], 0.0)
        dv += torch.matmul(p.transpose(-1, -2), doh).sum(2)
        dp = torch.matmul(doh, vh.transpose(-1, -2))
        delta = (doh * oh).sum(-1, keepdim=True)
        ds = p * (dp - delta)
        dqs.append(_heads_last(torch.matmul(ds, kh) * scale))
        dk += torch.matmul(ds.transpose(-1, -2), qh).sum(2) * scale
    return torch.cat(dqs, 1), dk.transpose(1, 2), dv.transpose(1, 2)


# -------------------------------------------------------------------------------- flash kernel
def _expand_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    return x if groups == 1 else x.repeat_interleave(groups, dim=2)


def _cudnn_forward(q, k, v, scale, causal):
    """cuDNN fused attention; ``aux = ("cudnn", native_gqa, rng/seqlen state)``."""
    global _CUDNN_GQA_NATIVE
    g = q.shape[2] // k.shape[2]
    native = g == 1 or _CUDNN_GQA_NATIVE is not False
    if g > 1 and native:
        try:
            res = torch.ops.aten._scaled_dot_product_cudnn_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), None, True, 0.0, causal,
                False, scale=scale)
            _CUDNN_GQA_NATIVE = True
        except RuntimeError:
            _CUDNN_GQA_NATIVE, native = False, False
    if g == 1 or not native:
        ke, ve = _expand_kv(k, g), _expand_kv(v, g)
        res = torch.ops.aten._scaled_dot_product_cudnn_attention(
            q.transpose(1, 2), ke.transpose(1, 2), ve.transpose(1, 2), None, True, 0.0, causal,
            False, scale=scale)
    b, sq, hq, _ = q.shape
    lse = res[1].reshape(b, hq, sq)  # [b, h, s_q, 1] float32, natural log
    return res[0].transpose(1, 2), lse, ("cudnn", native, (res[2], res[3], res[6], res[7]))


def _cudnn_backward(dout, q, k, v, out, lse, scale, causal, native, state):
    g = q.shape[2] // k.shape[2]
    ke, ve = (k, v) if native else (_expand_kv(k, g), _expand_kv(v, g))
    cum_q, cum_k, seed, offset = state  # dropout is off: only passed through
    b, sq, hq, _ = q.shape
    dq, dk, dv = torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
        dout.transpose(1, 2), q.transpose(1, 2), ke.transpose(1, 2), ve.transpose(1, 2),
        out.transpose(1, 2), lse.contiguous().view(b, hq, sq, 1), seed, offset, None, cum_q,
        cum_k, sq, k.shape[1], 0.0, causal, scale=scale)
    dq, dk, dv = dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)
    if not native:
        bk, sk, _, d = dk.shape
        dk = dk.reshape(bk, sk, k.shape[2], g, d).sum(3)
        dv = dv.reshape(bk, sk, k.shape[2], g, d).sum(3)
    return dq, dk, dv


def _fused_forward(q, k, v, scale, causal):
    """cuDNN where it applies (falling back to FlashAttention-2 for good if it raises)."""
    global _cudnn_broken
    if _cudnn_applies(q):
        try:
            return _cudnn_forward(q, k, v, scale, causal)
        except RuntimeError:
            if _cuda_kernel == "cudnn":
                raise
            _cudnn_broken = True
    return _flash_forward(q, k, v, scale, causal)


def _flash_forward(q, k, v, scale, causal):
    global _FLASH_GQA_NATIVE
    g = q.shape[2] // k.shape[2]
    if g > 1 and _FLASH_GQA_NATIVE is not False:
        try:
            res = torch.ops.aten._scaled_dot_product_flash_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), 0.0, causal, False,
                scale=scale)
            _FLASH_GQA_NATIVE = True
            return res[0].transpose(1, 2), res[1], ("flash", True, (res[2], res[3], res[6], res[7]))
        except RuntimeError:
            _FLASH_GQA_NATIVE = False
    k, v = _expand_kv(k, g), _expand_kv(v, g)
    res = torch.ops.aten._scaled_dot_product_flash_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), 0.0, causal, False, scale=scale)
    return res[0].transpose(1, 2), res[1], ("flash", g == 1, (res[2], res[3], res[6], res[7]))


def _flash_backward(dout, q, k, v, out, lse, scale, causal, native, rng):
    g = q.shape[2] // k.shape[2]
    ke, ve = (k, v) if native else (_expand_kv(k, g), _expand_kv(v, g))
    cum_q, cum_k, seed, offset = rng  # as the forward returned them (dropout is off)
    dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_backward(
        dout.transpose(1, 2), q.transpose(1, 2), ke.transpose(1, 2), ve.transpose(1, 2),
        out.transpose(1, 2), lse.contiguous(), cum_q, cum_k, q.shape[1], k.shape[1], 0.0, causal,
        seed, offset, scale=scale)
    dq, dk, dv = dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)
    if not native:
        b, sk, _, d = dk.shape
        dk = dk.reshape(b, sk, k.shape[2], g, d).sum(3)
        dv = dv.reshape(b, sk, k.shape[2], g, d).sum(3)
    return dq, dk, dv


# ---------------------------------------------------------------------------------- interface
def block_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                  kind: MaskKind, mask: Optional[torch.Tensor] = None):
    """Attention of one block. Returns ``(out [b, sq, hq, d], lse [b, hq, sq], aux)``; ``aux``
    is ``(kernel, native_gqa, state)`` of the fused kernel for its backward (dropout is off, so
    any block's of the same call will do: one call uses one kernel) or None. Queries that see no key get
    ``out = 0`` and ``lse = -inf``."""
    if uses_flash(q, kind):
        return _fused_forward(q, k, v, scale, kind == MaskKind.CAUSAL)
    out, lse = _math_forward(q, k, v, scale, kind, mask)
    return out, lse, None


def block_backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   out: torch.Tensor, lse: torch.Tensor, scale: float, kind: MaskKind,
                   mask: Optional[torch.Tensor] = None, aux=None):
    """This block's share of ``(dq, dk, dv)`` given the *final* ``out`` and ``lse`` of its
    queries (after merging every block). ``dout`` and ``out`` are in the query's dtype."""
    if uses_flash(q, kind):
        if aux is None:
            raise ValueError("a flash block's backward needs the aux state of a flash forward")
        kernel, native, state = aux
        causal = kind == MaskKind.CAUSAL
        if kernel == "cudnn":
            return _cudnn_backward(dout, q, k, v, out, lse, scale, causal, native, state)
        return _flash_backward(dout, q, k, v, out, lse, scale, causal, native, state)
    return _math_backward(dout, q, k, v, out, lse, scale, kind, mask)


_MERGE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@functools.lru_cache(maxsize=None)
def _merge_kernel():
    """The Triton merge (:mod:`megatron_ext.kernels.attention_merge`); ``None`` without Triton."""
    k = kernel_module("attention_merge")
    return None if k is None else k.merge_two


def _merge_kernel_applies(*ts: Optional[torch.Tensor]) -> bool:
    """The Triton merge takes CUDA tensors ``[b, s, h, d]`` whose tokens are ``h·d`` contiguous
    values, with ``d`` a power of two (the kernel's inner block); ``None`` entries are skipped."""
    ts = tuple(t for t in ts if t is not None)
    d = ts[0].shape[-1]
    return (ts[0].is_cuda and d & (d - 1) == 0 and 8 <= d <= 256
            and all(t.dtype in _MERGE_DTYPES and t.stride(-1) == 1 and t.stride(-2) == d
                    for t in ts)
            and _merge_kernel() is not None)


def _merge_triton(acc_out, acc_lse, out, lse, into):
    """One pass: ``(acc_out, acc_lse)`` and ``(out, lse)`` → the merged output (``into``, or a new
    float32 tensor) and log-sum-exp; the log-sum-exps are float32 ``[b, h, s]``."""
    bsz, s, h, d = out.shape
    res = into if into is not None else torch.empty(out.shape, dtype=torch.float32,
                                                     device=out.device)
    new_lse = torch.empty((bsz, h, s), dtype=torch.float32, device=out.device)
    if not res.numel():
        return res, new_lse
    acc_lse = acc_lse if acc_lse.stride(-1) == 1 else acc_lse.contiguous()
    lse = lse if lse.stride(-1) == 1 else lse.contiguous()
    block_h = min(next_power_of_2(h), max(1, 4096 // d))
    _merge_kernel()[(bsz * s, -(-h // block_h))](
        acc_out, out, acc_lse, lse, res, new_lse, s, h,
        acc_out.stride(0), acc_out.stride(1), out.stride(0), out.stride(1),
        res.stride(0), res.stride(1), acc_lse.stride(0), acc_lse.stride(1),
        lse.stride(0), lse.stride(1), D=d, BLOCK_H=block_h, num_warps=4)
    return res, new_lse


def merge_partial(acc_out: Optional[torch.Tensor], acc_lse: Optional[torch.Tensor],
                  out: torch.Tensor, lse: torch.Tensor, into: Optional[torch.Tensor] = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge a block's ``(out, lse)`` into the running ``(acc_out, acc_lse)`` by log-sum-exp.
    Merged outputs are in the accumulation dtype, or written into ``into`` (the final output,
    e.g. bf16, for a part's last merge); ``-inf`` (nothing seen yet) is handled. On CUDA with
    fp16/bf16/fp32 outputs one Triton pass (the torch composition below is six passes over the
    float32 output)."""
    dtype = accum_dtype(out.dtype)
    lse = lse.to(dtype)
    if acc_out is None:  # first block: kept as is (upcast happens at the first real merge)
        if into is not None:
            into.copy_(out)
        return (into if into is not None else out), lse
    if dtype == torch.float32 and _merge_kernel_applies(acc_out, out, into):
        return _merge_triton(acc_out, acc_lse, out, lse, into)
    new_lse = torch.logaddexp(acc_lse, lse)
    safe = torch.where(torch.isinf(new_lse), 0.0, new_lse)
    w_old = torch.exp(acc_lse - safe).transpose(1, 2).unsqueeze(-1).to(dtype)
    w_new = torch.exp(lse - safe).transpose(1, 2).unsqueeze(-1).to(dtype)
    merged = acc_out * w_old + out.to(dtype) * w_new
    if into is not None:
        into.copy_(merged)
        return into, new_lse
    return merged, new_lse
