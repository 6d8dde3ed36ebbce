"""Training configuration: one validated dataclass, filled from defaults < a YAML file < flags.

Everything that can be checked without a process group is checked here (sizes, schedule, batch
divisibility against the layout, data path), so a bad launch fails on every rank with the same
message before any collective could hang.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass, field, fields
from typing import Any, Optional

from megatron_ext.communication.choices import CP_STRATEGIES, RECOMPUTE_MODES
from megatron_ext.layers.backend import TRANSFORMER_IMPLS
from megatron_ext.models.hf_fields import STRICT_CONFIG_HELP
from megatron_ext.parallel.topology import Topology
from megatron_ext.training.config_types import coerce_setting, parse_bool

LAYOUT_FIELDS = ("pp", "attn_tp", "attn_cp", "attn_dp", "moe_tp", "moe_ep", "moe_dp")
# Default peak learning rates: from scratch (tiny presets), and fine-tuning pretrained HF weights
# (the order transformers' Trainer and most fine-tuning recipes use).
SCRATCH_LR = 3e-3
FINETUNE_LR = 5e-5


def _help(text: str, **kw: Any) -> Any:
    return field(metadata={"help": text}, **kw)


@dataclass
class TrainConfig:
    """All settings of a pretraining run (``examples/pretrain.py --help`` lists them)."""

    # layout (data parallel derived by Topology)
    pp: int = _help("pipeline stages", default=1)
    attn_tp: Optional[int] = _help("attention tensor parallel size (default: with no layout "
                                   "flag, the seed layout for the world size, see "
                                   "default_layout; else 1 or derived)", default=None)
    attn_cp: Optional[int] = _help("attention context parallel size (default: as --attn-tp)",
                                   default=None)
    attn_dp: Optional[int] = _help("attention data parallel size (default: derived)", default=None)
    moe_tp: Optional[int] = _help("expert tensor parallel size (default: as --attn-tp)",
                                  default=None)
    moe_ep: Optional[int] = _help("expert parallel size (default: as --attn-tp)", default=None)
    moe_dp: Optional[int] = _help("expert data parallel size (default: as --attn-tp)",
                                  default=None)
    # model
    model: str = _help("models/ preset name, HF directory or config.json", default="tiny-qwen3-moe")
    model_overrides: dict = _help("ModelConfig fields to change (YAML mapping or key=value flags)",
                                  default_factory=dict)
    init_from_hf: bool = _help("load HF weights when --model is a directory with safetensors",
                               default=True)
    strict_config: bool = _help(STRICT_CONFIG_HELP, default=False)
    cp_comm: str = _help("CP attention K/V exchange: all_gather or p2p", default="all_gather")
    transformer_impl: str = _help("layer implementation: native, te (TransformerEngine; CUDA) or "
                                  "auto (where TE imports on CUDA: each module on whichever "
                                  "measured faster; today ours for every module kind)",
                                  default="auto")
    make_vocab_size_divisible_by: int = _help(
        "pad the vocabulary in memory to a multiple of this x attn_tp (Megatron's default; "
        "checkpoints keep the real size)", default=128)
    # data
    data: Optional[str] = _help("prepared dataset prefix (examples/prepare_data.py); "
                                "default: the embedded corpus", default=None)
    tokenizer: str = _help("'auto' (the model's own when --model is an HF directory with "
                           "tokenizer files, else 'byte'), 'byte' or a local HF tokenizer "
                           "directory", default="auto")
    seq_len: int = _help("tokens per sample", default=128)
    micro_batch_size: int = _help("samples per micro-batch per data-parallel rank", default=4)
    global_batch_size: int = _help("samples per optimizer step (all ranks)", default=8)
    shuffle: bool = _help("shuffle samples (seeded, layout independent)", default=True)
    # optimisation
    train_steps: int = _help("optimizer steps", default=40)
    lr: Optional[float] = _help(f"peak learning rate (default: {FINETUNE_LR} when initialising "
                                f"from HF weights, else {SCRATCH_LR})", default=None)
    min_lr: Optional[float] = _help("final learning rate of the cosine decay (default: lr / 10)",
                                    default=None)
    warmup_steps: int = _help("linear warmup steps (clamped to train_steps with a note)",
                              default=4)
    weight_decay: float = _help("AdamW weight decay (matrices only)", default=0.1)
    adam_beta1: float = _help("AdamW beta1", default=0.9)
    adam_beta2: float = _help("AdamW beta2", default=0.95)
    adam_eps: float = _help("AdamW epsilon", default=1e-8)
    clip_grad: float = _help("clip the global gradient norm to this (0: off)", default=1.0)
    grad_bucket_mb: float = _help("gradient all-reduce bucket size in MiB", default=25.0)
    seed: int = _help("seed of initialisation and data order", default=1234)
    dtype: str = _help("auto (bf16 on CUDA, fp32 on CPU), fp32, bf16 (bf16 parameters and "
                       "activations, fp32 main weights, gradients and optimizer) or float64 "
                       "(everything float64: the exact reference runs of the tests)",
                       default="auto")
    distributed_optimizer: Optional[bool] = _help(
        "shard main weights, gradients' reduction and AdamW state over each parameter's sync "
        "group (ZeRO-1); default: on when any sync group has more than one rank", default=None)
    overlap_grad_reduce: bool = _help("launch bucket gradient reductions from backward hooks",
                                      default=True)
    overlap_param_gather: bool = _help("distributed optimizer: wait for a bucket's parameter "
                                       "all-gather only at its first use in the next forward",
                                       default=True)
    recompute: str = _help("activation recomputation: none, selective (attention core, expert "
                           "activation) or full (every decoder layer)", default="none")
    device: str = _help("auto, cpu or cuda", default="auto")
    pp_schedule: str = _help("pipeline schedule: 1f1b or gpipe", default="1f1b")
    # output, checkpoints, logs
    output_dir: str = _help("run directory (checkpoints/, metrics.jsonl, tensorboard/)",
                            default="runs/pretrain")
    save_interval: int = _help("save every N steps (0: only at the end)", default=20)
    save_at_end: bool = _help("save after the last step", default=True)
    keep_checkpoints: int = _help("complete checkpoints kept (older ones deleted)", default=2)
    resume: Optional[str] = _help("'latest' (newest complete checkpoint in output_dir, if any) "
                                  "or a checkpoint directory", default=None)
    allow_resume_changes: bool = _help("resume even where model fields or the sample stream "
                                       "(seq_len, batch, tokenizer, shuffle) differ from the "
                                       "checkpoint's", default=False)
    overwrite: bool = _help("start a new run in an output_dir that holds checkpoints (they are "
                            "rotated out by the new run's saves)", default=False)
    log_interval: int = _help("print / log metrics every N steps", default=1)
    eval_interval: int = _help("validation loss every N steps and after the last (0: off)",
                               default=0)
    eval_data: Optional[str] = _help("validation dataset prefix (default: held-out windows: the "
                                     "last eval_iters x global_batch_size samples of --data, "
                                     "never trained on)", default=None)
    eval_iters: int = _help("validation batches (of global_batch_size samples) per evaluation",
                            default=1)
    progress: bool = _help("tqdm progress bar on rank 0", default=True)
    tensorboard: bool = _help("TensorBoard scalars when tensorboard is importable", default=True)
    dist_timeout_s: float = _help("collective timeout: a dead rank fails the others after this",
                                  default=120.0)
    inject_nan_at_step: Optional[int] = _help("testing aid: make the loss NaN at this step",
                                              default=None)

    def __post_init__(self) -> None:
        for f in fields(self):  # YAML and Python callers get the flags' types (or an error)
            setattr(self, f.name, coerce_setting(f.name, getattr(self, f.name), f.type,
                                                 "setting"))
        for name in ("seq_len", "micro_batch_size", "global_batch_size", "train_steps",
                     "keep_checkpoints", "log_interval", "pp", "make_vocab_size_divisible_by"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive integer")
        for name in ("save_interval", "warmup_steps", "eval_interval"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name}={value!r} must be a non-negative integer")
        if self.seq_len < 2:
            raise ValueError(f"seq_len={self.seq_len} must be >= 2")
        if self.global_batch_size % self.micro_batch_size:
            raise ValueError(f"micro_batch_size={self.micro_batch_size} must divide "
                             f"global_batch_size={self.global_batch_size}")
        self.notes: list[str] = []  # said once on rank 0 at start (not settings)
        if self.warmup_steps > self.train_steps:
            self.notes.append(f"note: warmup_steps={self.warmup_steps} > train_steps="
                              f"{self.train_steps}: warmup clamped to {self.train_steps} steps")
            self.warmup_steps = self.train_steps
        for name in ("lr", "min_lr"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool)
                                      or not isinstance(value, (int, float))):
                raise ValueError(f"{name}={value!r} must be a number")
        if self.lr is None:
            self.lr = FINETUNE_LR if self.initialises_from_hf() else SCRATCH_LR
        if self.min_lr is None:
            self.min_lr = self.lr / 10
        if not self.lr > 0:
            raise ValueError(f"lr={self.lr} must be > 0")
        if not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"min_lr={self.min_lr} must be in [0, lr={self.lr}]")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be in [0, 1)")
        if not self.adam_eps > 0:
            raise ValueError(f"adam_eps={self.adam_eps} must be > 0")
        if self.weight_decay < 0 or self.clip_grad < 0:
            raise ValueError(f"weight_decay={self.weight_decay} and clip_grad={self.clip_grad} "
                             f"must be >= 0")
        if not self.grad_bucket_mb > 0:
            raise ValueError(f"grad_bucket_mb={self.grad_bucket_mb} must be > 0")
        if not self.dist_timeout_s > 0:
            raise ValueError(f"dist_timeout_s={self.dist_timeout_s} must be > 0")
        choices = {"dtype": ("auto", "fp32", "bf16", "float64"), "device": ("auto", "cpu", "cuda"),
                   "pp_schedule": ("1f1b", "gpipe"), "cp_comm": CP_STRATEGIES,
                   "recompute": RECOMPUTE_MODES, "transformer_impl": TRANSFORMER_IMPLS}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r} must be one of {allowed}")
        if not isinstance(self.model_overrides, dict):
            raise ValueError(f"model_overrides={self.model_overrides!r} must be a mapping")
        if self.data is not None:
            _check_prefix("data", self.data)
        if isinstance(self.eval_iters, bool) or not isinstance(self.eval_iters, int) \
                or self.eval_iters < 1:
            raise ValueError(f"eval_iters={self.eval_iters!r} must be a positive integer")
        if self.eval_data is not None:
            _check_prefix("eval_data", self.eval_data)
        if self.resume not in (None, "latest") and not os.path.isdir(self.resume):
            raise ValueError(f"resume={self.resume!r} is neither 'latest' nor a checkpoint "
                             f"directory")

    def initialises_from_hf(self) -> bool:
        """Whether the run starts from the HF weights of ``--model`` (fine-tuning)."""
        from megatron_ext.checkpoint.hf import INDEX_FILE, SINGLE_FILE

        return self.init_from_hf and os.path.isdir(self.model) and \
            any(os.path.isfile(os.path.join(self.model, f)) for f in (SINGLE_FILE, INDEX_FILE))

    # ------------------------------------------------------------------ layout
    def topology(self, world: int) -> Topology:
        """The validated layout for ``world`` ranks, checked against the batch sizes. With no
        layout setting at all, :func:`default_layout` picks one."""
        sizes = {k: getattr(self, k) for k in LAYOUT_FIELDS if getattr(self, k) is not None}
        if sizes == {"pp": 1}:
            sizes = default_layout(world)
        topo = Topology(world=world, **sizes)
        per_dp = topo.attn_dp * self.micro_batch_size
        if self.global_batch_size % per_dp:
            raise ValueError(f"global_batch_size={self.global_batch_size} must be divisible by "
                             f"attn_dp*micro_batch_size={topo.attn_dp}*{self.micro_batch_size}")
        if topo.pp > 1 and self.num_microbatches(topo) < 1:  # pragma: no cover - implied above
            raise ValueError("pipeline parallelism needs at least one micro-batch")
        return topo

    def use_distributed_optimizer(self, topo: Topology) -> bool:
        """``distributed_optimizer``, or by default: whether any gradient sync group (dense
        attn_dp x attn_cp, expert moe_dp, the stage, the tied-embedding pair) has > 1 rank."""
        if self.distributed_optimizer is not None:
            return self.distributed_optimizer
        return topo.world > 1  # a world of several ranks has a stage or embedding group > 1
                               # (else every bucket is local and sharding changes nothing)

    def num_microbatches(self, topo: Topology) -> int:
        """Micro-batches each data-parallel rank runs per step."""
        return self.global_batch_size // (topo.attn_dp * self.micro_batch_size)

    @property
    def checkpoint_dir(self) -> str:
        return os.path.join(self.output_dir, "checkpoints")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    # ------------------------------------------------------------------ YAML / flags
    @classmethod
    def from_dict(cls, values: dict, source: str = "config") -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"{source}: unknown setting(s) {', '.join(unknown)}; known: "
                             f"{', '.join(sorted(known))}")
        typed = {f.name: f.type for f in fields(cls)}
        return cls(**{k: coerce_setting(k, v, typed[k], source) for k, v in values.items()})

    @classmethod
    def from_yaml(cls, path: str) -> "TrainConfig":
        return cls.from_dict(load_yaml(path), source=path)

    @classmethod
    def from_args(cls, argv: Optional[list[str]] = None) -> "TrainConfig":
        """Defaults, then ``--config file.yaml``, then flags (flags win)."""
        parser = build_parser()
        args = vars(parser.parse_args(argv))
        yaml_path = args.pop("config", None)
        values = load_yaml(yaml_path) if yaml_path else {}
        if not isinstance(values, dict):
            raise ValueError(f"{yaml_path}: expected a mapping of settings")
        overrides = args.pop("model_override", None)
        values.update({k: v for k, v in args.items() if v is not None})
        if overrides:
            merged = dict(values.get("model_overrides") or {})
            merged.update(_parse_overrides(overrides))
            values["model_overrides"] = merged
        return cls.from_dict(values, source=yaml_path or "flags")


def _check_prefix(name: str, value: str) -> None:
    prefix = value.rsplit(".", 1)[0] if value.endswith((".bin", ".json")) else value
    if not os.path.isfile(prefix + ".json") or not os.path.isfile(prefix + ".bin"):
        raise ValueError(f"{name}={value!r}: {prefix}.bin / {prefix}.json not found "
                         f"(write them with examples/prepare_data.py)")


def default_layout(world: int) -> dict:
    """The seed layout (attention TP 2 x CP 2, one MoE shard of moe_tp = stage size) repeated over
    attention DP when ``world`` is a multiple of 4; attention TP 2 on 2 ranks; else pure DP."""
    if world % 4 == 0:
        return {"pp": 1, "attn_tp": 2, "attn_cp": 2, "moe_dp": 1}
    if world == 2:
        return {"pp": 1, "attn_tp": 2, "moe_dp": 1}
    return {"pp": 1}


def load_yaml(path: str) -> dict:
    import yaml

    if not os.path.isfile(path):
        raise ValueError(f"config file {path!r} does not exist")
    try:
        with open(path, encoding="utf-8") as f:
            values = yaml.safe_load(f) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not a valid YAML file ({' '.join(str(err).split())})") from None
    if not isinstance(values, dict):
        raise ValueError(f"{path}: expected a mapping of settings, got {type(values).__name__}")
    return {k.replace("-", "_"): v for k, v in values.items()}


def _parse_overrides(items: list[str]) -> dict:
    import yaml

    out = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"--model-override {item!r} must look like key=value")
        key, value = item.split("=", 1)
        out[key.strip().replace("-", "_")] = yaml.safe_load(value)
    return out


def _bool(text: str) -> bool:
    try:
        return parse_bool(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _with_default(f: dataclasses.Field, help_text: str) -> str:
    """The help text with the setting's real default (flags parse to ``None`` when absent so a
    YAML value is not overwritten, which hides the default from argparse); a help text that
    already says its default is left alone."""
    if "default:" in help_text or f.default is dataclasses.MISSING:
        return help_text
    return f"{help_text} (default: {'unset' if f.default is None else f.default})"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pretrain.py", description="Pretrain a megatron_ext model (launch with torchrun). "
        "Settings: defaults < --config YAML < flags.")
    parser.add_argument("--config", help="YAML file of settings (flags override it)")
    hints = {"int": int, "float": float, "str": str}
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        help_text = _with_default(f, f.metadata.get("help", ""))
        if f.name == "model_overrides":
            parser.add_argument("--model-override", action="append", metavar="KEY=VALUE",
                                help=help_text)
            continue
        type_name = str(f.type).replace("Optional[", "").rstrip("]")
        if type_name == "bool":
            parser.add_argument(flag, type=_bool, nargs="?", const=True, default=None,
                                metavar="BOOL", help=help_text)
        elif f.name == "resume":
            parser.add_argument(flag, nargs="?", const="latest", default=None, help=help_text)
        else:
            parser.add_argument(flag, type=hints.get(type_name, str), default=None,
                                help=help_text)
    return parser
