"""Which judge answers the judge stage: a given callable, an endpoint, or a local model.

The stage only calls ``judge(prompts) -> replies``; this module turns ``evaluation.judge``
into that callable, loading nothing until the first comparison that is not cached, and
names the judge (``identity``) for the verdict cache: the same answers judged by the same
judge are never judged twice.
"""

from __future__ import annotations

import os
from typing import Any

from clo_ray.eval.judge import JudgeGenerate
from clo_ray.spec.schema import SweepSpec


class LazyJudge:
    """The judge: a given callable, an endpoint, or a local model loaded on first use (a
    fully cached re-run loads nothing)."""

    def __init__(self, spec: SweepSpec, judge: JudgeGenerate | None) -> None:
        self.section, self.given = spec.evaluation.judge, judge
        self.batch_size = spec.evaluation.batch_size
        self.own: Any = None
        endpoint = self.section.endpoint
        if self.section.backend == "endpoint" and endpoint is not None:
            model = endpoint.model or os.environ.get(endpoint.model_env or "", "")
            self.identity = f"endpoint:{model}"
        else:
            self.identity = self.section.model or ""

    def __call__(self, prompts: list[str]) -> list[str | None]:
        if self.given is not None:
            return list(self.given(prompts))
        if self.own is None:
            self.own = self._load()
        return list(self.own(prompts))

    def _load(self) -> Any:
        if self.section.backend == "endpoint":
            from clo_ray.eval.judge_endpoint import EndpointJudge

            return EndpointJudge(endpoint_settings(self.section))
        from clo_ray.eval.judge import make_judge
        from clo_ray.models.resolve import resolve_model

        return make_judge(resolve_model(self.section.model or ""), self.section.backend,
                          self.section.max_new_tokens, batch_size=self.batch_size)

    def close(self) -> None:
        if self.own is not None:
            self.own.close()
            self.own = None


def endpoint_settings(section: Any) -> Any:
    """The endpoint client's settings from ``evaluation.judge`` (environment names read)."""
    from clo_ray.eval.judge_endpoint import EndpointSettings, JudgeEndpointError

    endpoint = section.endpoint
    values = {}
    for name in ("base_url", "model"):
        value = getattr(endpoint, name)
        env = getattr(endpoint, f"{name}_env")
        if value is None:
            value = os.environ.get(env or "", "")
            if not value:
                raise JudgeEndpointError(f"evaluation.judge.endpoint.{name}_env names {env}, "
                                         "which is not set in the driver's environment")
        values[name] = value
    return EndpointSettings(values["base_url"], values["model"], endpoint.api_key_env,
                            max_concurrency=endpoint.max_concurrency,
                            max_retries=endpoint.max_retries, timeout_s=endpoint.timeout_s,
                            max_tokens=section.max_new_tokens)
