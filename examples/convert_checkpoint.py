"""Convert a training checkpoint (saved in any layout) into a Hugging Face directory:

    python examples/convert_checkpoint.py --checkpoint runs/pretrain/checkpoints --output runs/hf
    python examples/convert_checkpoint.py --checkpoint runs/pretrain/checkpoints/step_40 \\
        --output runs/hf --dtype bfloat16

The HF directory loads in transformers and in any megatron_ext layout
(``CausalLM.from_pretrained(path, groups)``). Runs in one process; no GPU needed.
"""
from megatron_ext.cli.convert import main

if __name__ == "__main__":
    raise SystemExit(main())
