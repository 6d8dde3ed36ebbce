"""Turn text / JSONL files into a memory-mapped token dataset for examples/pretrain.py.

    python examples/prepare_data.py --output data/mycorpus docs/*.txt more.jsonl
    python examples/prepare_data.py --output data/mycorpus --tokenizer /path/to/hf_tokenizer in.jsonl
    python examples/prepare_data.py --output data/shakespeare --corpus   # the embedded corpus

Each ``.txt`` file is one document; each line of a ``.jsonl`` file is a JSON object whose
``--text-key`` field (default ``text``) is one document. A directory argument means every ``.txt``
/ ``.jsonl`` file under it. Writes ``<output>.bin`` and ``<output>.json``; train on it with
``pretrain.py --data <output>``.
"""
from megatron_ext.cli.prepare_data import main

if __name__ == "__main__":
    raise SystemExit(main())
