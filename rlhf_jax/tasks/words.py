"""Word-level tokenizers for the built-in tasks' tiny vocabularies."""

from __future__ import annotations

import os


def save_word_tokenizer(folder: str, words: list[str], pad: str, eos: str, unk: str) -> str:
    """Save a whitespace-split word-level tokenizer (ids in `words` order, pad != eos) that
    `transformers.AutoTokenizer` loads; a folder that already holds one is kept. Returns the folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    if os.path.exists(os.path.join(folder, "tokenizer.json")):
        return folder
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token=unk))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=pad, eos_token=eos, unk_token=unk)
    fast.padding_side = "left"
    os.makedirs(folder, exist_ok=True)
    fast.save_pretrained(folder)
    return folder
