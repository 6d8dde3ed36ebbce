"""Turn text / JSONL files into a memory-mapped token dataset for examples/pretrain.py.

    python examples/prepare_data.py --output data/mycorpus docs/*.txt more.jsonl
    python examples/prepare_data.py --output data/mycorpus --tokenizer /path/to/hf_tokenizer in.jsonl
    python examples/prepare_data.py --output data/mycorpus --model /path/to/hf_model in.jsonl
    python examples/prepare_data.py --output data/shakespeare --corpus   # the embedded corpus

Each ``.txt`` file is one document; each line of a ``.jsonl`` file is a JSON object whose
``--text-key`` field (default ``text``) is one document. A directory argument means every ``.txt``
/ ``.jsonl`` file under it. Writes ``<output>.bin`` and ``<output>.json``; train on it with
``pretrain.py --data <output>``.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

from megatron_ext.cli.common import refuse
from megatron_ext.data.dataset import corpus_files, read_text_documents, write_token_dataset
from megatron_ext.data.tokenizer import load_tokenizer, resolve_tokenizer


def expand_inputs(inputs: list[str]) -> list[str]:
    files: list[str] = []
    for item in inputs:
        if os.path.isdir(item):
            for root, _, names in sorted(os.walk(item)):
                files += [os.path.join(root, n) for n in sorted(names)
                          if n.endswith((".txt", ".jsonl"))]
        elif os.path.isfile(item):
            files.append(item)
        else:
            raise ValueError(f"input {item!r} is neither a file nor a directory")
    return files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("inputs", nargs="*", help=".txt / .jsonl files or directories")
    parser.add_argument("--output", required=True, help="output prefix (writes .bin and .json)")
    parser.add_argument("--model", default=None,
                        help="HF model directory whose tokenizer to use (when --tokenizer is auto)")
    parser.add_argument("--tokenizer", default="auto",
                        help="'auto' (default: --model's tokenizer, else 'byte'), 'byte' or a "
                             "local HF tokenizer dir")
    parser.add_argument("--text-key", default="text", help="JSONL field holding the text")
    parser.add_argument("--corpus", action="store_true", help="add the embedded corpus")
    args = parser.parse_args(argv)
    try:
        files = expand_inputs(args.inputs) + (corpus_files() if args.corpus else [])
        if not files:
            raise ValueError("no input files (give files/directories or --corpus)")
        tokenizer = load_tokenizer(resolve_tokenizer(args.tokenizer, args.model))
        start = time.perf_counter()
        meta = write_token_dataset(args.output,
                                   read_text_documents(files, tokenizer, args.text_key), tokenizer)
    except (ValueError, OSError) as err:
        return refuse("prepare_data", err)
    print(f"wrote {args.output}.bin/.json: {meta.num_documents} documents, {meta.num_tokens} "
          f"tokens ({meta.dtype}, tokenizer {meta.tokenizer}, vocab {meta.vocab_size}) from "
          f"{len(files)} files in {time.perf_counter() - start:.2f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
