"""Long-context evaluation (next-token loss / perplexity) with attention CP, TP and DP:

    torchrun --nproc-per-node 4 examples/eval.py --model runs/hf --attn-cp 4 --seq-len 8192
    torchrun --nproc-per-node 4 examples/eval.py --model runs/hf --attn-tp 2 --attn-cp 2 \\
        --moe-dp 1 --data data/my --num-samples 16 --batch-size 2

``--model``: an HF directory (e.g. from examples/convert_checkpoint.py). ``--data``: a prepared
dataset prefix (examples/prepare_data.py); default: the embedded corpus with the byte tokenizer.
Samples are consecutive windows of ``--seq-len`` tokens. Exit code 2: invalid input, nothing ran.
"""
from megatron_ext.cli.eval import main

if __name__ == "__main__":
    raise SystemExit(main())
