"""Greedy generation with the training layers, groups and communicator (design §5 "Serving").

Flow, for prompts ``[B, S]`` identical on every rank (left-padded, like ``transformers``):

1. Rows are split over attention DP as :func:`megatron_ext.communication.local_batch.split_batch`
   does (contiguous, the first ranks one row more); ``B >= attn_dp``.
2. **Prefill** (one forward): every row's prompt *except its last token* is split over attention
   CP with the training load-balanced split (one padded length for the batch); each CP rank's
   attention blocks store the K/V of their own chunks in this rank's
   :class:`~megatron_ext.serving.kv_cache.KVCache` (KV memory per rank ``~1/cp`` of the prompt).
   No final norm or LM head runs: prefill logits are not needed (step 3 gives them).
3. **Decode steps**: step ``t`` feeds one token per row (step 0: the last prompt token) at RoPE
   position ``prompt_len - 1 + t``; each attention layer attends to the cache spread over the CP
   ranks with :func:`~megatron_ext.layers.attention.cp_decode.cp_decode_attention` (partials merged by
   log-sum-exp), after the step's owner (CP rank ``t mod cp``) appended the token's K/V. The
   greedy next token is the argmax of the full-vocabulary logits.

**Decode tokens in the token layout** (the choice, and why): every CP rank of an attention group
holds that group's new tokens — attention needs the query on every CP rank anyway (each rank
scores it against its own cache share) — and the :class:`~megatron_ext.communication.token_layout.TokenLayout`
of a decode step counts them on every CP rank (``rows`` per attention group). The layer code and
the ``LayerCommunicator`` then run unchanged, with every reduction they do in training: residual
stream, norms and a dense MLP see each token once per CP rank, and a MoE on ``MOE_FULL`` rows
(token group ``k > 1``) receives the ``k`` CP copies gathered over the token group and routes
each identically. The duplicate work is ``k×`` the MoE FLOPs on one token per row (cp× for a
dense MLP); in decode the MoE is bound by reading expert weights, which duplicates that pick the
same experts do not multiply. Giving the MLP one owner per token instead (counts ``[rows, 0,
…]``) would need CP-aware moves in the communicator (replicated ``TP_ATTN_FULL → MOE_FULL``
without a gather); left for later. Each copy is computed independently, so copies can differ in
the last bits; the tokens (and returned logits) of CP rank 0 are the ones every rank adopts
(one small all-gather over ``attn_dp_cp`` per step, which also shares the DP groups' rows).

**Prompts of different lengths**: left padding, marked by ``attention_mask`` (1 = real token,
zeros only before a row's first real token) — ``transformers``' convention, with the same RoPE
positions (``0..len-1`` per row). Rows keep their padding in the output.

**EOS**: after a row emits ``eos_token_id`` it gets ``pad_token_id`` (default: the EOS id) and
generation stops once every row is done; the output is still ``[B, S + max_new_tokens]``, the
unused tail filled with ``pad_token_id``. ``transformers`` returns the shorter tensor.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from megatron_ext.communication.collectives import all_gather
from megatron_ext.data.cp_split import required_padded_length, split_batch_for_cp
from megatron_ext.parallel.groups import ParallelGroups
from megatron_ext.serving.kv_cache import KVCache
from megatron_ext.communication.token_layout import TokenLayout, split_rows


@dataclass(frozen=True)
class GenerationOutput:
    """What :func:`greedy_generate` returns (identical on every rank except the cache fields).

    * ``tokens`` ``[B, S + max_new_tokens]``: prompts then generated tokens (pad after EOS).
    * ``last_logits`` ``[B, V]``: full-vocabulary logits of the last decode step run.
    * ``steps``: decode steps run (``< max_new_tokens`` when every row hit EOS).
    * ``prefill_seconds`` / ``decode_seconds``: wall time of the two phases on this rank.
    * ``prompt_lengths``: real tokens per row.
    * ``cache_slots``: filled cache slots per row on this rank at the end (prefill share incl.
      CP padding + owned decode tokens); ``cache_tokens`` ``[b_local]``: real tokens among them;
      ``cache_bytes``: K/V buffer bytes on this rank (all layers, allocated capacity).
    """

    tokens: torch.Tensor
    last_logits: torch.Tensor
    steps: int
    prefill_seconds: float
    decode_seconds: float
    prompt_lengths: tuple[int, ...]
    cache_slots: int
    cache_tokens: torch.Tensor
    cache_bytes: int


@dataclass(frozen=True)
class _LocalPrompts:
    """This rank's rows and its CP share of their prefill (``None`` without a prefill)."""

    rows_per_dp: tuple[int, ...]
    row_start: int
    lengths: torch.Tensor                  # [b_local] prompt lengths
    padded_len: int                        # prefill padded length (0: no prefill)
    input_ids: Optional[torch.Tensor]      # [b_local, padded_len / cp] and alike below
    position_ids: Optional[torch.Tensor]
    token_index: Optional[torch.Tensor]
    segment_ids: Optional[torch.Tensor]

    @property
    def batch(self) -> int:
        return int(self.lengths.numel())


