"""Pipeline-parallel training step on ``torch.distributed.pipelining`` (1F1B or GPipe).

Each rank wraps its stage's :class:`~megatron_ext.models.decoder.CausalLM` (the layers of its stage, built with
``pre_process`` / ``post_process``) in :class:`StageModule`, the form the schedules drive:

* positional input: ``input_ids`` on the first stage, the previous stage's ``hidden_states``
  (``[b·s_local, H]``, the residual stream after the stage's pending reductions were flushed)
  on the others; per-micro-batch keyword inputs (``position_ids``, ``token_index``,
  ``segment_ids``, and ``labels`` on the last stage) go to every stage through the schedule's
  kwargs chunking, so CP positions and padding masks reach every layer;
* output: the hidden states to send, or on the last stage this micro-batch's loss contribution
  ``sum(per-token loss) / global label tokens`` (+ the MoE auxiliary term) as a ``[1]`` tensor.

The MoE auxiliary loss of a non-last stage has no path to the last stage's loss, so it is attached
to the stage output by :class:`AttachLoss` (identity forward; its backward hands the auxiliary
term a gradient of 1, Megatron's ``MoEAuxLossAutoScaler`` idea) and back-propagates with the
stage's backward. ``scale_grads=False``: the loss is already normalised by the global token
count, micro-batch gradients are summed.

Every rank of a stage runs the same micro-batches in the same order, so the collectives inside the
layers (TP, CP, MOE_FULL) line up; only the point-to-point activations cross stages (over the
``pp`` group). Shapes are static (fixed ``seq_len``, CP padding included), given to
``PipelineStage`` up front so no meta-tensor forward (which would hit collectives) is needed.
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import Callable, Optional

import torch
from torch import nn

from megatron_ext.data.batching import MicroBatch
from megatron_ext.parallel.groups import ParallelGroups


def loss_precision(t: torch.Tensor) -> torch.Tensor:
    """``t`` in float32 at least: losses of bf16 runs sum in float32, float64 runs stay exact
    (a ``.float()`` would round their loss, and the loss scale its gradient, to float32)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


class AttachLoss(torch.autograd.Function):
    """``y = x`` in forward; backward also returns ``1`` for ``loss``, so ``loss`` joins the
    backward pass that starts from ``y``'s gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:
        ctx.loss_meta = (loss.shape, loss.dtype, loss.device)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        shape, dtype, device = ctx.loss_meta
        return grad, torch.ones(shape, dtype=dtype, device=device)


class StageModule(nn.Module):
    """One pipeline stage as ``torch.distributed.pipelining`` runs it (see the module doc)."""

    def __init__(self, model: nn.Module, is_first: bool, is_last: bool,
                 aux_loss: Callable[[list], Optional[torch.Tensor]],
                 boundary_dtype: torch.dtype, autocast: Callable[[], object] = nullcontext):
        super().__init__()
        self.model = model
        self.is_first, self.is_last = is_first, is_last
        self.aux_loss = aux_loss  # router stats of this stage -> this rank's aux share
        self.boundary_dtype = boundary_dtype
        self.autocast = autocast
        # set before every step
        self.loss_scale = 1.0      # 1 / global label tokens
        self.aux_scale = 0.0       # aux_coef / micro-batches per rank
        self.lm_parts: list[torch.Tensor] = []
        self.aux_parts: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor, *, position_ids: torch.Tensor, token_index: torch.Tensor,
                segment_ids: torch.Tensor, labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        kwargs = dict(position_ids=position_ids, token_index=token_index, segment_ids=segment_ids,
                      compute_aux_loss=False)
        with self.autocast():
            if self.is_first:
                out = self.model(x, **kwargs, labels=labels, return_logits=False)
            else:
                out = self.model(hidden_states=x.to(self.boundary_dtype), **kwargs,
                                 labels=labels, return_logits=False)
        aux = self.aux_loss(out.router_stats) if self.aux_scale else None
        if aux is not None:
            aux = loss_precision(aux) * self.aux_scale
            self.aux_parts.append(aux.detach())
        if self.is_last:
            lm = loss_precision(out.loss).sum() * self.loss_scale
            self.lm_parts.append(lm.detach())
            total = lm + aux if aux is not None else lm
            return total.reshape(1)
        hidden = out.hidden_states.to(self.boundary_dtype)
        expected = (position_ids.numel(), hidden.shape[-1])
        if tuple(hidden.shape) != expected:
            raise RuntimeError(f"stage output has shape {tuple(hidden.shape)}, the pipeline "
                               f"expects {expected} (b*s_local rows in TP_ATTN_FULL)")
        if aux is not None:
            hidden = AttachLoss.apply(hidden, aux)
        return hidden


def _loss_of_output(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The last stage already returns its loss contribution; ``target`` is a placeholder."""
    return output.sum()


