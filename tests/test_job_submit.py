"""``ray job submit`` for real: the tiny sweep as a Ray job on a Ray head this module starts.

Users run a sweep as ``ray job submit --working-dir . -- python -m clo_ray.sweep SPEC`` against
a running cluster; this does the same on one machine, with the real ``ray`` CLI, and reads the
results from storage. The head is ``ray start --head --block`` in its own session, bound to
127.0.0.1 on ports chosen free here (other Ray clusters run on this box at the same time, so
no default port is assumed free), with token authentication on (``RAY_AUTH_MODE=token`` and a
token file of its own: ``~/.ray/auth_token`` is shared by everything else on the machine).
The job's driver runs ``python`` from the head's PATH, so the head starts with this venv's
``bin`` first, as an activated venv would. One module-scoped job serves every assertion.
"""

from __future__ import annotations

import ipaddress
import json
import os
import random
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import psutil
import pyarrow.parquet as pq
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SPEC = ROOT / "tests" / "specs" / "job_tiny.yaml"
BIN = Path(sys.executable).parent  # the venv's bin: ray and python
SUBMISSION_ID = "clo-job-tiny"
# set by the user with --runtime-env-json; clo_ray.sweep's ray.init sets the same variable:
# Ray refuses such a conflict unless the driver gives way (driver_runtime_env)
JOB_ENV_VARS = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}


def free_ports(count: int) -> list[int]:
    """Distinct ports free on every interface right now (all held open until all are picked)."""
    with ExitStack() as stack:
        ports = []
        for _ in range(count):
            sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            sock.bind(("", 0))
            ports.append(sock.getsockname()[1])
        return ports


def free_port_range(size: int) -> tuple[int, int]:
    """A block of free ports for Ray's workers, outside Ray's default worker range
    (10002-19999, which other clusters on this box use) and Linux's ephemeral range."""
    for _ in range(50):
        low = random.randrange(20000, 32000 - size)
        with ExitStack() as stack:
            try:
                for port in range(low, low + size):
                    sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
                    sock.bind(("", port))
            except OSError:
                continue
        return low, low + size - 1
    raise RuntimeError("no free block of worker ports")


def is_loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip)
    mapped = getattr(address, "ipv4_mapped", None)  # ::ffff:127.0.0.1 (a dual-stack socket)
    return (mapped or address).is_loopback


def session_processes(sid: int) -> list[psutil.Process]:
    """Every live process of a session (the head's session: the Ray processes it started)."""
    found = []
    for proc in psutil.process_iter():
        try:
            if os.getsid(proc.pid) == sid and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except (ProcessLookupError, psutil.Error):
            continue
    return found


def wait_for_ports(head: subprocess.Popen, ports: list[int], log: Path, timeout: float) -> None:
    """Until each port accepts connections on 127.0.0.1 (or the head exits: fail)."""
    deadline, waiting = time.time() + timeout, list(ports)
    while waiting and time.time() < deadline:
        assert head.poll() is None, f"ray start exited:\n{log.read_text()[-4000:]}"
        try:
            with socket.create_connection(("127.0.0.1", waiting[0]), timeout=1):
                waiting.pop(0)
        except OSError:
            time.sleep(1)
    assert not waiting, f"ports {waiting} not up in {timeout} s:\n{log.read_text()[-4000:]}"


