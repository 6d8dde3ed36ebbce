"""Triton MoE routing bookkeeping for small (decode) batches: the router's top-k softmax and the
local dispatch's stable sort by expert (see :mod:`megatron_ext.layers.moe.fused_routing`).

In a decode step the torch composition launches ~15 tiny kernels per MoE layer (softmax, topk's
radix select + bitonic sort, renormalisation, a radix sort of the ``T·k`` expert ids, searchsorted,
arange, div, full + scatter, ...), each a few µs for a few hundred numbers. These two kernels do
the same work in two launches and return the same results.

* :func:`top_k_softmax`: one program per token row. The softmax sums in the order of torch's
  warp softmax (each lane adds elements ``l, l+W, l+2W, ...`` in turn, then an xor butterfly)
  and the renormalisation sums like torch's reduction kernel (lanes ``l`` and ``l + half``, then
  adjacent pairs), so the weights match torch's to the bit where the exponentials do (libdevice
  ``expf`` is CUDA's ``expf``). The experts are ranked by logit (the softmax is monotone), ties
  lowest index first; NaN ranks first, as in ``torch.topk``.
* :func:`align_assignments`: a stable counting sort, one program per chunk of assignments. A
  histogram of all local expert keys gives the counts and each expert's first row; one of the
  keys before the chunk, the rows those took; a slot's row is then its expert's next free row
  plus the number of earlier slots of the chunk with the same key. Each program reads all the
  (at most a few thousand) ids, so no program waits for another. Assignments of experts not
  held here sort last (key ``num_local``).

Imported only through :func:`megatron_ext.kernels.triton_loader.kernel_module` (needs Triton).
"""
import triton
import triton.language as tl
from triton.language.extra import libdevice


@triton.jit
def _exp(x, PRECISE: tl.constexpr):
    """CUDA's ``expf`` (what torch's softmax calls) on the GPU; numpy's in the interpreter."""
    if PRECISE:
        return libdevice.exp(x)
    else:
        return tl.exp(x)


@triton.jit
def _halve(acc, HALF: tl.constexpr, ADJACENT: tl.constexpr):
    """``[2·HALF]`` → ``[HALF]`` pair sums: ``(2i, 2i+1)`` when ``ADJACENT``, else ``(i, i+HALF)``."""
    if ADJACENT:
        return tl.sum(tl.reshape(acc, [HALF, 2]), 1)
    else:
        return tl.sum(tl.reshape(acc, [2, HALF]), 0)


@triton.jit
def _lane_tree_sum(acc, WIDTH: tl.constexpr, ADJACENT: tl.constexpr):
    """The value a warp reduction over ``WIDTH`` lanes (``acc`` ``[WIDTH]``, a power of two ≤ 32)
    leaves in lane 0: a ``__shfl_xor`` butterfly (lanes ``l`` and ``l + WIDTH/2`` first, then
    halving) or, ``ADJACENT``, a ``__shfl_down`` tree (offsets 1, 2, 4, ...: adjacent pairs
    first)."""
    if WIDTH >= 32:
        acc = _halve(acc, 16, ADJACENT)
    if WIDTH >= 16:
        acc = _halve(acc, 8, ADJACENT)
    if WIDTH >= 8:
        acc = _halve(acc, 4, ADJACENT)
    if WIDTH >= 4:
        acc = _halve(acc, 2, ADJACENT)
    if WIDTH >= 2:
        acc = _halve(acc, 1, ADJACENT)
    return tl.sum(acc, 0)


