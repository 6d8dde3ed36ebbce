"""The pretraining loop: model of this rank's pipeline stage, data, one step = forward/backward of
every micro-batch, gradient sync, global-norm clipping, AdamW; logging, checkpoints, resume.

``validate_launch`` checks everything that can be checked without a process group (layout, model
fit, tokenizer vs vocabulary, data) and is called before ``torch.distributed`` starts, on every
rank alike, so a bad launch is an error and never a hang. ``Trainer`` then runs on the groups.

The loss is the mean over every real label token of the global batch: each micro-batch adds
``sum(per-token loss) / global label tokens`` (computed from the global batch, which every rank
reads), and gradients are summed (``TrainOptimizer.finish_grad_sync``).

The MoE load-balancing loss is ``router_aux_loss_coef`` times the mean over MoE layers of each
layer's Switch/HF loss ``E·Σ f_e·P_e`` (over the tokens of the stage micro-batch), averaged over
micro-batches; each rank back-propagates its share. Per layer, not pooled over layers as in
``transformers``' ``load_balancing_loss_func``: pooling couples every layer with every other, so
a pipeline stage could not compute its part before the later stages ran; the per-layer mean
(Megatron's choice) splits exactly over stages, so every layout optimises the same objective. With
one MoE layer the two coincide.
"""
from __future__ import annotations

import math
import os
import time
import uuid
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch

from megatron_ext.data.batching import StepBatch, split_global_batch
from megatron_ext.layers.backend import resolve_transformer_impl
from megatron_ext.data.dataset import SampleOrder, TokenDataset, open_dataset
from megatron_ext.data.tokenizer import Tokenizer, load_tokenizer, resolve_tokenizer
from megatron_ext.parallel.axes import Axis
from megatron_ext.parallel.groups import ParallelGroups
from megatron_ext.parallel.topology import Topology
from megatron_ext.checkpoint import training_state as ckpt
from megatron_ext.checkpoint.checkpoint_dirs import describe_checkpoint
from megatron_ext.training.config import LAYOUT_FIELDS, TrainConfig
from megatron_ext.training.hf_init import hf_init_source
from megatron_ext.training.resume_check import check_resume_matches
from megatron_ext.training.logging import MetricsLogger
from megatron_ext.training.optimizer import LRSchedule, TrainOptimizer
from megatron_ext.training.pipeline import loss_precision
from megatron_ext.communication.raw import all_reduce_

VOCAB_MULTIPLE = 64


class TrainingDiverged(RuntimeError):
    """The loss or the gradient norm is NaN/inf: the run stops before the update."""


@dataclass(frozen=True)
class LaunchPlan:
    """Everything validated before process groups exist."""

    topology: Topology
    model_config: object  # megatron_ext.models.config.ModelConfig
    tokenizer: Tokenizer
    dataset: TokenDataset
    resume_from: Optional[str]
    transformer_impl: str = "native"  # resolved: native or te
    init_from: Optional[str] = None  # HF directory of the initial weights; None: random init
    train_samples: int = 0               # samples of ``dataset`` training draws from (a prefix)
    eval_set: Optional["EvalSet"] = None
    notes: tuple[str, ...] = ()          # said once on rank 0 at start


@dataclass(frozen=True)
class EvalSet:
    """The validation windows: ``count`` samples of ``dataset`` from index ``first`` (held out of
    training when it is the training dataset)."""

    dataset: TokenDataset
    first: int
    count: int


