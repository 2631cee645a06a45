"""Reference log-probs: computed once with the frozen initial model, stored, reused.

CLO and DPO compare the policy with the frozen initial model pi_ref. Its summed response
log-probs depend only on (model, data, encoding), so they are computed once, before training,
and kept in storage under a content key (:func:`reference_key`); every later trial and stage
with the same key reads them instead of computing, and training never holds a second model.

Layout: ``<storage>/cache/reference/<key>/shard-RRRRR-of-WWWWW.parquet`` (the root is
:attr:`clo_ray.layout.RunLayout.reference`), one file per
train worker (worker ``r`` of ``w`` computes ``examples[r::w]``), columns ``id``,
``language``, ``logps`` (list<double>, one value per sequence). Files are written atomically,
so a file that exists is complete; a cache is usable once every shard of one worker count is
there. A cache written by 2 workers serves a trial with 4: the numbers do not depend on how
the work was split. Two trials racing on the same key write identical files; either wins.

Rows are keyed by :attr:`Example.key` (language + pair id): a multi-target trial holds the
same English pair once per language. No Ray here: the train loop calls these on each worker
(:func:`stage_reference`, with the worker's rank and world size; its collectives are
``torch.distributed``'s).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import torch

from clo_ray import checked, storage
from clo_ray.errors import CloRayError
from clo_ray.spec.training import StageSpec
from clo_ray.storage import StorageOptions
from clo_ray.train.batches import Example, encoding_name, n_sequences
from clo_ray.train.checkpoint import StageState
from clo_ray.train.logprobs import batched_response_logps
from clo_ray.train.loop_config import LoopConfig

logger = logging.getLogger("clo_ray.train")

# Bump when the encoding (batches.py) or this layout changes: every old cache then misses
# instead of silently feeding stale numbers to a new encoding.
REFERENCE_FORMAT = 1
_SHARD = re.compile(r"^shard-(\d{5})-of-(\d{5})\.parquet$")
_SCHEMA = pa.schema([("id", pa.string()), ("language", pa.string()),
                     ("logps", pa.list_(pa.float64()))])


class ReferenceCacheError(CloRayError):
    """A reference cache is incomplete or inconsistent, or lacks an example asked for."""


def reference_key(model_ref: str, data_fingerprint: str, template: str, max_length: int,
                  loss: str, sft_data: str | None, dpo_pairs: str | None = None) -> str:
    """20 hex chars naming everything the reference log-probs depend on.

    ``model_ref`` must identify the weights *and* tokenizer (the caller adds dtype and
    earlier stages' results). clo and cross-lingual dpo encode the same 4 sequences per pair,
    so they share a key; ``sft_data`` counts only for sft, ``dpo_pairs`` only for dpo. The
    plain ``template`` is always included, even when a chat template makes it unused (a
    needless miss is cheap, a wrong hit is not).
    """
    count = n_sequences(loss, sft_data or "target")
    encoding = encoding_name(loss, sft_data or "target", dpo_pairs or "cross_lingual")
    payload = json.dumps({"format": REFERENCE_FORMAT, "model": model_ref,
                          "data": data_fingerprint, "template": template,
                          "max_length": max_length, "encoding": encoding,
                          "sequences": count}, sort_keys=True)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:20]


def reference_uri(root: str, key: str) -> str:
    """Where the cache of ``key`` lives under the reference root (``RunLayout.reference``)."""
    return storage.join(root, key)


def compute_reference_logps(model: Any, examples: Sequence[Example], *, micro_batch: int,
                            pad_id: int | None) -> torch.Tensor:
    """Summed response log-probs [N, S] (float32, CPU) of ``model`` as it is now.

    Scored as training scores the policy (:func:`~clo_ray.train.logprobs.batched_response_logps`:
    the response-only LM head, length-sorted micro-batches, dropout off, mode restored), so a
    policy that equals its reference gets reward margins of 0.
    """
    if micro_batch <= 0:
        raise ReferenceCacheError(f"micro_batch must be positive, got {micro_batch}")
    logps, _ = batched_response_logps(model, examples, micro_batch=micro_batch, pad_id=pad_id)
    return logps.float()


def shard_name(rank: int, world: int) -> str:
    """File name of worker ``rank``'s shard in a ``world``-worker cache."""
    return f"shard-{rank:05d}-of-{world:05d}.parquet"


def write_shard(uri: str, examples: Sequence[Example], logps: torch.Tensor, *, rank: int,
                world: int, storage_options: StorageOptions = None) -> None:
    """Store this worker's ``logps`` [N, S] for ``examples`` (N may be 0) atomically."""
    if not 0 <= rank < world:
        raise ReferenceCacheError(f"rank {rank} is outside a world of {world} workers")
    if len(examples) != logps.shape[0]:
        raise ReferenceCacheError(f"{len(examples)} examples but {logps.shape[0]} rows of "
                                  f"reference log-probs")
    table = pa.table({"id": [e.id for e in examples],
                      "language": [e.language for e in examples],
                      "logps": logps.double().tolist()}, schema=_SCHEMA)
    checked.write_parquet(storage.join(uri, shard_name(rank, world)), table, storage_options)


def shard_complete(uri: str, world: int, storage_options: StorageOptions = None) -> bool:
    """Whether the cache at ``uri`` is usable: all shards of ``world`` workers, or of any
    other worker count, exist (``world`` only names the caller's own set)."""
    return bool(_complete_worlds(_list_shards(uri, storage_options)))


def usable_reference(uri: str, storage_options: StorageOptions = None
                     ) -> dict[str, list[float]] | None:
    """The cache at ``uri`` when it holds a complete set of shards that read back intact,
    else None; a damaged shard is moved aside (the set is then computed again)."""
    if not shard_complete(uri, 0, storage_options):
        return None
    try:
        return read_reference(uri, storage_options)
    except checked.CorruptFileError as bad:
        checked.set_aside(bad.uri, storage_options)
        return None


def read_reference(uri: str, storage_options: StorageOptions = None) -> dict[str, list[float]]:
    """``{Example.key: [logp per sequence]}`` from one complete set of shards.

    Raises ReferenceCacheError naming the missing shards when no set is complete, and on a
    key that two shards (or one shard twice) hold: the shards would disagree on the data.
    """
    shards = _list_shards(uri, storage_options)
    complete = _complete_worlds(shards)
    if not complete:
        sets = "; ".join(f"of {w} workers, ranks {sorted(ranks)} present and "
                         f"{sorted(set(range(w)) - ranks)} missing"
                         for w, ranks in sorted(shards.items()))
        raise ReferenceCacheError(
            f"reference cache {uri} is incomplete ({sets or 'no shards'}): the workers "
            f"computing it did not all finish; rerun the trial to compute it")
    world = complete[0]
    reference: dict[str, list[float]] = {}
    for rank in range(world):
        table = checked.read_parquet(storage.join(uri, shard_name(rank, world)),
                                     storage_options)
        for row_id, language, values in zip(table.column("id").to_pylist(),
                                            table.column("language").to_pylist(),
                                            table.column("logps").to_pylist(), strict=True):
            key = f"{language}:{row_id}"
            if key in reference:
                raise ReferenceCacheError(f"reference cache {uri}: example {key!r} appears "
                                          f"twice (again in {shard_name(rank, world)}); "
                                          f"delete the cache folder and recompute")
            reference[key] = values
    return reference


def lookup(reference: Mapping[str, list[float]], examples: Sequence[Example],
           device: torch.device | str | None = None) -> torch.Tensor:
    """Reference log-probs [S, P] float32 for a micro-batch, aligned with ``collate``'s
    sequence-major ``.view(S, P)``; on ``device`` (the policy's) when given."""
    try:
        rows = [reference[e.key] for e in examples]
    except KeyError as err:
        raise ReferenceCacheError(f"no reference log-probs for example {err.args[0]!r}: the "
                                  f"cache was computed for other data or encoding") from None
    if any(len(r) != len(e.input_ids) for r, e in zip(rows, examples, strict=True)):
        raise ReferenceCacheError("reference log-probs have another number of sequences per "
                                  "example than the batch (another loss's encoding)")
    return torch.tensor(rows, dtype=torch.float32, device=device).T.contiguous()


# ------------------------------------------------------------------------------ internals


def _list_shards(uri: str, storage_options: StorageOptions) -> dict[int, set[int]]:
    """``{world: {ranks present}}`` from the shard files under ``uri`` (none if absent)."""
    fs, path = storage.resolve(uri, storage_options)
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    shards: dict[int, set[int]] = {}
    for info in infos:
        match = _SHARD.match(info.base_name)
        if match and info.type == pafs.FileType.File:
            rank, world = int(match.group(1)), int(match.group(2))
            if rank < world:
                shards.setdefault(world, set()).add(rank)
    return shards


def _complete_worlds(shards: Mapping[int, set[int]]) -> list[int]:
    """Worker counts whose shards are all present, smallest (fewest files to read) first."""
    return sorted(w for w, ranks in shards.items() if ranks >= set(range(w)))


# ------------------------------------------------------------------- one stage's reference


@dataclass(frozen=True)
class Shard:
    """This worker's share of the reference pass: ``examples[rank::world]`` on ``device``."""

    rank: int
    world: int
    device: Any


def tensors_fingerprint(states: Sequence[StageState]) -> str:
    """Content hash of what earlier stages trained (names, shapes and bytes)."""
    digest = hashlib.sha256()
    for state in states:
        digest.update(json.dumps(state.lora, sort_keys=True).encode())
        for name in sorted(state.tensors):
            tensor = state.tensors[name].detach().cpu().contiguous()
            digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
            digest.update(tensor.flatten().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def stage_reference_uri(config: LoopConfig, stage: StageSpec, index: int,
                        finished: Sequence[StageState]) -> str:
    """Where the reference log-probs of stage ``index``'s start model live.

    The key names the model (the base reference and dtype, plus a hash of what earlier
    stages trained: SFT+DPO's reference is the SFT result), the data, the template, the
    max length and the encoding.
    """
    model_key = f"{config.model}|{config.resources.precision}"
    if index and finished:
        model_key += f"+{tensors_fingerprint(finished)}"
    key = reference_key(model_key, config.pairs_fingerprint, config.train.prompt_template,
                        config.train.max_length, stage.loss, stage.sft_data or "target",
                        stage.dpo_pairs)
    return reference_uri(config.reference_root, key)


def stage_reference(model: Any, examples: Sequence[Example], uri: str, shard: Shard, *,
                    config: LoopConfig, pad_id: int | None) -> tuple[dict | None, int]:
    """Reference log-probs at ``uri`` for every example, and how many this worker computed
    (0 on a cache hit).

    Rank 0 decides whether the cache is complete and tells the others, so all workers
    agree; otherwise each computes its shard ``examples[rank::world]`` and writes it, and
    all read the whole table after a barrier.
    """
    import torch.distributed as dist

    options = config.storage_options or None
    found = usable_reference(uri, options) if shard.rank == 0 else None
    flag = [found is not None if shard.rank == 0 else None]
    if shard.world > 1:
        dist.broadcast_object_list(flag, src=0)
    computed = 0
    if not flag[0]:
        mine = examples[shard.rank::shard.world]
        model.to(shard.device)
        logps = compute_reference_logps(model, mine, pad_id=pad_id,
                                        micro_batch=config.train.micro_batch_pairs)
        write_shard(uri, mine, logps, rank=shard.rank, world=shard.world,
                    storage_options=options)
        computed = len(mine)
        logger.info("rank %d computed reference log-probs of %d examples -> %s", shard.rank,
                    computed, uri)
    if shard.world > 1:
        dist.barrier()
    if found is not None:  # rank 0 read (and verified) it already
        return found, computed
    return read_reference(uri, options), computed