@triton.jit
def _top_k_sum(p, TOP_K: tl.constexpr, BLOCK_K: tl.constexpr):
    """Σ of the ``TOP_K`` leading entries of ``p`` ``[BLOCK_K]`` (zeros after them) in the order
    of torch's reduction of a short row (one lane per power of two of the row, each adding its
    element ``l + half`` first); a plain sum beyond 32."""
    if TOP_K > 32:
        return tl.sum(p, 0)
    elif BLOCK_K == TOP_K:
        return _lane_tree_sum(p, BLOCK_K, True)
    else:
        return _lane_tree_sum(_halve(p, BLOCK_K // 2, False), BLOCK_K // 2, True)


@triton.jit
def top_k_softmax(logits_ptr, weights_ptr, ids_ptr, n_experts, stride_row,
                  TOP_K: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_E: tl.constexpr,
                  WARP: tl.constexpr, RENORM: tl.constexpr, PRECISE: tl.constexpr):
    """Row ``t``: ``p = softmax(logits[t])`` in float32, the ``TOP_K`` largest in descending order
    → ``weights[t]`` (``p`` or ``p / Σ p`` with ``RENORM``, cast to the weights' dtype) and
    ``ids[t]`` (int64). ``WARP = min(BLOCK_E, 32)``: the lanes of torch's warp softmax."""
    t = tl.program_id(0).to(tl.int64)
    row = logits_ptr + t * stride_row
    cols = tl.arange(0, BLOCK_E)
    col_ok = cols < n_experts
    x = tl.load(row + cols, mask=col_ok, other=float("-inf")).to(tl.float32)
    top = tl.max(x, 0)
    lanes = tl.arange(0, WARP)
    acc = tl.zeros([WARP], tl.float32)
    for it in tl.static_range(BLOCK_E // WARP):
        c = it * WARP + lanes
        xi = tl.load(row + c, mask=c < n_experts, other=float("-inf")).to(tl.float32)
        acc = acc + _exp(xi - top, PRECISE)
    total = _lane_tree_sum(acc, WARP, False)

    rank = tl.where(x == x, x, float("inf"))          # NaN first, like torch.topk
    ks = tl.arange(0, BLOCK_K)
    vals = tl.full([BLOCK_K], float("-inf"), tl.float32)
    ids = tl.zeros([BLOCK_K], tl.int32)
    free = col_ok
    for j in range(TOP_K):
        cand = tl.where(free, rank, float("-inf"))
        best = tl.max(cand, 0)
        pick = tl.min(tl.where(free & (cand == best), cols, BLOCK_E), 0)
        free = free & (cols != pick)
        vals = tl.where(ks == j, best, vals)
        ids = tl.where(ks == j, pick, ids)
    k_ok = ks < TOP_K
    p = tl.where(k_ok, tl.math.div_rn(_exp(vals - top, PRECISE), total), 0.0)
    if RENORM:
        p = tl.math.div_rn(p, _top_k_sum(p, TOP_K, BLOCK_K))
    out = t * TOP_K + ks
    tl.store(weights_ptr + out, p.to(weights_ptr.dtype.element_ty), mask=k_ok)
    tl.store(ids_ptr + out, ids.to(tl.int64), mask=k_ok)


@triton.jit
def _local_keys(ids_ptr, slots, n_slots, first_expert, num_local):
    """``(key, mine, ok)`` of ``slots``: the local expert (``num_local`` for other ranks'),
    whether it is held here, whether the slot exists."""
    ok = slots < n_slots
    local = tl.load(ids_ptr + slots, mask=ok, other=0).to(tl.int32) - first_expert
    mine = ok & (local >= 0) & (local < num_local)
    return tl.where(mine, local, num_local), mine, ok


@triton.jit
def align_assignments(ids_ptr, flat_ptr, token_ptr, slot_ptr, counts_ptr, valid_ptr,
                      n_slots, first_expert, num_local,
                      TOP_K: tl.constexpr, BLOCK_E: tl.constexpr, CHUNK: tl.constexpr,
                      HIST_CHUNK: tl.constexpr, STORE_VALID: tl.constexpr):
    """The ``n_slots`` expert ids (token-major, ``TOP_K`` per token) stably sorted by local expert
    (other ranks' last): ``flat[row]`` slot of each row, ``token[row] = flat // TOP_K``,
    ``slot[s]`` row of each slot, ``counts[e]`` rows of local expert ``e`` and, with
    ``STORE_VALID``, ``valid[row]`` (uint8) whether the row's expert is held here.

    Program ``c`` places the slots ``[c·CHUNK, (c+1)·CHUNK)``: it histograms all keys (each
    expert's first row) and those before its chunk (the rows they already took), so programs
    need nothing from each other; within the chunk a slot comes after its earlier same-key
    slots."""
    chunk_start = tl.program_id(0) * CHUNK
    experts = tl.arange(0, BLOCK_E)
    hist_all = tl.zeros([BLOCK_E], tl.int32)
    hist_before = tl.zeros([BLOCK_E], tl.int32)
    others_before = 0
    for start in range(0, n_slots, HIST_CHUNK):
        slots = start + tl.arange(0, HIST_CHUNK)
        key, mine, ok = _local_keys(ids_ptr, slots, n_slots, first_expert, num_local)
        local = tl.where(mine, key, 0)
        early = slots < chunk_start
        hist_all += tl.histogram(local, BLOCK_E, mask=mine)
        hist_before += tl.histogram(local, BLOCK_E, mask=mine & early)
        others_before += tl.sum((ok & ~mine & early).to(tl.int32), 0)
    tl.store(counts_ptr + experts, hist_all.to(tl.int64),
             mask=(experts < num_local) & (chunk_start == 0))
    first_row = tl.cumsum(hist_all, 0) - hist_all + hist_before
    first_other = tl.sum(hist_all, 0) + others_before
    offs = tl.arange(0, CHUNK)
    slots = chunk_start + offs
    key, mine, ok = _local_keys(ids_ptr, slots, n_slots, first_expert, num_local)
    same = (key[:, None] == key[None, :]) & (offs[None, :] < offs[:, None])
    pos = (tl.where(mine, tl.gather(first_row, tl.where(mine, key, 0), 0), first_other)
           + tl.sum(same.to(tl.int32), 1))
    tl.store(slot_ptr + slots, pos.to(tl.int64), mask=ok)
    tl.store(flat_ptr + pos, slots.to(tl.int64), mask=ok)
    tl.store(token_ptr + pos, (slots // TOP_K).to(tl.int64), mask=ok)
    if STORE_VALID:
        tl.store(valid_ptr + pos, mine.to(tl.uint8), mask=ok)
