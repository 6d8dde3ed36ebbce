"""Command-line options that choose how a model is built (shared by the eval and generate
commands; pretraining takes the same settings from :class:`~megatron_ext.training.config.TrainConfig`)."""
from __future__ import annotations

import argparse

from megatron_ext.layers.backend import TRANSFORMER_IMPLS, TransformerImpl


def add_model_build_arguments(parser: argparse.ArgumentParser) -> None:
    """``--transformer-impl`` and ``--make-vocab-size-divisible-by``."""
    parser.add_argument("--transformer-impl", choices=TRANSFORMER_IMPLS,
                        default=TransformerImpl.AUTO,
                        help="layer implementation: native, te (TransformerEngine, CUDA) or auto "
                             "(where TE imports on CUDA: each module on whichever measured "
                             "faster — today TE only for p2p CP attention; native otherwise)")
    parser.add_argument("--make-vocab-size-divisible-by", type=int, default=128,
                        help="pad the vocabulary in memory to a multiple of this x attn_tp "
                             "(Megatron's default 128; files keep the real size)")
