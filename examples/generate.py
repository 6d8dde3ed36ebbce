"""Greedy generation with attention CP / TP / DP and any MoE layout (pp = 1):

    torchrun --nproc-per-node 4 examples/generate.py --model runs/hf --prompt "Once upon" \\
        --attn-tp 2 --attn-cp 2 --moe-dp 1 --max-new-tokens 64
    torchrun --nproc-per-node 4 examples/generate.py --model runs/hf --attn-cp 2 --moe-dp 2 \\
        --prompt "first prompt" --prompt "a second, longer prompt"

``--model``: an HF directory (e.g. from examples/convert_checkpoint.py). ``--tokenizer``: ``byte``
(default) or a local HF tokenizer directory; generation stops at its EOS token. Several
``--prompt`` flags make a batch (left-padded; split over attention DP). The prefill splits each
prompt over attention CP and every CP rank keeps the KV of its own chunks; decode steps attend to
the cache spread over the CP ranks. Exit code 2: invalid input, nothing ran.
"""
from megatron_ext.cli.generate import main

if __name__ == "__main__":
    raise SystemExit(main())