def stop_head(head: subprocess.Popen) -> None:
    """Stop what the fixture started, by its own handle: SIGTERM to the head's process group
    (the ray start --block session), then check that nothing of that session or below the
    head is left; stragglers are SIGKILLed by pid and reported."""
    sid = head.pid  # start_new_session: the head leads its own session and process group
    try:
        below = psutil.Process(head.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        below = []
    try:
        os.killpg(head.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    try:
        head.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(head.pid, signal.SIGKILL)
        head.wait(timeout=30)
    deadline, left = time.time() + 60, []
    while time.time() < deadline:
        left = session_processes(sid) + [p for p in below if p.is_running()
                                         and p.status() != psutil.STATUS_ZOMBIE]
        if not left:
            return
        time.sleep(1)
    names = [(p.pid, p.name()) for p in left if p.is_running()]
    for proc in left:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    raise AssertionError(f"processes of the head left after SIGTERM: {names}")


def start_head(tmp: Path) -> tuple[subprocess.Popen, dict[str, Any]]:
    """A Ray head of our own: loopback only, every port picked free, token auth on."""
    token = tmp / "auth_token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    (gcs, dashboard, agent_http, agent_grpc, metrics, client, runtime_env, node_manager,
     object_manager) = free_ports(9)
    low, high = free_port_range(200)
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token),
           "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
           "RAY_USAGE_STATS_ENABLED": "0",
           # Ray turns --node-ip-address 127.0.0.1 into the host's address
           # (services.resolve_ip_for_localhost) unless "clusters" are off: one node, loopback
           "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
           # Ray processes that look for "their" cluster (Train's PlacementGroupCleaner uses
           # the state API with address "auto") would find several on this box: name ours
           "RAY_ADDRESS": f"127.0.0.1:{gcs}",
           # SIGTERM would first drain the node for 30 s, but the group's GCS gets it too
           "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}
    env.pop("RAY_AUTH_TOKEN", None)  # the file is the only token
    command = [str(BIN / "ray"), "start", "--head", "--block", "--disable-usage-stats",
               "--node-ip-address", "127.0.0.1", "--dashboard-host", "127.0.0.1",
               "--port", str(gcs), "--dashboard-port", str(dashboard),
               "--dashboard-agent-listen-port", str(agent_http),
               "--dashboard-agent-grpc-port", str(agent_grpc),
               "--metrics-export-port", str(metrics), "--ray-client-server-port", str(client),
               "--runtime-env-agent-port", str(runtime_env),
               "--node-manager-port", str(node_manager),
               "--object-manager-port", str(object_manager),
               "--min-worker-port", str(low), "--max-worker-port", str(high),
               "--num-cpus", "2", "--temp-dir", str(tmp / "r")]
    log = tmp / "head.log"
    with open(log, "w") as out:
        head = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        # the job server (dashboard) hands a job to the dashboard agent: wait for both
        wait_for_ports(head, [dashboard, agent_http], log, timeout=180)
    except BaseException:
        stop_head(head)
        raise
    client_env = {key: value for key, value in env.items() if key != "RAY_ADDRESS"}
    return head, {"address": f"http://127.0.0.1:{dashboard}", "env": client_env, "tmp": tmp,
                  "temp_dir": tmp / "r", "dashboard_port": dashboard, "sid": head.pid}


def kill_head(head: subprocess.Popen) -> None:
    """A lost head node: SIGKILL to every process of the head's session (GCS, raylet, the job
    supervisor and the job's driver, trial and train workers), no clean-up of any kind."""
    deadline = time.time() + 60
    while (left := session_processes(head.pid)) and time.time() < deadline:
        for proc in left:
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass
        time.sleep(0.5)
    head.wait(timeout=30)
    assert not session_processes(head.pid), "processes of the killed head are left"


@pytest.fixture(scope="module")
def heads(tmp_path_factory):
    """``heads()`` starts one more Ray head (a new cluster, as a RayJob retry gets); every
    head still running is stopped at the end."""
    started: list[subprocess.Popen] = []

    def start() -> dict[str, Any]:
        head, info = start_head(tmp_path_factory.mktemp("h"))  # short: Ray's socket paths
        started.append(head)
        info["process"] = head
        return info

    try:
        yield start
    finally:
        for head in started:
            if head.poll() is None:
                stop_head(head)


def ray_cli(head: dict, *args: str, timeout: float, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "ray"), *args], env={**head["env"], **env},
                          capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


def submit(head: dict, submission_id: str, spec: Path, *options: str,
           timeout: float = 900) -> subprocess.CompletedProcess:
    """``ray job submit`` as users run it (the working dir uploaded, our env var given)."""
    runtime_env = {"env_vars": JOB_ENV_VARS}  # .git/.venv: Ray 2.60 leaves them out itself
    for _ in range(3):
        done = ray_cli(head, "job", "submit", "--address", head["address"],
                       "--submission-id", submission_id, "--working-dir", str(ROOT),
                       "--runtime-env-json", json.dumps(runtime_env), *options,
                       "--", "python", "-m", "clo_ray.sweep", str(spec), timeout=timeout)
        # a loaded box: the job server may not see its agent yet (HTTP 500, job not created)
        if "No available agent to submit job" not in done.stderr:
            return done
        time.sleep(5)
    return done


def finished_trials(run_dir: Path) -> set[str]:
    """Train run names of the trials whose final (evaluated) report reached Tune."""
    names = set()
    for result in (run_dir / "tune").glob("*/result.json"):
        try:
            rows = [json.loads(line) for line in result.read_text().splitlines() if line]
        except (ValueError, OSError):  # being written
            continue
        names |= {Path(r["checkpoint"].rstrip("/")).parent.name for r in rows
                  if r.get("trial_done")}
    return names


def fingerprints(*folders: Path) -> dict[str, tuple[int, str]]:
    """(mtime_ns, sha256) of every file under ``folders``: what "untouched" means."""
    import hashlib

    return {str(f): (f.stat().st_mtime_ns, hashlib.sha256(f.read_bytes()).hexdigest())
            for folder in folders for f in sorted(folder.rglob("*"))
            if f.is_file() and ".tmp-" not in f.name}  # a write in flight is not finished


