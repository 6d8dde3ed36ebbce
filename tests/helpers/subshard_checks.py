"""Rank programs for the layouts whose MoE shards are smaller than an attention-TP group (issue
15): a whole ``CausalLM`` stage in each layout against the one-process run of the same weights.

Kept free of pytest so spawned ranks import little. The parent builds the reference once
(:func:`reference_case`: float64 weights, logits, loss parts and every gradient) and saves it; each
rank loads its slices of the weights through the ParamSpecs, runs forward and backward (pp 2: by
hand, stage 0 sends its hidden states to stage 1 and receives their gradient back), sums every
gradient over its ``grad_sync`` axes and reports the worst differences, plus the collectives each
decoder layer issued in forward and the backward totals.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.distributed as dist

from megatron_ext.models.config import ModelConfig
from megatron_ext.models.decoder import CausalLM
from megatron_ext.parallel.comm_counter import count_collectives
from megatron_ext.parallel.groups import ParallelGroups, build_groups
from megatron_ext.parallel.param_meta import get_spec
from megatron_ext.parallel.topology import Topology
from megatron_ext.training.trainer import aux_loss_share

AUX_COEF = 0.1
B, S = 4, 10   # S divides by no 2·attn_cp > 2: the CP split pads


def models() -> dict[str, ModelConfig]:
    """Qwen3-MoE (every layer sparse) and Qwen2-MoE (shared expert with its gate, a dense layer
    between two sparse ones), with 8 query heads so attention TP 8 fits; tiny otherwise."""
    return {
        "qwen3-moe": ModelConfig.preset("tiny-qwen3-moe").replace(num_heads=8, num_kv_heads=4),
        "qwen2-moe": ModelConfig.preset("tiny-qwen2-moe").replace(num_heads=8, num_kv_heads=4),
    }


@dataclass(frozen=True)
class Layout:
    """Topology sizes (world given by the spawn) + ``CausalLM`` options."""

    label: str
    sizes: dict
    options: dict = field(default_factory=dict)


def _loss(out, labels_numel: int, aux_share: Optional[torch.Tensor]) -> torch.Tensor:
    loss = out.loss.sum() / labels_numel if out.loss is not None else torch.zeros((),
                                                                                    dtype=torch.float64)
    return loss + AUX_COEF * aux_share if aux_share is not None else loss


def reference_case(config: ModelConfig, seed: int) -> dict:
    """One process, float64: weights (random norms and biases too), batch, logits, loss parts
    and every gradient, by parameter name."""
    model = CausalLM(config, ParallelGroups.single_process(), dtype=torch.float64)
    model.init_weights(seed=seed, std=0.1)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith(".bias"):
                p.add_(0.1 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    ids = torch.randint(0, config.vocab_size, (B, S), generator=gen)
    labels = torch.randint(0, config.vocab_size, (B, S), generator=gen)
    out = model(ids, position_ids=torch.arange(S).expand(B, S), labels=labels, gather_logits=True,
                compute_aux_loss=False)
    aux = aux_loss_share(out.router_stats, model.groups, sum(config.sparse_layers))
    _loss(out, labels.numel(), aux).backward()
    return {"config": config, "input_ids": ids, "labels": labels,
            "weights": {n: p.detach().clone() for n, p in model.named_parameters()},
            "grads": {n: p.grad.detach().clone() for n, p in model.named_parameters()},
            "logits": out.logits.detach(), "ce_sum": float(out.loss.sum()), "aux": float(aux)}


def _layer_bounds(model: CausalLM, log) -> tuple[list, list]:
    """Hooks that record where each decoder layer's collectives start and end in ``log`` (layer
    ``l``'s span holds its prepare_attn — which completes layer ``l-1``'s pending sum —,
    attention, MLP and postprocess). Returns ``(bounds, hooks)``: ``bounds`` gets the start of
    the first layer, then each layer's end."""
    bounds: list = []
    layers = model.layers
    hooks = [layers[0].register_forward_pre_hook(lambda *_a: bounds.append(len(log.records)))]
    hooks += [layer.register_forward_hook(lambda *_a: bounds.append(len(log.records)))
              for layer in layers]
    return bounds, hooks


