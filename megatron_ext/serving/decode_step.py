"""One batched decode step, without host syncs, and its CUDA-graph replay.

**One owner per decode token.** The rows of an attention-DP group (its requests, in cache-row
order) are split in contiguous blocks over its CP ranks (:func:`owned_rows`, the
``split_rows`` rule: the first ranks one row more). A CP rank embeds, normalises, runs the
MLP/MoE, the LM head and the sampler for its own rows only; the attention input is gathered
over ``attn_cp`` because every CP rank scores every query against its KV share
(:class:`~megatron_ext.communication.token_layout.TokenLayout` ``attn_gathers_cp``). A MoE on
``MOE_FULL`` rows therefore sees each token once: no expert work is duplicated. The sampled
token stays on its owner: it is the next step's input there, and nobody else needs it until
the periodic check (:mod:`megatron_ext.serving.generate`).

**No host syncs.** Every per-step quantity lives in a preallocated device buffer updated in
place: the input tokens, RoPE positions, the finished flags, the output tokens (column = the
step counter on the device), the KV cache's length and step counter. The host only counts
steps. On CUDA :class:`StepRunner` captures the step in a CUDA graph per batch shape (one eager
step first as warm-up, then capture, then replay); elsewhere the same function runs eagerly.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from megatron_ext.communication.collectives import all_gather
from megatron_ext.communication.symm_collectives import align_slots
from megatron_ext.communication.token_layout import (TokenLayout, cp_replication_applies,
                                                     split_rows)
from megatron_ext.parallel.groups import ParallelGroups
from megatron_ext.parallel.topology import Topology
from megatron_ext.serving.kv_cache import KVCache
from megatron_ext.serving.sampling import SamplingParams, SamplingTensors, sample_tokens


def owned_rows(batch: int, cp_size: int, cp_rank: int) -> slice:
    """Rows of an attention-DP group's ``batch`` decode rows that CP rank ``cp_rank`` owns."""
    sizes = split_rows(batch, cp_size)
    start = sum(sizes[:cp_rank])
    return slice(start, start + sizes[cp_rank])


