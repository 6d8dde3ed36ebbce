"""Convert a training checkpoint (saved in any layout) into a Hugging Face directory:

    python examples/convert_checkpoint.py --checkpoint runs/pretrain/checkpoints --output runs/hf
    python examples/convert_checkpoint.py --checkpoint runs/pretrain/checkpoints/step_40 \\
        --output runs/hf --dtype bfloat16

The HF directory is self-contained (weights, config.json, generation_config.json, the run's
tokenizer files, a README with the run's provenance): it loads in transformers (AutoTokenizer,
AutoModelForCausalLM, pipeline) and in any megatron_ext layout
(``CausalLM.from_pretrained(path, groups)``). Runs in one process; no GPU needed.
"""
from __future__ import annotations

import argparse
import sys

from megatron_ext.cli.common import refuse
from megatron_ext.training.convert import training_to_hf


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True,
                        help="a step_N checkpoint directory, or the directory holding them (newest "
                             "complete one is used)")
    parser.add_argument("--output", required=True, help="HF directory to write")
    parser.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 "
                                                      "(default: as trained)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a non-empty --output directory (as a whole)")
    parser.add_argument("--tokenizer", default=None,
                        help="directory holding the run's HF tokenizer (default: where the run "
                             "read it; checked by content)")
    args = parser.parse_args(argv)
    try:
        path = training_to_hf(args.checkpoint, args.output, args.dtype, args.overwrite,
                              tokenizer=args.tokenizer)
    except (ValueError, OSError) as err:
        return refuse("convert_checkpoint", err)
    print(f"wrote {args.output} from {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
