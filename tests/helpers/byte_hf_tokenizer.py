"""A ``transformers`` tokenizer whose ids equal :class:`megatron_ext.data.tokenizer.ByteTokenizer`'s
(byte ``b`` -> id ``b``, ``<eos>`` 256, ``<pad>`` 257): byte-level BPE without merges. Lets the
harness's HF backend and ``transformers`` score the same token ids as spawned ranks that use the
byte tokenizer (and never import transformers)."""
from __future__ import annotations


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in character for every byte (what ByteLevel pre-tokenizes to)."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def save_byte_tokenizer(path: str):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: b for b, c in _bytes_to_unicode().items()}
    vocab.update({"<eos>": 256, "<pad>": 257})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>")
    hf.save_pretrained(path)
    return hf
