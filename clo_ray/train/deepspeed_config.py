"""The DeepSpeed config of a trial, built from the spec, and DeepSpeed's CPU set-up.

Mapping (spec -> DeepSpeed JSON); batch sizes count *pairs*, not sequences (a CLO pair is
4 sequences, all in the same micro-batch):

=================================  =========================================================
``train.batch_pairs``              ``train_batch_size``
``train.micro_batch_pairs``        ``train_micro_batch_size_per_gpu``
batch / (micro x workers)          ``gradient_accumulation_steps``
``train.grad_clip``                ``gradient_clipping`` (0 = off)
``resources.zero_stage``           ``zero_optimization.stage``
``resources.offload``              ``offload_optimizer`` (optimizer, optimizer_and_params) and
                                   ``offload_param`` (optimizer_and_params), device cpu
``resources.precision``            ``bf16.enabled`` / ``fp16.enabled`` (fp32: neither)
=================================  =========================================================

The optimizer and LR schedule are *client* objects (``torch.optim.AdamW`` over the trainable
parameters, a transformers scheduler), not DeepSpeed JSON: DeepSpeed's own Adam variants
JIT-compile C++ on first use, and a client optimizer sees only what the stage trains.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

from clo_ray.errors import CloRayError
from clo_ray.spec.training import ResourcesSection, TrainSection

logger = logging.getLogger(__name__)


class TrainConfigError(CloRayError):
    """The batch layout or resources cannot form a valid DeepSpeed configuration."""


def gradient_accumulation(batch_pairs: int, micro_batch_pairs: int, workers: int) -> int:
    """Micro-steps per optimizer step: ``batch_pairs / (micro_batch_pairs x workers)``."""
    per_step = micro_batch_pairs * workers
    if batch_pairs % per_step:
        raise TrainConfigError(
            f"train.batch_pairs {batch_pairs} is not divisible by micro_batch_pairs x workers "
            f"= {micro_batch_pairs} x {workers} = {per_step}"
        )
    return batch_pairs // per_step


def deepspeed_config(train: TrainSection, resources: ResourcesSection, workers: int) -> dict:
    """DeepSpeed JSON for the spec's ``train`` and ``resources`` sections."""
    stage = int(resources.zero_stage)
    zero: dict[str, Any] = {"stage": stage}
    offload = resources.offload
    if offload in ("optimizer", "optimizer_and_params"):
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": False}
    if offload == "optimizer_and_params":
        zero["offload_param"] = {"device": "cpu", "pin_memory": False}
    precision = resources.precision
    return {
        "train_batch_size": train.batch_pairs,
        "train_micro_batch_size_per_gpu": train.micro_batch_pairs,
        "gradient_accumulation_steps": gradient_accumulation(
            train.batch_pairs, train.micro_batch_pairs, workers
        ),
        "gradient_clipping": float(train.grad_clip or 0.0),
        "zero_optimization": zero,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        # Our client torch.optim.AdamW under ZeRO (and under offload, where DeepSpeed would
        # otherwise insist on its own JIT-compiled CPU Adam).
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**9,  # our progress line replaces DeepSpeed's
        "wall_clock_breakdown": False,
    }


def prepare_cpu_deepspeed() -> None:
    """Make DeepSpeed run on CPU without compiling anything (call before deepspeed.initialize).

    ``deepspeed.comm``'s torch backend JIT-builds a shared-memory all-reduce op on CPU
    (60-95 s, once per venv) when it initialises; gloo does the same job here. We replace
    its ``build_shm_op`` with one that returns None (DeepSpeed's own "op unavailable" path).
    The module is reached through ``sys.modules`` because the package ``deepspeed.comm``
    exposes a submodule named ``torch`` that shadows the real torch on attribute access.
    No effect with a GPU accelerator, where that op is never built.
    """
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed.comm.torch  # noqa: F401  (registers the module in sys.modules)

    module: Any = sys.modules["deepspeed.comm.torch"]
    if getattr(module.build_shm_op, "__name__", "") != "_no_shm_op":

        def _no_shm_op() -> None:
            return None

        module.build_shm_op = _no_shm_op