def _synced_grads(model: CausalLM, groups: ParallelGroups):
    """``(name, param, gradient summed over its grad_sync axes)`` — what the gradient sync does,
    as one flat all-reduce per axis of each set of parameters sharing their axes (not one per
    parameter: the spawned worlds stay fast)."""
    by_axes: dict = {}
    for name, p in model.named_parameters():
        by_axes.setdefault(get_spec(p).grad_sync, []).append((name, p))
    for axes, params in by_axes.items():
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                          for _, p in params])
        for axis in axes:
            if not groups.axis(axis).is_trivial:
                dist.all_reduce(flat, group=groups.axis(axis).group)
        for (name, p), grad in zip(params, torch.split(flat, [p.numel() for _, p in params])):
            yield name, p, grad.view_as(p)


def _run(groups: ParallelGroups, layout: Layout, case: dict) -> dict:
    """Forward + backward of this rank's stage; the worst differences and the collectives."""
    from megatron_ext.communication.local_batch import gather_to_global, split_batch

    topo, coords = groups.topology, groups.coords
    config = case["config"]
    model = CausalLM.for_stage(config, groups, dtype=torch.float64, **layout.options)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(get_spec(p).take_local(case["weights"][name]))
    batch = split_batch(groups, case["input_ids"], case["labels"])
    kwargs = batch.model_kwargs()
    first, last = model.pre_process, model.post_process
    peer = coords.rank + topo.stage_size * (1 if not last else -1)
    rows, hidden_in = batch.layout.rows(model.layers[0].modes.layer_input_mode), None
    if not first:
        hidden_in = torch.empty(rows, config.hidden_size, dtype=torch.float64)
        dist.recv(hidden_in, src=peer)
        hidden_in.requires_grad_()
        kwargs.pop("input_ids")
        kwargs["hidden_states"] = hidden_in
    if not last:
        kwargs.pop("labels")
    with count_collectives() as log:
        bounds, hooks = _layer_bounds(model, log)
        out = model(**kwargs, gather_logits=True, compute_aux_loss=False)
        for h in hooks:
            h.remove()
    ops = [(r.kind, str(r.axis)) for r in log.records]
    spans = [ops[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
    aux = aux_loss_share(out.router_stats, groups, sum(config.sparse_layers))
    loss = _loss(out, case["labels"].numel(), aux)
    with count_collectives() as bwd:
        if last:
            loss.backward()
        else:
            dist.send(out.hidden_states.detach().contiguous(), dst=peer)
            grad = torch.empty_like(out.hidden_states)
            dist.recv(grad, src=peer)
            (out.hidden_states * grad).sum().add(loss).backward()
    if not first:
        dist.send(hidden_in.grad.contiguous(), dst=peer)

    errors = {}
    parts = torch.tensor([out.loss.sum().item() if last else 0.0, float(aux)],
                         dtype=torch.float64)
    dist.all_reduce(parts[:1], group=groups.axis("attn_dp_cp").group)   # CE: same on attn_tp
    for axis in ("stage", "pp"):                                         # aux: every rank's share
        if not groups.axis(axis).is_trivial:
            dist.all_reduce(parts[1:], group=groups.axis(axis).group)
    if last:
        logits = gather_to_global(out.logits.detach(), batch, groups)
        errors["logits"] = float((logits - case["logits"]).abs().max())
        errors["ce_sum"] = abs(float(parts[0]) - case["ce_sum"])
    errors["aux"] = abs(float(parts[1]) - case["aux"])
    worst = 0.0
    for name, p, synced in _synced_grads(model, groups):
        spec = get_spec(p)
        got = spec.real_part(synced)
        want = case["grads"][name][spec.global_slices()]
        if got.numel():
            worst = max(worst, float((got - want).abs().max()))
    errors["grads"] = worst
    return {"errors": errors, "spans": spans, "tail": ops[bounds[-1]:],
            "backward": [(r.kind, str(r.axis)) for r in bwd.records],
            "modes": [layer.modes for layer in model.layers], "stage": coords.pp}


def run_layouts(rank: int, world: int, cases_file: str, layouts: list) -> dict:
    """Every layout x every model on this spawn's ranks; results keyed by (label, model)."""
    torch.manual_seed(0)
    cases = torch.load(cases_file, weights_only=False)
    built: dict = {}
    results = {}
    for layout in layouts:
        key = tuple(sorted(layout.sizes.items()))
        if key not in built:
            built[key] = build_groups(Topology(world=world, **layout.sizes), timeout_s=60)
        for name, case in cases.items():
            results[(layout.label, name)] = _run(built[key], layout, case)
    return results