def prompt_lengths(prompt_ids: torch.Tensor,
                   attention_mask: Optional[torch.Tensor] = None) -> tuple[int, ...]:
    """Real tokens per row of left-padded prompts (``ValueError`` if ``attention_mask`` is not
    zeros-then-ones per row with at least one real token)."""
    B, S = prompt_ids.shape
    if attention_mask is None:
        return (S,) * B
    if tuple(attention_mask.shape) != (B, S):
        raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} must match "
                         f"prompt_ids {(B, S)}")
    mask = attention_mask.to(torch.long).cpu()
    if ((mask != 0) & (mask != 1)).any():
        raise ValueError("attention_mask must hold only 0 (padding) and 1 (real token)")
    lengths = mask.sum(1)
    expected = (torch.arange(S)[None, :] >= (S - lengths)[:, None]).to(torch.long)
    bad = (mask != expected).any(1) | (lengths == 0)
    if bad.any():
        row = int(torch.nonzero(bad)[0])
        raise ValueError(f"attention_mask row {row} is not left padding (zeros, then at least one "
                         f"1, then only 1s): {mask[row].tolist()}")
    return tuple(int(n) for n in lengths)


def check_generate_inputs(model, groups: ParallelGroups, prompt_ids: torch.Tensor,
                          max_new_tokens: int, eos_token_id: Optional[int] = None,
                          attention_mask: Optional[torch.Tensor] = None,
                          pad_token_id: Optional[int] = None) -> tuple[int, ...]:
    """Every check that needs no collective (so bad input is the same ``ValueError`` on every
    rank, never a hang); returns the prompt lengths."""
    topo = groups.topology
    if topo.pp != 1:
        raise ValueError(f"generation runs one pipeline stage (pp=1); got pp={topo.pp}")
    if not (getattr(model, "pre_process", False) and getattr(model, "post_process", False)):
        raise ValueError("generation needs the whole model on every rank (embedding, layers, "
                         "LM head): build it with pp=1")
    if model.groups.topology != topo or model.groups.global_rank != groups.global_rank:
        raise ValueError("the model was built for other parallel groups than the ones passed")
    if not isinstance(prompt_ids, torch.Tensor) or prompt_ids.dim() != 2 \
            or prompt_ids.is_floating_point() or min(prompt_ids.shape) < 1:
        raise ValueError(f"prompt_ids must be an integer tensor [B, S] with B, S >= 1, got "
                         f"{getattr(prompt_ids, 'dtype', type(prompt_ids))} "
                         f"{tuple(getattr(prompt_ids, 'shape', ()))}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) \
            or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens!r} must be a positive int")
    config = model.config
    vocab = config.vocab_size
    bad = (prompt_ids < 0) | (prompt_ids >= vocab)
    if bad.any():
        raise ValueError(f"token id {int(prompt_ids[bad][0])} is outside the model's vocabulary "
                         f"[0, {vocab})")
    for name, tok in (("eos_token_id", eos_token_id), ("pad_token_id", pad_token_id)):
        if tok is not None and not 0 <= int(tok) < vocab:
            raise ValueError(f"{name}={tok} is outside the model's vocabulary [0, {vocab})")
    lengths = prompt_lengths(prompt_ids, attention_mask)
    longest, max_pos = max(lengths), config.max_position_embeddings
    if longest > max_pos:
        raise ValueError(f"prompt of {longest} tokens is longer than the model's "
                         f"max_position_embeddings={max_pos}")
    if longest + max_new_tokens > max_pos:
        raise ValueError(f"prompt of {longest} tokens + max_new_tokens={max_new_tokens} needs "
                         f"positions up to {longest + max_new_tokens - 1}, beyond the model's "
                         f"max_position_embeddings={max_pos}")
    if prompt_ids.shape[0] < topo.attn_dp:
        raise ValueError(f"{prompt_ids.shape[0]} prompts for attn_dp={topo.attn_dp}: every "
                         f"attention-DP group needs at least one prompt")
    return lengths


