"""GPU checks for a lent device machine (torch + transformers only: no Ray, no DeepSpeed there).

Prints one JSON line per measurement:
- ``matmul_peak``: measured dense bf16 matmul TFLOP/s (the MFU denominator);
- ``clo_step``: one CLO training step (forward + backward + AdamW, attention-only, bf16) on a
  random-init model with Llama-3-8B's configuration, 4 pairs x 4 sequences x 512 tokens,
  using clo_ray's own loss code; tokens/s, peak memory, MFU;
- ``seq2seq``: greedy generation throughput of a random-init model with
  facebook/m2m100_1.2B's configuration (what the seq2seq translator backend runs), bf16.

Usage: PYTHONPATH=. python bench/gpu_check.py [--only clo|seq2seq|matmul]
"""

from __future__ import annotations

import argparse
import gc
import json
import time

import torch

from clo_ray.train.losses import clo_loss, sequence_logps

# Llama-3-8B (meta-llama/Meta-Llama-3-8B config.json), written out by hand.
LLAMA3_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                 num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                 max_position_embeddings=8192, rope_theta=500000.0, rms_norm_eps=1e-5,
                 tie_word_embeddings=False, bos_token_id=128000, eos_token_id=128001)
# facebook/m2m100_1.2B config.json, written out by hand.
M2M100_1_2B = dict(vocab_size=128112, d_model=1024, encoder_layers=24, decoder_layers=24,
                   encoder_attention_heads=16, decoder_attention_heads=16,
                   encoder_ffn_dim=8192, decoder_ffn_dim=8192, max_position_embeddings=1024,
                   activation_function="relu", scale_embedding=True, pad_token_id=1,
                   bos_token_id=0, eos_token_id=2, decoder_start_token_id=2)
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")


def emit(kind: str, **fields) -> None:
    print(json.dumps({"check": kind, **fields}), flush=True)


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def timed(fn, repeats: int) -> float:
    sync()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync()
    return (time.perf_counter() - start) / repeats


def reset_peak() -> None:
    if DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()


def peak_gib() -> float:
    return round(torch.cuda.max_memory_allocated() / 2**30, 1) if DEVICE == "cuda" else 0.0


def matmul_peak() -> float:
    n = 8192 if DEVICE == "cuda" else 512
    a = torch.randn(n, n, device=DEVICE, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=DEVICE, dtype=torch.bfloat16)
    for _ in range(5):
        a @ b
    seconds = timed(lambda: a @ b, 50)
    tflops = 2 * n**3 / seconds / 1e12
    name = torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu"
    emit("matmul_peak", n=n, tflops=round(tflops, 3), device=name)
    return tflops


