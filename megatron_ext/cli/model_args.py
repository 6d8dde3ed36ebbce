"""Command-line options that choose how a model is built (shared by the eval and generate
commands; pretraining takes the same settings from :class:`~megatron_ext.training.config.TrainConfig`)."""
from __future__ import annotations

import argparse

from megatron_ext.layers.backend import TRANSFORMER_IMPLS, TransformerImpl
from megatron_ext.models.config import ModelConfig

SCALING_TYPES = ("linear", "dynamic", "yarn")


def add_model_build_arguments(parser: argparse.ArgumentParser) -> None:
    """``--transformer-impl`` and ``--make-vocab-size-divisible-by``."""
    parser.add_argument("--transformer-impl", choices=TRANSFORMER_IMPLS,
                        default=TransformerImpl.AUTO,
                        help="layer implementation: native, te (TransformerEngine, CUDA) or auto "
                             "(where TE imports on CUDA: each module on whichever measured "
                             "faster — today native for every module kind)")
    parser.add_argument("--make-vocab-size-divisible-by", type=int, default=128,
                        help="pad the vocabulary in memory to a multiple of this x attn_tp "
                             "(Megatron's default 128; files keep the real size)")


def add_position_scale_arguments(parser: argparse.ArgumentParser) -> None:
    """``--max-positions-scale`` and ``--rope-scaling-type``: RoPE scaling for inputs longer
    than the model was trained on (context-extension evaluation)."""
    parser.add_argument("--max-positions-scale", type=float, default=None, metavar="F",
                        help="scale RoPE by F to run up to F x the trained positions: the "
                             "config's own rope scaling type with factor F (its other "
                             "parameters kept), else --rope-scaling-type (default linear, i.e. "
                             "position interpolation). Replaces the config's factor; lengths "
                             "beyond the model's positions are refused without it")
    parser.add_argument("--rope-scaling-type", choices=SCALING_TYPES, default=None,
                        help="with --max-positions-scale: linear (positions / F), dynamic "
                             "(NTK base grown with the sequence length) or yarn (default: the "
                             "config's type, else linear)")


def apply_position_scale(config: ModelConfig, args: argparse.Namespace) -> ModelConfig:
    """``config`` with the command line's RoPE scaling (``ValueError`` naming the flag)."""
    if args.max_positions_scale is None:
        if args.rope_scaling_type is not None:
            raise ValueError("--rope-scaling-type needs --max-positions-scale")
        return config
    try:
        return config.with_position_scale(args.max_positions_scale, args.rope_scaling_type)
    except ValueError as err:
        raise ValueError(f"--max-positions-scale={args.max_positions_scale}: {err}") from None