@pytest.fixture(scope="module")
def submitted(heads, tmp_path_factory):
    """The tiny sweep (2 trials, one at a time) submitted as users do; its head and driver
    killed once the first trial finished, and the same entrypoint submitted again to a new
    head, as a RayJob retry does: no flag, no clean-up, no human step."""
    tmp = tmp_path_factory.mktemp("job")
    data = yaml.safe_load(SPEC.read_text())
    data["run"]["storage"] = str(tmp / "runs")
    data["search"].update(trials_per_cell=2, max_concurrent_trials=1)
    spec = tmp / "job_tiny.yaml"
    spec.write_text(yaml.safe_dump(data))
    run_dir = tmp / "runs" / data["run"]["name"]

    first = heads()
    start = time.time()
    sent = submit(first, f"{SUBMISSION_ID}-1", spec, "--no-wait", timeout=300)
    assert sent.returncode == 0, sent.stdout + sent.stderr
    deadline = time.time() + 900
    while not (done_before := finished_trials(run_dir)):
        status = ray_cli(first, "job", "status", "--address", first["address"],
                         f"{SUBMISSION_ID}-1", timeout=120)
        assert "FAILED" not in status.stdout and time.time() < deadline, \
            ray_cli(first, "job", "logs", "--address", first["address"], f"{SUBMISSION_ID}-1",
                    timeout=120).stdout[-4000:]
        time.sleep(2)
    first_trial_s = time.time() - start
    caches = tmp / "runs" / "cache"
    [name] = done_before
    kept = fingerprints(run_dir / "trials" / name, run_dir / "eval", caches)
    kill_head(first["process"])  # mid-sweep: the second trial is starting or training
    killed_at = time.time()

    last = heads()  # the retry: a new cluster, the same entrypoint
    done = submit(last, SUBMISSION_ID, spec)
    retry_s = time.time() - killed_at
    # the uploaded working dir, while the head still holds it
    packages = sorted({p.resolve() for p in last["temp_dir"].glob(
        "session_*/runtime_resources/working_dir_files/*/")})  # session_latest is a link
    print(f"first trial done after {first_trial_s:.0f} s; head + driver killed; "
          f"new head + retried job done in {retry_s:.0f} s")
    return {"done": done, "seconds": retry_s, "spec": data, "run_dir": run_dir,
            "packages": packages, "temp_dir": last["temp_dir"], "head": last,
            "finished_before": name, "kept": kept, "caches": caches}