def _split_prompts(groups: ParallelGroups, prompt_ids: torch.Tensor, lengths: Sequence[int],
                   pad_id: int) -> _LocalPrompts:
    """This rank's rows, and its CP share of their prefill tokens (every prompt but its last
    token), padded to one length for the whole batch."""
    topo, coords = groups.topology, groups.coords
    B, S = prompt_ids.shape
    cp, c = topo.attn_cp, coords.attn_cp
    rows = split_rows(B, topo.attn_dp)
    start = sum(rows[:coords.attn_dp])
    mine = range(start, start + rows[coords.attn_dp])
    dev = prompt_ids.device
    local_lengths = torch.tensor([lengths[i] for i in mine], dtype=torch.long, device=dev)
    context = [n - 1 for n in lengths]
    if max(context) == 0:
        return _LocalPrompts(rows, start, local_lengths, 0, None, None, None, None)
    padded = max(required_padded_length(max(n, 1), cp) for n in context)
    parts = []
    for i in mine:
        n = context[i]
        ids = prompt_ids[i, S - lengths[i]:S - 1] if n else prompt_ids.new_full((1,), pad_id)
        part = split_batch_for_cp(ids[None], None, cp, c, padded_len=padded, max_pad=padded,
                                  pad_token_id=pad_id)
        seg = part.segment_ids if n else torch.full_like(part.segment_ids, -1)
        ids_local = torch.where(seg >= 0, part.input_ids, pad_id)
        parts.append((ids_local, part.position_ids * (seg >= 0), part.token_index, seg))
    ids, pos, tok, seg = (torch.cat(t) for t in zip(*parts))
    return _LocalPrompts(rows, start, local_lengths, padded, ids, pos, tok, seg)


def _layout(groups: ParallelGroups, rows: Sequence[int], per_row: int) -> TokenLayout:
    """Every attention group's tokens: its DP group's rows × ``per_row``, on every CP rank."""
    topo = groups.topology
    return TokenLayout.from_counts(groups, [rows[d] * per_row for d in range(topo.attn_dp)
                                            for _ in range(topo.attn_cp)])


def _from_cp_rank0(local: torch.Tensor, groups: ParallelGroups,
                   rows: Sequence[int]) -> torch.Tensor:
    """``[b_local, ...]`` on every rank -> ``[B, ...]``: each DP group's rows as CP rank 0 holds
    them (one all-gather over ``attn_dp_cp``; none when it is a one-rank axis)."""
    topo = groups.topology
    sizes = [rows[d] for d in range(topo.attn_dp) for _ in range(topo.attn_cp)]
    every = all_gather(local.contiguous(), groups.attn_dp_cp, sizes=sizes, backward="own_rows")
    if groups.attn_dp_cp.is_trivial:
        return every
    offsets = [sum(sizes[:g]) for g in range(len(sizes))]
    return torch.cat([every[offsets[d * topo.attn_cp]:offsets[d * topo.attn_cp] + rows[d]]
                      for d in range(topo.attn_dp)])


