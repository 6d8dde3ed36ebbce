"""Pretrain a megatron_ext model. Launch with torchrun (gloo on CPU, NCCL on CUDA):

    torchrun --nproc-per-node 4 examples/pretrain.py                      # defaults, see below
    torchrun --nproc-per-node 4 examples/pretrain.py --attn-cp 2 --moe-dp 2 --moe-ep 2
    torchrun --nproc-per-node 4 examples/pretrain.py --pp 2 --attn-cp 2 --model-override num_layers=4
    torchrun --nproc-per-node 4 examples/pretrain.py --config run.yaml --resume
    python examples/pretrain.py --help

Defaults: the tiny Qwen3-MoE preset (vocabulary grown to hold the byte tokenizer), the embedded
Shakespeare corpus, 40 steps of 8 x 128 tokens, and with no layout flags the seed layout (attention
TP 2 x CP 2, one MoE shard of moe_tp 4) on 4 ranks. Writes ``runs/pretrain/`` (checkpoints/,
metrics.jsonl, tensorboard/ when installed). Settings come from defaults < ``--config`` YAML <
flags. Exit codes: 0 done, 2 invalid launch (nothing started), 3 loss diverged (NaN/inf), 1 other
failure (e.g. a rank died: the others fail within ``--dist-timeout-s``).
"""
from megatron_ext.cli.pretrain import main

if __name__ == "__main__":
    raise SystemExit(main())
