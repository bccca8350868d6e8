"""Build a small BERT-style WordPiece tokenizer and save it for ``AutoTokenizer``.

The saved folder holds ``tokenizer.json`` and ``tokenizer_config.json`` and
loads offline with ``transformers.AutoTokenizer.from_pretrained(path)``; ids of
the special tokens are fixed: [PAD]=0, [UNK]=1, [CLS]=2, [SEP]=3, [MASK]=4.
Encodings are ``[CLS] text [SEP]`` (pairs ``[CLS] a [SEP] b [SEP]``) with
``input_ids``, ``token_type_ids`` and ``attention_mask``.

The vocabulary is every word of the training texts (most frequent first, up to
``vocab_size``) plus single characters and ``##``-continuation characters as
fallback for unseen words. It is counted here rather than learnt with
``tokenizers.trainers.WordPieceTrainer`` because that trainer breaks ties
between equally frequent merges in hash-map order, so the same texts gave a
different vocabulary on each run; token ids must be reproducible for checkpoints
to stay valid when a data set is regenerated.
"""

from __future__ import annotations

import os
import string
import tempfile
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from . import storage

SPECIAL_TOKENS: tuple[str, ...] = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


# The files a tokenizer folder may hold, read by name: a store without listings (plain HTTP) serves them.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.txt", "vocab.json", "merges.txt", "spiece.model", "sentencepiece.bpe.model")


def load_tokenizer(folder: str | os.PathLike[str], **kwargs):
    """``AutoTokenizer`` of a folder (local, or at a URL: its files are read by name into a private
    temporary folder, removed once loaded), never running code from it: a tokenizer from elsewhere
    may name its own Python class (``auto_map``), which transformers would offer to import."""
    if storage.is_local(folder):
        return _load_local(str(folder), **kwargs)
    with tempfile.TemporaryDirectory(prefix="iais-tokenizer-") as local:
        copied = []
        for name in TOKENIZER_FILES:
            url = storage.join(str(folder), name)
            if storage.exists(url):
                Path(local, name).write_bytes(storage.read_bytes(url))
                copied.append(name)
        if not copied:
            raise FileNotFoundError(f"tokenizer {folder}: none of {', '.join(TOKENIZER_FILES[:5])}, ... found there")
        return _load_local(local, **kwargs)


def _load_local(folder: str, **kwargs):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder, trust_remote_code=False, **kwargs)
    except ValueError as e:
        if "custom code" not in str(e) and "trust_remote_code" not in str(e):
            raise
        raise ValueError(f"tokenizer {folder}: it names Python code of its own (auto_map), and iais_scale never runs"
                         " code from its inputs; use a tokenizer made of files only (tokenizer.json or vocab.txt)"
                         ) from None
CONTINUATION = "##"


def train_wordpiece(
    texts: Iterable[str],
    out_dir: str | os.PathLike[str],
    *,
    vocab_size: int = 1000,
    model_max_length: int = 64,
) -> Path:
    """Build a lower-casing WordPiece tokenizer from ``texts``, save it to ``out_dir`` and return the path."""
    normalizer = normalizers.BertNormalizer(lowercase=True)
    pre_tokenizer = pre_tokenizers.Whitespace()
    counts: Counter[str] = Counter()
    for text in texts:
        counts.update(word for word, _span in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text)))

    chars = sorted(set(string.ascii_lowercase + string.digits).union(*counts))
    base = [*SPECIAL_TOKENS, *chars, *(CONTINUATION + c for c in chars)]
    words = [w for w, _n in sorted(counts.items(), key=lambda item: (-item[1], item[0])) if len(w) > 1]
    vocab_list = base + words[: max(0, vocab_size - len(base))]
    vocab = {token: i for i, token in enumerate(vocab_list)}

    tok = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]", continuing_subword_prefix=CONTINUATION))
    # Registered as special so that they match before normalisation (which would
    # lower-case "[CLS]") and are dropped by decode(skip_special_tokens=True).
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    tok.normalizer = normalizer
    tok.pre_tokenizer = pre_tokenizer
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    tok.decoder = decoders.WordPiece(prefix=CONTINUATION)

    # Imported late: transformers is slow to import and only needed to write the
    # config that AutoTokenizer reads (v5 maps this class to TokenizersBackend).
    from transformers import PreTrainedTokenizerFast

    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=model_max_length,
        model_input_names=["input_ids", "token_type_ids", "attention_mask"],
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    wrapped.save_pretrained(str(out))
    return out
