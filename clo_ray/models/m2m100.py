"""The built-in ``tiny-m2m100``: a random-init M2M100 translator for offline tests.

No translation model ships in any package we can install (environment.md), yet the seq2seq
backend must run its real code path in CI: tokenizer ``src_lang``, the target language
forced as the first generated token, batched ``generate``. So this builds, on this machine,
what ``facebook/m2m100_1.2B`` looks like to transformers, at a toy size:

- an ``M2M100Tokenizer`` (the same class and files as the real one: ``vocab.json`` plus
  ``sentencepiece.bpe.model``) whose sentencepiece model is trained here on every text of
  the bundled parallel sample, with byte fallback so any text round-trips, and the standard
  100 M2M100 language tokens (``__sw__``, ...) after the vocabulary;
- an ``M2M100ForConditionalGeneration`` with seeded random weights (2+2 layers, d_model 64).

Its outputs are garbage; tests assert shapes, the language-code wiring, and that the quality
checks reject what it writes. Registered in :data:`clo_ray.models.builtins.BUILTINS`.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

from clo_ray.models.recipe import sample_texts, save_model, short_hash

NAME = "tiny-m2m100"
DESCRIPTION = (
    "random-init 2+2-layer M2M100 (d_model 64) with an M2M100Tokenizer whose sentencepiece "
    "model is trained on the bundled parallel sample; for seq2seq tests, builds in seconds"
)
_RECIPE = "tiny-m2m100/v2"
SPM_VOCAB_SIZE = 4000  # sentencepiece pieces; the 100 language tokens come after them
# fairseq's dictionary order, which M2M100's vocab.json keeps: ids 0-3 are fixed
FAIRSEQ_SPECIALS = ("<s>", "<pad>", "</s>", "<unk>")
CONFIG: dict[str, Any] = {
    "model_type": "m2m_100",
    "d_model": 64,
    "encoder_layers": 2,
    "decoder_layers": 2,
    "encoder_attention_heads": 4,
    "decoder_attention_heads": 4,
    "encoder_ffn_dim": 128,
    "decoder_ffn_dim": 128,
    "max_position_embeddings": 1024,
}


def cache_key() -> str:
    """Folder name: changes when the sample, the recipe or the architecture changes."""
    from clo_ray.assets import parallel_sample_path

    recipe = json.dumps([_RECIPE, SPM_VOCAB_SIZE, FAIRSEQ_SPECIALS, CONFIG])
    return f"{NAME}-{short_hash(recipe, parallel_sample_path().read_bytes())}"


def _train_sentencepiece(texts: list[str]) -> bytes:
    """A BPE sentencepiece model (serialized) over ``texts``; deterministic for fixed input.

    Byte fallback: a character the sample never showed still encodes (as bytes) and decodes
    back, as real M2M100 vocabularies nearly always do for the languages they cover.
    """
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts),
        model_writer=model,
        model_type="bpe",
        vocab_size=SPM_VOCAB_SIZE,
        character_coverage=0.9995,
        byte_fallback=True,
        unk_id=0, bos_id=-1, eos_id=-1, pad_id=-1,  # fairseq ids live in vocab.json
        split_by_whitespace=True,
        normalization_rule_name="identity",  # keep text as is: round trips byte for byte
        remove_extra_whitespaces=False,
        max_sentence_length=20000,
        num_threads=1,
        minloglevel=2,
    )
    return model.getvalue()


def _write_tokenizer(out: Path, spm_model: bytes) -> Any:
    """vocab.json (fairseq specials, then every sentencepiece piece) + the spm model."""
    import sentencepiece as spm
    from transformers import M2M100Tokenizer

    processor = spm.SentencePieceProcessor(model_proto=spm_model)
    pieces = [processor.id_to_piece(i) for i in range(processor.get_piece_size())]
    vocab = {token: i for i, token in enumerate(FAIRSEQ_SPECIALS)}
    for piece in pieces:
        vocab.setdefault(piece, len(vocab))  # spm's own <unk> is already there
    spm_file, vocab_file = out / "sentencepiece.bpe.model", out / "vocab.json"
    spm_file.write_bytes(spm_model)
    vocab_file.write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    tokenizer = M2M100Tokenizer(str(vocab_file), str(spm_file), language_codes="m2m100",
                                model_max_length=CONFIG["max_position_embeddings"])
    tokenizer.save_pretrained(out)
    return tokenizer


def build(out: Path) -> None:
    """Tokenizer trained on the sample, then a seeded random-init model sized to it."""
    import torch
    from transformers import GenerationConfig, M2M100Config, M2M100ForConditionalGeneration

    from clo_ray.assets import parallel_sample_path

    tokenizer = _write_tokenizer(out, _train_sentencepiece(list(sample_texts(
        parallel_sample_path()))))
    ids = {"bos_token_id": 0, "pad_token_id": 1, "eos_token_id": 2,
           "decoder_start_token_id": 2}  # as in facebook/m2m100_*
    fields = {k: v for k, v in CONFIG.items() if k != "model_type"}
    # language tokens and fairseq's "madeup words" follow the vocabulary (as in the real
    # checkpoints: 128000 + 100 + 8 + 4 = 128112); len(tokenizer) does not count them
    vocab_size = max(tokenizer.lang_code_to_id.values()) + 1 + tokenizer.num_madeup_words
    config = M2M100Config(vocab_size=vocab_size, **fields, **ids, scale_embedding=True,
                          dropout=0.0, attention_dropout=0.0, dtype="float32")
    with torch.random.fork_rng(devices=[]):  # leave the caller's RNG stream untouched
        torch.manual_seed(0)
        model = M2M100ForConditionalGeneration(config).to(torch.float32)
    model.generation_config = GenerationConfig(**ids)
    save_model(model, out)