def build_model_config(cfg: TrainConfig, tokenizer: Tokenizer):
    """The model of ``cfg.model`` with ``model_overrides`` (a new ``num_layers`` keeps an all-sparse
    or all-dense pattern); a preset's vocabulary grows (to a multiple of 64) to hold the
    tokenizer's, an HF model's must already hold it."""
    from megatron_ext.models.config import PRESETS, load_model_config

    config = load_model_config(cfg.model, strict=cfg.strict_config)
    overrides = dict(cfg.model_overrides)
    if cfg.model in PRESETS and "vocab_size" not in overrides \
            and config.vocab_size < tokenizer.vocab_size:
        overrides["vocab_size"] = -(-tokenizer.vocab_size // VOCAB_MULTIPLE) * VOCAB_MULTIPLE
    if "num_layers" in overrides and "sparse_layers" not in overrides:
        pattern = set(config.sparse_layers)
        if len(pattern) > 1:
            raise ValueError(f"model_overrides num_layers={overrides['num_layers']}: {cfg.model} "
                             f"mixes dense and sparse layers; give sparse_layers too")
        overrides["sparse_layers"] = [pattern.pop()] * int(overrides["num_layers"])
    if overrides:
        try:
            config = config.replace(**overrides)
        except TypeError as err:
            raise ValueError(f"model_overrides {sorted(overrides)}: {err}") from None
    if config.vocab_size < tokenizer.vocab_size:
        raise ValueError(f"model vocab_size={config.vocab_size} is smaller than the tokenizer's "
                         f"{tokenizer.vocab_size} ({tokenizer.name})")
    return config


def validate_launch(cfg: TrainConfig, world: int) -> LaunchPlan:
    """Every check that needs no process group; raises ``ValueError`` naming the problem."""
    from megatron_ext.parallel.stages import stage_layer_range

    topo = cfg.topology(world)
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device=cuda but CUDA is not available on this machine (use --device cpu)")
    tokenizer = load_tokenizer(resolve_tokenizer(cfg.tokenizer, cfg.model))
    model_config = build_model_config(cfg, tokenizer)
    notes = list(cfg.notes)
    ignored = model_config.ignored_fields_note(cfg.model)
    if ignored:
        notes.append(ignored)
    model_config.check_fits(topo)
    stage_layer_range(model_config.num_layers, topo.pp, 0)  # every stage gets a layer
    if cfg.seq_len > model_config.position_limit:
        raise ValueError(f"seq_len={cfg.seq_len} exceeds the model's "
                         f"{model_config.position_limit_text()}")
    dataset = open_dataset(cfg.data, tokenizer)
    dataset.check_for(cfg.seq_len, cfg.global_batch_size, model_config.vocab_size,
                      tokenizer.name)
    train_samples = dataset.num_samples(cfg.seq_len)
    eval_set = None
    if cfg.eval_interval:
        eval_set = _eval_set(cfg, topo, tokenizer, model_config.vocab_size, dataset, train_samples)
        if eval_set.dataset is dataset:
            train_samples = eval_set.first
    resume_from = ckpt.resolve_resume(cfg.resume, cfg.checkpoint_dir)
    if resume_from:
        state = ckpt.read_train_state(resume_from)
        check_resume_matches(resume_from, state, cfg, model_config)
        if not cfg.allow_resume_changes:
            check_resumable(state, resume_from, tokenizer, train_samples)
    existing = ckpt.latest_checkpoint(cfg.checkpoint_dir)
    if cfg.resume is None and existing and not cfg.overwrite:
        raise ValueError(f"output_dir {cfg.output_dir} already holds checkpoints (last saved: "
                         f"{describe_checkpoint(existing)}); pass --resume to continue that run, "
                         f"--overwrite to start a new one there, or another --output-dir")
    on_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    impl = resolve_transformer_impl(cfg.transformer_impl, cuda_available=on_cuda)
    init_from = hf_init_source(cfg.model, cfg.init_from_hf, model_config, cfg.model_overrides)
    return LaunchPlan(topo, model_config, tokenizer, dataset, resume_from, impl, init_from,
                      train_samples=train_samples, eval_set=eval_set, notes=tuple(notes))


def resolved_settings(cfg: TrainConfig, plan: LaunchPlan) -> dict:
    """The run's settings with what was derived made explicit (layout sizes, the tokenizer
    ``auto`` chose, learning rates): ``--config`` on this mapping repeats the run."""
    values = cfg.to_dict()
    values.update({k: getattr(plan.topology, k) for k in LAYOUT_FIELDS})
    values["tokenizer"] = getattr(plan.tokenizer, "path", plan.tokenizer.name)
    return values


def write_settings_yaml(cfg: TrainConfig, plan: LaunchPlan) -> str:
    """``<output_dir>/config.yaml``: :func:`resolved_settings` (rank 0 calls this)."""
    import yaml

    os.makedirs(cfg.output_dir, exist_ok=True)
    path = os.path.join(cfg.output_dir, "config.yaml")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(f"# resolved settings of this run (pretrain --config {path} repeats it)\n")
        yaml.safe_dump(resolved_settings(cfg, plan), f, sort_keys=False)
    os.replace(tmp, path)
    return path


def check_resumable(state: dict, path: str, tokenizer: Tokenizer, train_samples: int) -> None:
    """Refuse a checkpoint whose data would be read differently: another tokenizer (compared by
    content, so the same tokenizer at another path is fine) or another set of training samples
    (e.g. a different validation hold-out)."""
    saved = (state.get("tokenizer") or {}).get("name")
    if saved is not None and saved != tokenizer.name:
        raise ValueError(f"checkpoint {path} was trained with tokenizer {saved} "
                         f"({state['tokenizer'].get('path')}); this run's tokenizer is "
                         f"{tokenizer.name} (a different vocabulary: pass the same --tokenizer)")
    saved_samples = state.get("train_samples")
    if saved_samples is not None and saved_samples != train_samples:
        raise ValueError(f"checkpoint {path} drew from {saved_samples} training samples; this run "
                         f"draws from {train_samples} (eval_data / eval_iters / seq_len changed "
                         f"the hold-out; the sample order would differ)")


def _eval_set(cfg: TrainConfig, topo: Topology, tokenizer: Tokenizer, vocab_size: int,
              dataset: TokenDataset, train_samples: int) -> EvalSet:
    """``--eval-data``'s first ``eval_iters`` global batches, else the training data's last ones
    (held out: training never draws them)."""
    if topo.pp > 1:
        raise ValueError("eval_interval needs pp=1 (validation runs the whole model forward-only; "
                         "the pipeline schedules always run backward); set eval_interval=0")
    count = cfg.eval_iters * cfg.global_batch_size
    if cfg.eval_data is not None:
        eval_data = open_dataset(cfg.eval_data, tokenizer)
        eval_data.check_for(cfg.seq_len, count, vocab_size, tokenizer.name)
        return EvalSet(eval_data, 0, count)
    if train_samples - count < cfg.global_batch_size:
        raise ValueError(f"eval_iters={cfg.eval_iters}: holding out {count} samples of "
                         f"{cfg.seq_len} tokens for validation leaves {train_samples - count} of "
                         f"{train_samples} for training, fewer than global_batch_size="
                         f"{cfg.global_batch_size}; give eval_data or lower eval_iters")
    return EvalSet(dataset, train_samples - count, count)


def aux_loss_share(stats: list, groups: ParallelGroups, num_moe_layers: int
                   ) -> Optional[torch.Tensor]:
    """This rank's share of the per-layer-mean load-balancing loss of this stage's MoE layers
    (summed over the stage's ranks and the stages it is the model's loss; no coefficient)."""
    if not stats:
        return None
    from megatron_ext.layers.moe import load_balancing_loss

    total = sum(load_balancing_loss([s], (groups.stage,)) for s in stats)
    return total / num_moe_layers


def checkpoint_name(param_name: str, model_config) -> str:
    """The layout-independent name of a parameter. Module names already are (HF names, global
    layer indices), except a tied LM head: one process holds the embedding once, while with
    pipeline stages the last stage holds its own ``lm_head.weight`` copy (kept equal by the
    ``embedding`` gradient sync); both are the embedding tensor in a checkpoint."""
    if model_config.tie_word_embeddings and param_name == "lm_head.weight":
        return "model.embed_tokens.weight"
    return param_name


@dataclass
class StepMetrics:
    step: int             # optimizer steps completed
    loss: float           # mean cross-entropy over the global batch's label tokens
    aux_loss: float       # MoE load-balancing loss (without coefficient), mean over micro-batches
    grad_norm: float      # before clipping
    lr: float
    tokens: int
    step_time_s: float

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.step_time_s if self.step_time_s > 0 else float("nan")

    def as_dict(self) -> dict:
        return {"loss": self.loss, "aux_loss": self.aux_loss, "grad_norm": self.grad_norm,
                "lr": self.lr, "tokens": self.tokens, "step_time_s": self.step_time_s,
                "tokens_per_s": self.tokens_per_s}


def fused_reduce_add_norm(groups: ParallelGroups, device: torch.device):
    """On CUDA with attention TP, pending attention-TP sums complete in one symmetric-memory
    reduce + residual add + RMSNorm (design §6); elsewhere the communicator's unfused path.
    Collective when it returns a hook: every rank builds its model at the same point."""
    if device.type != "cuda" or groups.attn_tp.is_trivial:
        return None
    from megatron_ext.communication.fused_reduce_norm import build_symm_mem_reduce_add_norm

    return build_symm_mem_reduce_add_norm(groups, device)


def pick_device(cfg: TrainConfig) -> torch.device:
    if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ValueError("device=cuda but CUDA is not available")
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class Trainer:
    def __init__(self, cfg: TrainConfig, groups: ParallelGroups, plan: LaunchPlan,
                 device: Optional[torch.device] = None) -> None:
        from megatron_ext.models.decoder import CausalLM
        from megatron_ext.parallel.stages import stage_layer_range

        self.cfg, self.groups, self.plan = cfg, groups, plan
        topo = groups.topology
        if topo != plan.topology:
            raise ValueError(f"groups were built for {topo}, the launch plan is {plan.topology}")
        self.device = device or pick_device(cfg)
        self.rank = groups.global_rank
        stage = groups.coords.pp
        self.is_first_stage, self.is_last_stage = stage == 0, stage == topo.pp - 1
        mc = plan.model_config
        self.aux_coef = float(mc.router_aux_loss_coef) if any(mc.sparse_layers) else 0.0
        self.num_moe_layers = sum(bool(x) for x in mc.sparse_layers)
        layer_range = stage_layer_range(mc.num_layers, topo.pp, stage)
        self.model = CausalLM(mc, groups, pre_process=self.is_first_stage,
                              post_process=self.is_last_stage, layer_range=layer_range,
                              cp_strategy=cfg.cp_comm, device=self.device,
                              dtype=torch.float64 if cfg.dtype == "float64" else None,
                              transformer_impl=plan.transformer_impl,
                              make_vocab_size_divisible_by=cfg.make_vocab_size_divisible_by,
                              fused_reduce_add_norm=fused_reduce_add_norm(groups, self.device))
        self._init_weights()
        self.model.set_recompute(cfg.recompute)
        self.named_params = [(checkpoint_name(n, mc), p)
                             for n, p in self.model.named_parameters() if p.requires_grad]
        self.use_bf16 = cfg.dtype == "bf16" or (cfg.dtype == "auto" and self.device.type == "cuda")
        self.schedule = LRSchedule(cfg.lr, cfg.min_lr, cfg.warmup_steps, cfg.train_steps)
        self.optimizer = TrainOptimizer(
            self.named_params, groups, self.schedule, cfg.clip_grad, cfg.weight_decay,
            (cfg.adam_beta1, cfg.adam_beta2), cfg.adam_eps,
            distributed=cfg.use_distributed_optimizer(topo),
            param_dtype=torch.bfloat16 if self.use_bf16 else None,
            bucket_bytes=int(cfg.grad_bucket_mb * 2**20),
            overlap_grad_reduce=cfg.overlap_grad_reduce,
            overlap_param_gather=cfg.overlap_param_gather)
        if cfg.overlap_param_gather:
            self.optimizer.attach_param_gather_hooks(self.model)
        self.order = SampleOrder(plan.train_samples, cfg.seed, cfg.shuffle)
        self.micro_batches_per_rank = cfg.num_microbatches(topo)
        self.step = 0
        self.consumed_samples = 0
        self.run_id = uuid.uuid4().hex[:12]  # names this run in its checkpoints' lineage
        self.pipeline = None
        if topo.pp > 1:
            self.pipeline = self._build_pipeline()
        self.logger: Optional[MetricsLogger] = None
        self.stopped_by = 0
        self.validation: list[tuple[int, float]] = []  # (step, validation loss)

    # ------------------------------------------------------------------ setup
    def _init_weights(self) -> None:
        from megatron_ext.checkpoint.hf import load_hf_checkpoint

        if self.plan.init_from:  # validate_launch checked that every weight is there
            load_hf_checkpoint(self.model, self.plan.init_from)
        else:
            self.model.init_weights(seed=self.cfg.seed)

    @property
    def param_dtype_name(self) -> str:
        """The parameters' dtype for the start-up line: bf16, fp32 or float64."""
        return {torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "float64"}.get(
            next(self.model.parameters()).dtype, str(next(self.model.parameters()).dtype))

    def describe_weights(self) -> str:
        return (f"weights: loaded from {self.plan.init_from}" if self.plan.init_from
                else f"weights: random init (seed {self.cfg.seed})")

    def _autocast(self):
        if not self.use_bf16:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def _build_pipeline(self):
        from megatron_ext.data.cp_split import cp_padded_length
        from megatron_ext.training.pipeline import PipelineRunner, StageModule

        topo = self.groups.topology
        local_len = cp_padded_length(self.cfg.seq_len, topo.attn_cp) // topo.attn_cp
        boundary = torch.bfloat16 if self.use_bf16 else next(self.model.parameters()).dtype
        module = StageModule(self.model, self.is_first_stage, self.is_last_stage,
                             lambda stats: aux_loss_share(stats, self.groups, self.num_moe_layers),
                             boundary, autocast=self._autocast)
        return PipelineRunner(module, self.groups, self.micro_batches_per_rank,
                              self.cfg.micro_batch_size, local_len,
                              self.plan.model_config.hidden_size, self.device,
                              schedule=self.cfg.pp_schedule)

    # ------------------------------------------------------------------ data
    def step_batch(self) -> StepBatch:
        idx = self.order.indices(self.consumed_samples, self.cfg.global_batch_size)
        return self._batch_of(self.plan.dataset, idx)

    def _batch_of(self, dataset: TokenDataset, indices) -> StepBatch:
        cfg = self.cfg
        samples = np.stack([dataset.sample(int(i), cfg.seq_len) for i in indices])
        return split_global_batch(samples, self.groups.topology, self.groups.coords,
                                  cfg.micro_batch_size, self.plan.tokenizer.pad_id)

    # ------------------------------------------------------------------ validation
    def validate(self) -> tuple[float, int]:
        """Mean next-token loss over the validation windows (``plan.eval_set``) and its token
        count; forward only, same layout and precision as training (collective over the world)."""
        es = self.plan.eval_set
        if es is None:
            raise ValueError("no validation set (eval_interval=0)")
        G = self.cfg.global_batch_size
        lm, tokens = 0.0, 0
        with torch.no_grad():
            for first in range(es.first, es.first + es.count, G):
                batch = self._batch_of(es.dataset, range(first, first + G))
                tokens += batch.global_label_tokens
                for mb in batch.micro_batches:
                    mb = mb.to(self.device)
                    with self._autocast():
                        out = self.model(mb.input_ids, position_ids=mb.position_ids,
                                         token_index=mb.token_index, segment_ids=mb.segment_ids,
                                         labels=mb.labels, return_logits=False,
                                         compute_aux_loss=False)
                    lm += float(loss_precision(out.loss).sum())
        loss, _ = self._reduce_report(lm, 0.0)
        return loss / tokens, tokens

    # ------------------------------------------------------------------ one step
    def _forward_backward(self, batch: StepBatch, inject_nan: bool) -> tuple[float, float]:
        """This rank's ``(lm, aux)`` parts of the loss; gradients accumulated."""
        loss_scale = 1.0 / batch.global_label_tokens
        aux_scale = self.aux_coef / self.micro_batches_per_rank
        if self.pipeline is not None:
            if inject_nan:
                loss_scale = float("nan")
            lm, aux = self.pipeline.step([mb.to(self.device) for mb in batch.micro_batches],
                                         loss_scale, aux_scale)
            return lm, (aux / self.aux_coef if self.aux_coef else 0.0)
        lm_total, aux_total = 0.0, 0.0
        for mb in batch.micro_batches:
            mb = mb.to(self.device)
            with self._autocast():
                out = self.model(mb.input_ids, position_ids=mb.position_ids,
                                 token_index=mb.token_index, segment_ids=mb.segment_ids,
                                 labels=mb.labels, return_logits=False, compute_aux_loss=False)
            lm = loss_precision(out.loss).sum() * loss_scale
            loss = lm
            aux = aux_loss_share(out.router_stats, self.groups, self.num_moe_layers) \
                if self.aux_coef else None
            if aux is not None:
                aux = loss_precision(aux) / self.micro_batches_per_rank
                loss = loss + self.aux_coef * aux
                aux_total += float(aux.detach())
            if inject_nan:
                loss = loss * float("nan")
            loss.backward()
            lm_total += float(lm.detach()) if not inject_nan else float("nan")
        return lm_total, aux_total

    def _reduce_report(self, lm: float, aux: float) -> tuple[float, float]:
        """Global ``(loss, aux_loss)``: lm counted once per attention-TP group of the last stage,
        aux summed over every rank (each holds its share)."""
        lm_mine = lm if (self.is_last_stage and self.groups.coords.attn_tp == 0) else 0.0
        if self.groups.topology.world == 1:
            return lm_mine, aux
        t = torch.tensor([lm_mine, aux], dtype=torch.float64,
                         device=self.device if self.device.type == "cuda" else "cpu")
        all_reduce_(t, self.groups.world)
        return float(t[0]), float(t[1])

    def train_step(self) -> StepMetrics:
        start = time.perf_counter()
        batch = self.step_batch()
        inject = self.cfg.inject_nan_at_step is not None and \
            self.step == self.cfg.inject_nan_at_step
        self.optimizer.zero_grad(self.micro_batches_per_rank)
        lm, aux = self._forward_backward(batch, inject)
        self.optimizer.finish_grad_sync()
        loss, aux_loss = self._reduce_report(lm, aux)
        grad_norm = self.optimizer.grad_norm()
        if not (math.isfinite(loss) and math.isfinite(aux_loss) and math.isfinite(grad_norm)):
            last = ckpt.latest_checkpoint(self.cfg.checkpoint_dir)
            raise TrainingDiverged(
                f"step {self.step + 1}: loss={loss} aux_loss={aux_loss} grad_norm={grad_norm} is "
                f"not finite; stopping before the update (no checkpoint written; the last good "
                f"one is {last or 'none'})")
        _, lr = self.optimizer.step(self.step, grad_norm)
        self.step += 1
        self.consumed_samples += self.cfg.global_batch_size
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return StepMetrics(self.step, loss, aux_loss, grad_norm, lr, batch.global_label_tokens,
                           time.perf_counter() - start)

    # ------------------------------------------------------------------ checkpoints
    def _shards(self) -> dict:
        self.optimizer.wait_params()
        return ckpt.collect_shards(self.optimizer.checkpoint_tensors())

    def save(self) -> str:
        state = {"step": self.step, "consumed_samples": self.consumed_samples,
                 "lr_schedule": self.schedule.__dict__, "config": self.cfg.to_dict(),
                 "model": self.plan.model_config.to_dict(),
                 "layout": {k: getattr(self.groups.topology, k) for k in
                            ("world", "pp", "attn_tp", "attn_cp", "attn_dp", "moe_tp", "moe_ep",
                             Axis.MOE_DP)},
                 "data": self.plan.dataset.source, "seed": self.cfg.seed,
                 "train_samples": self.plan.train_samples,
                 "tokenizer": {"name": self.plan.tokenizer.name,
                               "path": getattr(self.plan.tokenizer, "path", None),
                               "eos_id": self.plan.tokenizer.eos_id,
                               "pad_id": self.plan.tokenizer.pad_id,
                               "bos_id": self.plan.tokenizer.bos_id}}
        return ckpt.save_checkpoint(self.cfg.checkpoint_dir, self.step, self._shards(), state,
                                    keep=self.cfg.keep_checkpoints, run_id=self.run_id,
                                    resumed_from=self.plan.resume_from)

    def load(self, path: str) -> dict:
        state = ckpt.load_checkpoint(path, self._shards())
        if state["config"]["seed"] != self.cfg.seed or \
                state["data"] != self.plan.dataset.source:
            raise ValueError(f"checkpoint {path} was trained on {state['data']} with seed "
                             f"{state['config']['seed']}; this run uses {self.plan.dataset.source} "
                             f"with seed {self.cfg.seed} (the sample order would differ)")
        self.step = int(state["step"])
        self.consumed_samples = int(state["consumed_samples"])
        self.optimizer.after_load(self.step)
        return state

    # ------------------------------------------------------------------ loop
    def resume(self) -> Optional[str]:
        """Load the launch plan's checkpoint, if any (call before ``train``)."""
        if self.plan.resume_from:
            self.load(self.plan.resume_from)
        return self.plan.resume_from

    def train(self, logger: Optional[MetricsLogger] = None,
              stop: Optional[Callable[[], int]] = None) -> list[StepMetrics]:
        """Steps from the current one to ``train_steps``; saves on the way and at the end.
        ``stop`` (called after every step on every rank, same answer everywhere): non-zero ends
        the run after a save of that step; ``self.stopped_by`` keeps the value."""
        cfg = self.cfg
        history = []
        try:
            while self.step < cfg.train_steps:
                metrics = self.train_step()
                history.append(metrics)
                if logger:
                    if metrics.step % cfg.log_interval == 0 or metrics.step == cfg.train_steps:
                        logger.log(metrics.step, metrics.as_dict())
                    logger.advance()
                if cfg.eval_interval and (metrics.step % cfg.eval_interval == 0
                                          or metrics.step == cfg.train_steps):
                    val_loss, val_tokens = self.validate()
                    self.validation.append((metrics.step, val_loss))
                    if logger:
                        logger.log_validation(metrics.step, val_loss, val_tokens)
                self.stopped_by = stop() if stop is not None else 0
                if self.stopped_by or (cfg.save_interval and metrics.step % cfg.save_interval == 0
                                       and metrics.step < cfg.train_steps):
                    path = self.save()
                    if logger:
                        logger.message(f"saved {path}")
                if self.stopped_by:
                    return history
            if cfg.save_at_end and history:
                path = self.save()
                if logger:
                    logger.message(f"saved {path}")
        finally:
            self.optimizer.wait_params()
            if logger:
                logger.close()
        return history


def run_training(cfg: TrainConfig, groups: ParallelGroups,
                 logger: Optional[MetricsLogger] = None) -> list[StepMetrics]:
    """Validate, build, resume if asked, train (the whole job, minus process-group setup)."""
    plan = validate_launch(cfg, groups.topology.world)
    trainer = Trainer(cfg, groups, plan)
    trainer.resume()
    return trainer.train(logger)