def clo_step(peak_tflops: float, checkpointing: bool, pairs: int = 4, seq: int = 512) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(**LLAMA3_8B, attn_implementation="sdpa")
    torch.set_default_dtype(torch.bfloat16)
    with torch.device(DEVICE):
        model = LlamaForCausalLM(config)
    torch.set_default_dtype(torch.float32)
    if checkpointing:
        # Non-reentrant: with frozen embeddings the reentrant variant sees no input that
        # requires grad and silently skips the attention weights' gradients.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    total = sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n)
    trainable = []
    for name, param in model.named_parameters():
        param.requires_grad = any(f"self_attn.{m}." in name for m in ATTENTION)
        if param.requires_grad:
            trainable.append(param)
    n_train = sum(p.numel() for p in trainable)
    optimizer = torch.optim.AdamW(trainable, lr=8e-6)

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 120000, (4 * pairs, seq), generator=g).to(DEVICE)
    mask = torch.zeros_like(ids)
    mask[:, seq // 4:] = 1  # a quarter prompt, the rest response
    with torch.no_grad():  # the cached reference pass (done once per data set in a real run)
        ref_seconds = timed(lambda: model(input_ids=ids).logits, 1)
        ref, _ = sequence_logps(model(input_ids=ids).logits, ids, mask)
    ref = ref.view(4, pairs)

    def step():
        logits = model(input_ids=ids).logits
        logps, counts = sequence_logps(logits, ids, mask)
        out = clo_loss(logps.view(4, pairs), ref, counts.view(4, pairs), lambda_=0.5, beta=0.1)
        out.loss.backward()
        assert all(p.grad is not None for p in trainable), "attention weights got no gradient"
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    reset_peak()
    for _ in range(2):
        step()
    seconds = timed(step, 5)
    tokens = 4 * pairs * seq
    # Model FLOPs of an attention-only step (N = matmul weights, input embedding excluded):
    # forward 2N, backward through every layer for the
    # activation gradients 2N, weight gradients only for the trained attention weights 2N_attn;
    # plus causal attention scores (QK^T and AV: 2 * 2 * L * T^2 * d / 2 forward, x3 with
    # backward). Recomputation under checkpointing is not counted (MFU, not HFU).
    L, d = LLAMA3_8B["num_hidden_layers"], LLAMA3_8B["hidden_size"]
    dense = (4 * total + 2 * n_train) * tokens
    attn = 3 * 2 * L * seq * seq * d * (4 * pairs)
    flops = dense + attn
    emit("clo_step", model="Llama-3-8B config, random init", dtype="bf16", pairs=pairs,
         seq_len=seq, sequences=4 * pairs, gradient_checkpointing=checkpointing,
         params_total=total, params_trained=n_train, s_per_step=round(seconds, 3),
         tokens_per_s=round(tokens / seconds), reference_pass_s=round(ref_seconds, 3),
         peak_mem_gib=peak_gib(),
         model_tflops_per_step=round(flops / 1e12, 1),
         mfu=round(flops / seconds / 1e12 / peak_tflops, 3), peak_tflops=round(peak_tflops, 1))


def seq2seq(batch: int, src_len: int = 64, new_tokens: int = 128) -> None:
    from transformers import M2M100Config, M2M100ForConditionalGeneration

    torch.manual_seed(0)
    model = M2M100ForConditionalGeneration(M2M100Config(**M2M100_1_2B))
    model = model.to(DEVICE, torch.bfloat16).eval()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(10, 128000, (batch, src_len), generator=g).to(DEVICE)
    forced_bos = 128000  # a language token id (its value does not change the cost)

    def run():
        with torch.no_grad():
            return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                  forced_bos_token_id=forced_bos, do_sample=False, num_beams=1,
                                  max_new_tokens=new_tokens, min_new_tokens=new_tokens)

    run()
    reset_peak()
    seconds = timed(run, 3)
    emit("seq2seq", model="m2m100_1.2B config, random init", dtype="bf16", batch=batch,
         src_len=src_len, new_tokens=new_tokens, s_per_batch=round(seconds, 3),
         output_tokens_per_s=round(batch * new_tokens / seconds),
         rows_per_s=round(batch / seconds, 2),
         peak_mem_gib=peak_gib())


def release() -> None:
    gc.collect()
    if DEVICE == "cuda":
        torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--only", choices=["matmul", "clo", "seq2seq"])
    parser.add_argument("--tiny", action="store_true",
                        help="shrink both models to a few layers: a CPU dry run of the script")
    args = parser.parse_args()
    if args.tiny:
        LLAMA3_8B.update(num_hidden_layers=2, hidden_size=256, intermediate_size=512,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=128256)
        M2M100_1_2B.update(encoder_layers=2, decoder_layers=2, d_model=128,
                           encoder_ffn_dim=256, decoder_ffn_dim=256)
    peak = matmul_peak()
    if args.only in (None, "seq2seq"):
        for batch in (32, 64):
            seq2seq(batch)
            release()
    if args.only in (None, "clo"):
        for checkpointing in (False, True):
            try:
                clo_step(peak, checkpointing)
            except torch.cuda.OutOfMemoryError as exc:
                emit("clo_step", gradient_checkpointing=checkpointing, error=f"OOM: {exc}"[:300])
            release()


if __name__ == "__main__":
    main()
