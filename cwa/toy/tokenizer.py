"""The toy tokenizer: GPT-2 style byte-level BPE in which every toy word is one token.

Built by rule from the generator's lexicon, not trained, so it is identical on every machine.
The vocabulary is: two special tokens, the 256 byte symbols of GPT-2's byte-level alphabet
(so any text at all can be encoded, unknown words simply fall apart into bytes), then every
toy word both with a leading space (``Ġlantern``) and, for words that can start a document,
without. The BPE model has no merges and ``ignore_merges=True``: a pre-token that is in the
vocabulary becomes that one token, anything else becomes its bytes. Leading spaces behave as
in GPT-2, so the continuation ``" lantern"`` is the single token ``Ġlantern``.
"""

from __future__ import annotations

from pathlib import Path

from cwa.toy.language import lexicon

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"


def _byte_alphabet() -> list[str]:
    """GPT-2's printable stand-ins for the 256 byte values, in byte order."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def toy_vocab() -> dict[str, int]:
    """Token string -> id, in a fixed order (specials, bytes, words)."""
    inner, initial = lexicon()
    tokens = [EOS_TOKEN, PAD_TOKEN, *_byte_alphabet()]
    seen = set(tokens)
    words = sorted({"Ġ" + w for w in inner + initial} | set(initial))
    for w in words:
        if w not in seen:  # single letters ("a") are already byte symbols
            tokens.append(w)
            seen.add(w)
    return {t: i for i, t in enumerate(tokens)}


def build_toy_tokenizer(model_max_length: int):
    """A ``PreTrainedTokenizerFast`` for the toy language (eos = bos = ``<|endoftext|>``)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE(vocab=toy_vocab(), merges=[], ignore_merges=True))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens([EOS_TOKEN, PAD_TOKEN])
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=EOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        model_max_length=model_max_length,
        padding_side="right",
    )


def save_toy_tokenizer(folder: Path, model_max_length: int) -> None:
    build_toy_tokenizer(model_max_length).save_pretrained(str(folder))