class PipelineRunner:
    """Builds the ``PipelineStage`` and schedule once and runs one training step per call."""

    def __init__(self, stage_module: StageModule, groups: ParallelGroups, n_microbatches: int,
                 micro_batch_size: int, local_len: int, hidden_size: int, device: torch.device,
                 schedule: str = "1f1b") -> None:
        from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

        topo = groups.topology
        self.module = stage_module
        self.groups = groups
        self.n_microbatches = n_microbatches
        stage, pp = groups.coords.pp, topo.pp
        rows = micro_batch_size * local_len
        # activations crossing stages carry gradients back: the examples must say so
        hidden = torch.empty(rows, hidden_size, dtype=stage_module.boundary_dtype, device=device,
                             requires_grad=True)
        example_in = (torch.zeros(micro_batch_size, local_len, dtype=torch.long, device=device)
                      if stage == 0 else hidden)
        example_out = torch.empty(1, dtype=torch.float32, device=device) \
            if stage == pp - 1 else hidden
        self.stage = PipelineStage(stage_module, stage, pp, device, input_args=(example_in,),
                                   output_args=(example_out,), group=groups.pp.group)
        # 1F1B needs at least as many micro-batches as stages; GPipe runs any number
        kind = Schedule1F1B if schedule == "1f1b" and n_microbatches >= pp else ScheduleGPipe
        self.schedule_name = kind.__name__
        self.schedule = kind(self.stage, n_microbatches=n_microbatches, loss_fn=_loss_of_output,
                             scale_grads=False)
        self.is_first, self.is_last = stage == 0, stage == pp - 1

    def step(self, micro_batches: list[MicroBatch], loss_scale: float, aux_scale: float
             ) -> tuple[float, float]:
        """Forward + backward of every micro-batch. Returns this rank's ``(lm, aux)`` parts of
        the step's loss (lm only on the last stage)."""
        if len(micro_batches) != self.n_microbatches:
            raise ValueError(f"{len(micro_batches)} micro-batches, the schedule was built for "
                             f"{self.n_microbatches}")
        m = self.module
        m.loss_scale, m.aux_scale = loss_scale, aux_scale
        m.lm_parts, m.aux_parts = [], []

        def cat(name: str) -> torch.Tensor:
            return torch.cat([getattr(mb, name) for mb in micro_batches])

        kwargs = dict(position_ids=cat("position_ids"), token_index=cat("token_index"),
                      segment_ids=cat("segment_ids"))
        args = (cat("input_ids"),) if self.is_first else ()
        if self.is_last:
            kwargs["labels"] = cat("labels")
            target = torch.zeros(self.n_microbatches, device=kwargs["labels"].device)
            losses: list = []
            self.schedule.step(*args, target=target, losses=losses, **kwargs)
        else:
            self.schedule.step(*args, **kwargs)
        lm = float(sum(m.lm_parts)) if m.lm_parts else 0.0
        aux = float(sum(m.aux_parts)) if m.aux_parts else 0.0
        return lm, aux
