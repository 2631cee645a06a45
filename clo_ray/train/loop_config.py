"""What every worker's training loop is handed: one typed, picklable object.

Built on the driver by :func:`clo_ray.train.trainer.loop_config` and passed through Ray Train's
``train_loop_config`` as ``{"loop": LoopConfig(...)}`` (Ray wants a dict); the loop, the
checkpoint writer and the reference cache read its fields, so a misspelt key is a type error,
not a silent ``KeyError`` on a worker minutes into a run.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from clo_ray.errors import CloRayError
from clo_ray.spec.training import ResourcesSection, StageSpec, TrainSection

# Keys of run_training(run=TrainRun(extra=...)): testing and time-boxing knobs of the loop.
EXTRA_KEYS = ("stop_after_steps", "sample_log", "step_sleep_s")


class LoopConfigError(CloRayError, ValueError):
    """``TrainRun.extra`` names a key the loop does not read."""


@dataclass(frozen=True)
class LoopConfig:
    """One run's loop settings: the model, its data in storage, the schedule, the spec's
    ``train`` and ``resources`` sections, and where the reference cache lives."""

    model: str  # model reference (hub id, local dir, builtin:...)
    languages: tuple[str, ...]
    stages: tuple[StageSpec, ...]  # search overrides already applied
    train: TrainSection
    resources: ResourcesSection
    seed: int
    pairs_uri: str  # the pairs stage's training parquet
    eval_uri: str
    pairs_fingerprint: str  # part of every reference-cache key
    reference_root: str  # RunLayout.reference: one folder per content key
    storage_options: dict[str, Any] | None = None
    # Testing / time-boxing: checkpoint and return after that many global steps (as a
    # preempted job would); append each rank's pair keys per step to <sample_log>.rank<R>;
    # sleep after each step.
    stop_after_steps: int | None = None
    sample_log: str | None = None
    step_sleep_s: float = 0.0

    def training_fingerprint(self) -> str:
        """What the trained weights depend on besides the data (model, stages with their
        searched values, train section, seed), hashed: a checkpoint records it, so a run
        folder resumed by another configuration (a re-used trial name) fails instead of
        "resuming" someone else's weights."""
        blob = json.dumps({"model": self.model, "seed": self.seed,
                           "stages": [s.model_dump(mode="json", by_alias=True)
                                      for s in self.stages],
                           "train": self.train.model_dump(mode="json")},
                          sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def with_extra(self, extra: Mapping[str, Any] | None) -> LoopConfig:
        """This config with ``run_training(run=TrainRun(extra=...))`` applied (see EXTRA_KEYS)."""
        if not extra:
            return self
        unknown = sorted(set(extra) - set(EXTRA_KEYS))
        if unknown:
            raise LoopConfigError(f"TrainRun.extra keys {unknown} are not loop settings; the "
                                  f"loop reads {', '.join(EXTRA_KEYS)}")
        return replace(self, **dict(extra))