def test_a_submitted_jobs_runtime_env_and_ours_merge_in_ray(monkeypatch):
    """What clo_ray.sweep passes to ray.init inside a job: Ray's own merge must accept it."""
    from ray._private.runtime_env.constants import RAY_JOB_CONFIG_JSON_ENV_VAR
    from ray.runtime_env.runtime_env import _merge_runtime_env

    from clo_ray.ray_env import REPORT_POLL_ENV, driver_runtime_env, ray_runtime_env

    monkeypatch.delenv(RAY_JOB_CONFIG_JSON_ENV_VAR, raising=False)
    assert driver_runtime_env() == ray_runtime_env()  # not a job: unchanged
    job = {"working_dir": "gcs://_ray_pkg_0123456789abcdef.zip", "env_vars": JOB_ENV_VARS}
    monkeypatch.setenv(RAY_JOB_CONFIG_JSON_ENV_VAR, json.dumps({"runtime_env": job}))
    assert _merge_runtime_env(job, ray_runtime_env()) is None  # ray.init would raise
    merged = _merge_runtime_env(job, driver_runtime_env())
    assert merged == job  # the job's working_dir and its own value of the variable
    job = {"working_dir": job["working_dir"], "env_vars": {"HF_HUB_OFFLINE": "1"}}
    monkeypatch.setenv(RAY_JOB_CONFIG_JSON_ENV_VAR, json.dumps({"runtime_env": job}))
    merged = _merge_runtime_env(job, driver_runtime_env())
    assert merged == {"working_dir": job["working_dir"],
                      "env_vars": {"HF_HUB_OFFLINE": "1", **REPORT_POLL_ENV}}


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_the_job_succeeds_and_its_results_land_in_storage(submitted):
    done = submitted["done"]
    log = done.stdout[-6000:] + done.stderr[-3000:]
    assert done.returncode == 0, log
    # printed once the tail ends, only for JobStatus.SUCCEEDED (FAILED exits 1)
    assert f"Job '{SUBMISSION_ID}' succeeded" in done.stdout + done.stderr, log
    run_dir = submitted["run_dir"]
    assert f"results: {run_dir / 'results.parquet'}" in done.stdout, log  # the job's own log
    rows = pq.read_table(run_dir / "results.parquet").to_pylist()
    trials = [row for row in rows if row["method"] != "base"]
    assert [(r["method"], r["language"], r["budget"], r["status"]) for r in trials] == \
        [("clo", "sw", 8, "completed")] * 2
    assert all(0.0 <= t["target_fidelity"] <= 1.0 and t["target_nll"] > 0 for t in trials)
    report = (run_dir / "report.md").read_text()
    assert "| tiny-llama |" in report


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_the_retried_job_resumed_without_redoing_finished_work(submitted):
    """Unattended recovery (the RayJob's backoffLimit): after the head and driver were killed,
    the same entrypoint on a new head took the dead driver's lease by itself, kept the
    finished trial (its checkpoints, history and evaluation) and every cache byte for byte,
    and trained only the trial that had not finished."""
    done = submitted["done"]
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-6000:]
    assert "taking over the lease" in log and "its process is gone" in log, log[-6000:]
    kept = submitted["kept"]
    assert any("/cache/" in path for path in kept) and any("/trials/" in path for path in kept)
    after = fingerprints(submitted["run_dir"] / "trials" / submitted["finished_before"],
                         submitted["run_dir"] / "eval", submitted["caches"])
    changed = [path for path, mark in kept.items() if after.get(path) != mark]
    assert not changed, changed  # not rewritten, not deleted (evaluations read again)
    for cache in ("translations", "pairs"):  # nothing translated or prepared again
        assert {p for p in after if f"/cache/{cache}/" in p} == \
            {p for p in kept if f"/cache/{cache}/" in p}, cache
    trained = sorted(p.parent.name for p in (submitted["run_dir"] / "trials").glob(
        "*/history.jsonl"))
    assert len(trained) == 2 and submitted["finished_before"] in trained


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_the_job_ran_in_the_uploaded_working_dir_without_the_venv(submitted):
    # the spec's relative corpus path was resolved in the job's cwd: the uploaded package
    # (the driver's log names it), and the run records it relative to that working dir
    read = re.search(r"corpus: 250 rows from (\S+)", submitted["done"].stdout)
    assert read, submitted["done"].stdout[-3000:]
    corpus = Path(read.group(1)).resolve()
    assert corpus.is_relative_to(submitted["temp_dir"].resolve()), corpus
    assert "working_dir_files" in corpus.parts and not corpus.is_relative_to(ROOT)
    recorded = yaml.safe_load((submitted["run_dir"] / "spec.yaml").read_text())
    assert recorded["spec"]["corpus"]["path"] == \
        "${ray_job_working_dir}/clo_ray/assets/parallel_sample.jsonl"
    packages = submitted["packages"]
    assert len(packages) == 1, packages
    package = packages[0]
    assert (package / "clo_ray" / "sweep" / "runner.py").read_text() == \
        (ROOT / "clo_ray" / "sweep" / "runner.py").read_text()
    assert not (package / ".venv").exists() and not (package / ".git").exists()
    size = sum(p.stat().st_size for p in package.rglob("*") if p.is_file())
    assert size < 50 * 2**20, f"{size} bytes uploaded"


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_token_auth_is_on_for_the_job_server(submitted, tmp_path):
    ray_head = submitted["head"]
    address = ray_head["address"]
    wrong = tmp_path / "wrong_token"
    wrong.write_text(secrets.token_hex(32))
    denied = ray_cli(ray_head, "job", "list", "--address", address, timeout=120,
                     RAY_AUTH_TOKEN_PATH=str(wrong))
    assert denied.returncode != 0 and "Invalid authentication token" in denied.stderr, \
        denied.stdout + denied.stderr
    allowed = ray_cli(ray_head, "job", "status", "--address", address, SUBMISSION_ID,
                      timeout=120)  # the right token: the job server reports SUCCEEDED
    assert allowed.returncode == 0 and f"Job '{SUBMISSION_ID}' succeeded" in \
        allowed.stdout + allowed.stderr, allowed.stdout + allowed.stderr
    # the dashboard (and job server) listen on loopback only, and so does everything else
    # the head started
    ours = {p.pid for p in session_processes(ray_head["sid"])}
    listening = {(c.laddr.ip, c.laddr.port) for c in psutil.net_connections("tcp")
                 if c.status == psutil.CONN_LISTEN and c.pid in ours}
    assert ("127.0.0.1", ray_head["dashboard_port"]) in listening, listening
    public = [(ip, port) for ip, port in listening if not is_loopback(ip)]
    assert not public, sorted(listening)