@torch.no_grad()
def greedy_generate(model, groups: ParallelGroups, prompt_ids: torch.Tensor, max_new_tokens: int,
                    eos_token_id: Optional[int] = None, *,
                    attention_mask: Optional[torch.Tensor] = None,
                    pad_token_id: Optional[int] = None) -> GenerationOutput:
    """Greedy decoding of ``prompt_ids`` ``[B, S]`` (the same on every rank; left-padded rows
    marked by ``attention_mask``) with ``model`` (a :class:`megatron_ext.models.decoder.CausalLM` built on
    ``groups``, pp = 1). Collective over the stage; see the module doc for the rules."""
    lengths = check_generate_inputs(model, groups, prompt_ids, max_new_tokens, eos_token_id,
                                    attention_mask, pad_token_id)
    if pad_token_id is None:
        pad_token_id = eos_token_id if eos_token_id is not None else 0
    device = next(model.parameters()).device
    prompts = prompt_ids.to(device=device, dtype=torch.long)
    B, S = prompts.shape
    local = _split_prompts(groups, prompts, lengths, pad_token_id)
    rows, b = local.rows_per_dp, local.batch
    cp = groups.topology.attn_cp
    slot_valid = None if local.segment_ids is None else local.segment_ids >= 0
    cache = KVCache(groups.attn_cp, b, local.padded_len // cp, max_new_tokens, slot_valid,
                    device=device)

    t0 = time.perf_counter()
    if local.padded_len:
        model(local.input_ids, position_ids=local.position_ids, token_index=local.token_index,
              segment_ids=local.segment_ids, layout=_layout(groups, rows, local.padded_len // cp),
              kv_cache=cache, compute_lm_head=False, compute_aux_loss=False)
    cache.start_decoding()
    t1 = time.perf_counter()

    tokens = torch.full((B, S + max_new_tokens), pad_token_id, dtype=torch.long, device=device)
    tokens[:, :S] = prompts
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    mine = slice(local.row_start, local.row_start + b)
    current = prompts[mine, S - 1]
    positions = local.lengths - 1
    decode_layout = _layout(groups, rows, 1)
    logits = None
    steps = 0
    for t in range(max_new_tokens):
        out = model(current[:, None], position_ids=(positions + t)[:, None], layout=decode_layout,
                    kv_cache=cache, gather_logits=True, compute_aux_loss=False)
        cache.end_step()
        steps += 1
        logits = out.logits[:, -1]
        chosen = _from_cp_rank0(logits.argmax(-1), groups, rows)
        if eos_token_id is not None:
            chosen = torch.where(finished, torch.full_like(chosen, pad_token_id), chosen)
            finished |= chosen == eos_token_id
        tokens[:, S + t] = chosen
        if eos_token_id is not None and bool(finished.all()):
            break
        current = chosen[mine]
    t2 = time.perf_counter()
    last_logits = _from_cp_rank0(logits, groups, rows)
    return GenerationOutput(tokens.to(prompt_ids.device), last_logits, steps, t1 - t0, t2 - t1,
                            lengths, cache.slots, cache.tokens(), cache.nbytes())


def generate(model, groups: ParallelGroups, prompt_ids: torch.Tensor, max_new_tokens: int,
             eos_token_id: Optional[int] = None, *, attention_mask: Optional[torch.Tensor] = None,
             pad_token_id: Optional[int] = None) -> torch.Tensor:
    """Greedy tokens ``[B, S + max_new_tokens]``, identical on every rank (what
    ``transformers``' ``generate(do_sample=False)`` returns, padded to full length after an
    all-rows EOS). See :func:`greedy_generate`."""
    return greedy_generate(model, groups, prompt_ids, max_new_tokens, eos_token_id,
                           attention_mask=attention_mask, pad_token_id=pad_token_id).tokens
