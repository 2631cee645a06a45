"""A judge behind an OpenAI-compatible chat endpoint: `vllm serve` of a large model, or an API.

A cluster user's judge is rarely a model the sweep can load itself: it is a 70B model served
by vLLM on other nodes, or a hosted API. :class:`EndpointJudge` is the judge stage's callable
(``prompts -> replies``) for such an endpoint:

- one chat completion per prompt (``messages=[{"role": "user", ...}]``), greedy by default,
  at most ``max_concurrency`` in flight (a thread pool: the calls wait on the network);
- retries with exponential backoff and jitter on connection errors, timeouts, 408 / 409 /
  429 and 5xx, and a per-request timeout: the ``openai`` client's own (``max_retries``,
  ``timeout``), the behaviour every OpenAI-compatible server is tested against;
- a prompt still failing after its retries gives ``None`` (never an empty verdict) and its
  index and reason in :attr:`EndpointJudge.failures`, so the stage counts and names it;
- the API key is read from the environment variable the spec NAMES; its value is never
  logged, stored or put in an error message.
"""

from __future__ import annotations

import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from clo_ray.errors import CloRayError

logger = logging.getLogger(__name__)

NO_KEY = "EMPTY"  # what a keyless `vllm serve` accepts (the client insists on some key)


class JudgeEndpointError(CloRayError, RuntimeError):
    """The endpoint judge cannot be set up (a named environment variable is not set)."""


@dataclass(frozen=True)
class EndpointSettings:
    """Where the judge is served and how hard to try. ``api_key_env``: the NAME of the
    environment variable holding the key (None: no key, a local server)."""

    base_url: str
    model: str
    api_key_env: str | None = None
    max_concurrency: int = 8
    max_retries: int = 4
    timeout_s: float = 120.0
    max_tokens: int = 512
    temperature: float = 0.0


class EndpointJudge:
    """``judge(prompts) -> replies`` over the endpoint (module docstring); ``close()`` when
    done. :attr:`failures` holds the last call's failed prompts: index -> reason."""

    def __init__(self, settings: EndpointSettings) -> None:
        from openai import OpenAI

        key = NO_KEY
        if settings.api_key_env is not None:
            key = os.environ.get(settings.api_key_env, "")
            if not key:
                raise JudgeEndpointError(
                    f"the judge endpoint's key variable {settings.api_key_env} is not set (or "
                    "empty) in this environment: export it where the sweep's driver runs")
        self.settings, self._key = settings, key
        self.failures: dict[int, str] = {}
        self.client: Any = OpenAI(base_url=settings.base_url, api_key=key,
                                  timeout=settings.timeout_s, max_retries=settings.max_retries)

    def __call__(self, prompts: list[str]) -> list[str | None]:
        started = time.perf_counter()
        self.failures = {}
        with ThreadPoolExecutor(max_workers=self.settings.max_concurrency) as pool:
            replies = list(pool.map(self._ask, range(len(prompts)), prompts))
        logger.info("judge endpoint %s (%s): %d prompts, %d failed, %.1f s",
                    self.settings.base_url, self.settings.model, len(prompts),
                    len(self.failures), time.perf_counter() - started)
        if self.failures:
            logger.warning("judge endpoint: %d prompts failed after %d retries: indices %s "
                           "(first reason: %s)", len(self.failures), self.settings.max_retries,
                           sorted(self.failures), next(iter(self.failures.values())))
        return replies

    def _ask(self, index: int, prompt: str) -> str | None:
        try:
            response = self.client.chat.completions.create(
                model=self.settings.model, messages=[{"role": "user", "content": prompt}],
                max_tokens=self.settings.max_tokens, temperature=self.settings.temperature)
        except Exception as err:  # every failure is the prompt's, reported, never raised
            self.failures[index] = self._scrub(f"{type(err).__name__}: {err}")
            return None
        return response.choices[0].message.content or ""

    def _scrub(self, text: str) -> str:
        """The reason without the key (some servers echo the header they refused)."""
        text = text if self._key == NO_KEY else text.replace(self._key, "<key>")
        return text[:300]

    def close(self) -> None:
        self.client.close()