def batch_bucket(n: int) -> int:
    """Rows a batch of ``n`` live requests is kept at (CUDA graphs are captured per shape):
    powers of two up to 8, then multiples of 8."""
    if n <= 8:
        return 1 << max(0, (n - 1).bit_length())
    return -(-n // 8) * 8


DECODE_ROWS = ("auto", "owner", "replicated")


def resolve_decode_rows(decode_rows: str, topo: Topology) -> bool:
    """``decode_rows`` → whether rows are replicated over CP: ``"owner"`` never (one owner per
    token), ``"replicated"`` always (ValueError where it does not apply), ``"auto"`` where it
    applies (two collectives per layer instead of four; the same tokens). Pure: callable before
    any process group exists."""
    if decode_rows not in DECODE_ROWS:
        raise ValueError(f"decode_rows={decode_rows!r} must be one of {DECODE_ROWS}")
    if decode_rows == "replicated" and not cp_replication_applies(topo):
        raise ValueError(f"decode_rows='replicated' needs attn_cp > 1, attn_tp 1 and the MoE "
                         f"token group = the CP group; this topology has attn_cp={topo.attn_cp}, "
                         f"attn_tp={topo.attn_tp}, token group {topo.token_group_size}")
    return decode_rows == "replicated" or (decode_rows == "auto" and cp_replication_applies(topo))


@dataclass(frozen=True)
class DecodeBatch:
    """Which requests every attention-DP group decodes, in cache-row order (the same on every
    rank of the stage). ``replicate_cp``: every CP rank runs every row of its group
    (:func:`resolve_decode_rows`); otherwise each row has one owner."""

    requests: tuple[tuple[int, ...], ...]   # [attn_dp][row] -> request id
    replicate_cp: bool = False

    def rows(self, dp_rank: int) -> int:
        return len(self.requests[dp_rank])

    def layout(self, groups: ParallelGroups) -> TokenLayout:
        """The rows every attention group runs: its owned rows (``attn_gathers_cp``), or all
        rows of its DP group (``cp_replicated``)."""
        cp = groups.topology.attn_cp
        if self.replicate_cp:
            counts = [len(rows) for rows in self.requests for _ in range(cp)]
            return TokenLayout.from_counts(groups, counts, cp_replicated=True)
        counts = [len(range(len(rows))[owned_rows(len(rows), cp, c)])
                  for rows in self.requests for c in range(cp)]
        return TokenLayout.from_counts(groups, counts, attn_gathers_cp=True)

    def owned_requests(self, groups: ParallelGroups, dp_rank: int, cp_rank: int
                       ) -> tuple[int, ...]:
        """Requests whose tokens CP rank ``cp_rank`` computes (all of its group's when
        replicated)."""
        rows = self.requests[dp_rank]
        if self.replicate_cp:
            return rows
        return self.sampled_requests(groups, dp_rank, cp_rank)

    def sampled_requests(self, groups: ParallelGroups, dp_rank: int, cp_rank: int
                         ) -> tuple[int, ...]:
        """Requests whose logits and tokens CP rank ``cp_rank`` computes in the LM head and the
        sampler: its owned rows, also when rows are replicated (each token is sampled once; the
        tokens are then all-gathered over CP)."""
        rows = self.requests[dp_rank]
        return rows[owned_rows(len(rows), groups.topology.attn_cp, cp_rank)]


class DecodeState:
    """This rank's device buffers of one :class:`DecodeBatch` and the step that updates them.

    ``positions`` ``[b]``: RoPE position of each row's next input token (every row of the DP
    group: the attention reads them all); ``input_ids`` / ``finished`` / ``tokens`` ``[n, ...]``:
    this rank's owned rows (``tokens[:, t]`` = the token generated at step ``t``, pad once
    finished); ``last_logits`` ``[m, V]`` (optional): logits of each row's last live step, for
    the ``m`` rows this rank samples (:meth:`DecodeBatch.sampled_requests`; ``params`` are the
    owned rows'). With rows replicated over CP a rank computes the LM head and the sampler for
    its share of the rows only, and one all-gather over ``attn_cp`` of the sampled tokens gives
    every rank every row's next input: the LM head's FLOPs and the sampler's sort are not
    repeated on every CP rank."""

    _serials = itertools.count()

    def __init__(self, model, groups: ParallelGroups, cache: KVCache, batch: DecodeBatch, *,
                 positions: torch.Tensor, input_ids: torch.Tensor, finished: torch.Tensor,
                 tokens: torch.Tensor, params: Sequence[SamplingParams],
                 eos_token_id: Optional[int], pad_token_id: int,
                 keep_logits: bool, vocab_size: int):
        coords = groups.coords
        self.serial = next(DecodeState._serials)   # graphs belong to one state's buffers
        self.model, self.groups, self.cache, self.batch = model, groups, cache, batch
        self.layout = batch.layout(groups)
        rows = batch.rows(coords.attn_dp)
        cp = groups.topology.attn_cp
        owned = owned_rows(rows, cp, coords.attn_cp)
        self.own = slice(0, rows) if batch.replicate_cp else owned
        # replicated rows: this rank's share of the LM head and sampler, gathered over CP
        self.logit_rows = owned if batch.replicate_cp else None
        self.sampled_sizes = split_rows(rows, cp)
        sampled = list(params)[self.sampled_rows]
        self.positions = positions
        self.own_positions = positions[self.own]   # a view: updated with ``positions``
        self.input_ids, self.finished, self.tokens = input_ids, finished, tokens
        dev = positions.device
        self.sampling = SamplingTensors.build(sampled, dev)
        self.max_new = torch.tensor([p.max_new_tokens for p in params], dtype=torch.long,
                                    device=dev)
        self.eos_token_id, self.pad_token_id = eos_token_id, pad_token_id
        self.last_logits = (torch.zeros(len(sampled), vocab_size, device=dev,
                                        dtype=next(model.parameters()).dtype)
                            if keep_logits else None)

    @property
    def sampled_rows(self) -> slice:
        """This rank's rows (of ``tokens``, ``finished``, the owned rows' ``params``) that it
        samples: all of them, or its share when rows are replicated over CP."""
        return slice(None) if self.logit_rows is None else self.logit_rows

    @property
    def key(self) -> tuple:
        """What a captured graph depends on: the rows of every DP group (and their mode)."""
        return tuple(len(r) for r in self.batch.requests) + (self.batch.replicate_cp,)

    @torch.no_grad()
    def step(self) -> None:
        """One decode step of every row: forward, sample on the owner, update the buffers.
        Device work only (capturable)."""
        cache = self.cache
        out = self.model(self.input_ids[:, None], position_ids=self.own_positions[:, None],
                         attn_position_ids=self.positions[:, None], layout=self.layout,
                         kv_cache=cache, gather_logits=True, compute_aux_loss=False,
                         check_input_ids=False,  # the sampler's own tokens: no host sync
                         logit_rows=self.logit_rows)
        logits = out.logits[:, -1]
        t = cache.step_t
        chosen = sample_tokens(logits, self.sampling, t)
        if self.last_logits is not None:
            finished = self.finished[self.sampled_rows]
            self.last_logits.copy_(torch.where(finished[:, None], self.last_logits,
                                               logits.to(self.last_logits.dtype)))
        if self.logit_rows is not None:   # every CP rank: every row's token
            chosen = all_gather(chosen, self.groups.attn_cp, sizes=self.sampled_sizes,
                                backward="own_rows")
        chosen = torch.where(self.finished, self.pad_token_id, chosen)
        self.tokens.index_copy_(1, t.view(1), chosen[:, None])
        done = t + 1 >= self.max_new
        if self.eos_token_id is not None:
            done = done | (chosen == self.eos_token_id)
        self.finished |= done
        self.input_ids.copy_(chosen)
        self.positions.add_(1)
        cache.device_step_end()


class StepRunner:
    """Runs :meth:`DecodeState.step`: eagerly, or on CUDA as CUDA graphs keyed by batch shape
    (first step of a shape eager — warm-up, lazy allocations —, then captured once and replayed;
    every graph shares one memory pool)."""

    def __init__(self, use_cuda_graphs: bool):
        self.use_cuda_graphs = bool(use_cuda_graphs)
        self._graphs: dict = {}
        self._warm: set = set()
        self._pool = None
        self.captures = 0

    def run(self, state: DecodeState) -> None:
        key = (state.serial, state.key)
        if not self.use_cuda_graphs:
            state.step()
            return
        if key not in self._warm:    # a real step, on a side stream as capture warm-ups should be
            self._warm.add(key)
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                state.step()
                align_slots(state.groups)   # eager: the barrier kernel compiles here
            torch.cuda.current_stream().wait_stream(side)
            return
        graph = self._graphs.get(key)
        if graph is None:
            graph = self._capture(state.step, state.groups)
            self._graphs = {k: g for k, g in self._graphs.items() if k[0] == state.serial}
            self._graphs[key] = graph
        align_slots(state.groups)   # the graph starts on slot 0: make it the next one
        graph.replay()

    def _capture(self, fn: Callable[[], None], groups: ParallelGroups):
        """A graph of ``fn`` whose symmetric-memory calls start on slot 0 and take an even number
        of slots, so its replays keep the buffers' two slots alternating."""
        torch.cuda.synchronize()
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        align_slots(groups)
        with torch.cuda.graph(graph, pool=self._pool):
            fn()
            align_slots(groups)
        self.captures += 1
        return graph
