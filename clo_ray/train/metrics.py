"""Training metrics across micro-batches and workers, and the rank-0 progress line.

Each worker adds every micro-batch's loss metrics (weighted by its number of pairs) and the
tokens it processed to a :class:`MetricWindow`; at a report step every worker calls
:meth:`MetricWindow.reduce`, which gathers the windows of all workers (a collective: all
ranks call it at the same steps, as they call ``ray.train.report``) into global means and a
global tokens/s. Weighting by pairs keeps shares exact: the window's
``preference_accuracy`` (each micro-batch's share of pairs right in both directions) is the
share over every pair the workers saw, the same quantity evaluation reports.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Mapping, Sequence

logger = logging.getLogger("clo_ray.train")

# The loss parts the progress line shows, in this order, when a stage reports them.
PROGRESS_FIELDS = (("train_loss", "loss"), ("target_nll", "nll"), ("loss_cl", "cl"),
                   ("preference_accuracy", "acc"), ("reward_margin", "margin"))


class MetricWindow:
    """Pair-weighted sums of metrics since the last report, plus token and time counters."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Start a new window (after a report)."""
        self.sums: dict[str, float] = defaultdict(float)
        self.weights: dict[str, float] = defaultdict(float)
        self.tokens = 0
        self.steps = 0
        self.started = time.perf_counter()
        self.cpu_started = time.process_time()

    def add(self, metrics: Mapping[str, float], weight: int, prefix: str = "") -> None:
        """Add one micro-batch's metrics (means over ``weight`` pairs)."""
        for name, value in metrics.items():
            self.sums[prefix + name] += float(value) * weight
            self.weights[prefix + name] += weight

    def add_languages(self, per_language: Mapping[str, tuple[Mapping[str, float], int]]) -> None:
        """Add per-language metrics as ``LANG/metric``."""
        for language, (metrics, weight) in per_language.items():
            self.add(metrics, weight, prefix=f"{language}/")

    def reduce(self) -> dict[str, float]:
        """Global means over all workers' windows, tokens/s, s/step, CPU s/step (per worker)
        and the largest worker's peak RSS; resets the window."""
        import resource

        import torch.distributed as dist

        elapsed = time.perf_counter() - self.started
        cpu = time.process_time() - self.cpu_started  # all threads; robust to a busy machine
        rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
        local = (dict(self.sums), dict(self.weights), self.tokens, elapsed, rss_mb, cpu)
        windows: list = [local]
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            windows = [None] * dist.get_world_size()
            dist.all_gather_object(windows, local)
        sums: dict[str, float] = defaultdict(float)
        weights: dict[str, float] = defaultdict(float)
        for part_sums, part_weights, *_ in windows:
            for name, value in part_sums.items():
                sums[name] += value
                weights[name] += part_weights[name]
        wall = max(w[3] for w in windows)
        out = {name: sums[name] / weights[name] for name in sorted(sums) if weights[name]}
        out["tokens"] = float(sum(w[2] for w in windows))  # non-pad tokens, all workers
        out["tokens_per_s"] = out["tokens"] / wall if wall > 0 else 0.0
        out["step_time_s"] = wall / self.steps if self.steps else 0.0
        out["peak_rss_mb"] = max(w[4] for w in windows)  # the largest worker
        out["cpu_s_per_step"] = sum(w[5] for w in windows) / len(windows) / max(self.steps, 1)
        self.reset()
        return out


class Progress:
    """Formats the rank-0 progress line: stage, step/total, loss parts, tokens/s, ETA."""

    def __init__(self, totals: Sequence[int], names: Sequence[str], done: int) -> None:
        self.totals, self.names = list(totals), list(names)
        self.start_done = done
        self.started = time.perf_counter()

    def line(self, stage: int, stage_step: int, global_step: int,
             metrics: Mapping[str, float]) -> str:
        """One line; the ETA extrapolates this run's speed over the remaining global steps."""
        return (f"[stage {stage} {self.names[stage]}] step {stage_step}/{self.totals[stage]} "
                f"(total {global_step}/{sum(self.totals)}) | {loss_parts(metrics)} | "
                f"{metrics.get('tokens_per_s', 0.0):.0f} tok/s | "
                f"ETA {duration(self.eta_s(global_step))}")

    def eta_s(self, global_step: int) -> float:
        """Seconds left: this run's speed so far over the remaining global steps."""
        ran = global_step - self.start_done
        remaining = sum(self.totals) - global_step
        return (time.perf_counter() - self.started) / ran * remaining if ran > 0 else 0.0


def loss_parts(metrics: Mapping[str, float]) -> str:
    """``loss 1.2345 nll 2.3456 ...``: the PROGRESS_FIELDS a report holds."""
    return " ".join(f"{label} {metrics[key]:.4f}" for key, label in PROGRESS_FIELDS
                    if key in metrics)


def duration(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"
