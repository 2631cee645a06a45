"""The tiny sweep on ``s3://`` against an S3 server the test owns, killed and resumed there.

An S3-compatible server (moto's, in this process, on 127.0.0.1 and a free port) holds a
bucket; the sweep runs as users run it (``python -m clo_ray.sweep SPEC`` with
``run.storage: s3://<bucket>/runs``), given the endpoint and credentials only through the
standard AWS variables, as on a cloud cluster. One module-scoped run does the expensive
part: the driver is killed (with the Ray it started) after the first trial finished, and the
same command is run again. The tests then read the bucket: every stage's output is there and
nothing landed in the working directory; the restart re-ran no finished trial and hit the
caches; and a planted fake secret (an HF token, the AWS secret key) appears in no object and
in no log.

The spec is tests/specs/tiny_sweep.yaml with one method (clo) x 2 trials instead of
2 methods x 2 trials: the second trial still reads the reference cache the first one wrote,
and the module costs half of tests/test_sweep.py's run.
"""

from __future__ import annotations

import gzip
import io
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SPEC = ROOT / "tests" / "specs" / "tiny_sweep.yaml"
BUCKET = "clo-test-bucket"
PREFIX = "runs"  # run.storage = s3://BUCKET/runs; the run itself is runs/tiny


# ------------------------------------------------------------------------------ helpers


def write_spec(tmp: Path) -> Path:
    data = yaml.safe_load(SPEC.read_text())
    data["run"]["storage"] = f"s3://{BUCKET}/{PREFIX}"
    data["methods"] = ["clo"]
    data["schedules"].pop("sft")
    path = tmp / "spec.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def objects(client, prefix: str = "") -> dict[str, tuple[str, object]]:
    """Every object under ``prefix``: key -> (ETag, LastModified)."""
    out = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix):
        out.update({o["Key"]: (o["ETag"], o["LastModified"]) for o in page.get("Contents", [])})
    return out


def read(client, key: str) -> bytes:
    return client.get_object(Bucket=BUCKET, Key=key)["Body"].read()


def finished_trials(client) -> int:
    """TERMINATED trials in the newest experiment state Tune synced to the bucket."""
    states = sorted(k for k in objects(client, f"{PREFIX}/tiny/tune/")
                    if k.rsplit("/", 1)[-1].startswith("experiment_state-"))
    if not states:
        return 0
    text = read(client, states[-1]).decode()
    return text.count('"TERMINATED"') + text.count('\\"TERMINATED\\"')


def history(client) -> dict[str, list[dict]]:
    """Each trial run's training reports (``trials/<name>/history.jsonl``), by run name."""
    out = {}
    for key in sorted(objects(client, f"{PREFIX}/tiny/trials/")):
        if key.endswith("/history.jsonl"):
            name = key.split("/")[-2]
            out[name] = [json.loads(line) for line in read(client, key).decode().splitlines()]
    return out


def run_processes(marker: bytes) -> dict[int, tuple[bytes, list[bytes]]]:
    """Live processes whose environment holds ``marker`` (this run's own RAY_TMPDIR=...):
    pid -> (cmdline, environ). Ray's workers lead their own process groups, so the driver's
    group does not find them; the marker does, and names no other agent's process."""
    out = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                environ = Path(f"/proc/{entry}/environ").read_bytes().split(b"\0")
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            except OSError:
                continue
            if marker in environ:
                out[int(entry)] = (cmdline, environ)
    return out


def ray_workers_with(marker: bytes, needles: list[bytes], title: bytes = b"ray::") -> int:
    """How many of the run's Ray worker processes (process title starting with ``title``)
    have all of ``needles`` (``NAME=value``) in their environment."""
    return sum(cmd.startswith(title) and all(n in env for n in needles)
               for cmd, env in run_processes(marker).values())


def kill_run(driver: subprocess.Popen, marker: bytes) -> None:
    """SIGKILL a driver with the local Ray it started (its process group, at once), then
    whatever else of the run is left (Ray's workers, found by ``marker``)."""
    if driver.poll() is None:  # alive: its pid is still its group's id
        os.killpg(driver.pid, signal.SIGKILL)
    driver.wait()
    for pid in run_processes(marker):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def texts_of(key: str, body: bytes) -> list[bytes]:
    """The raw object, plus its decoded content where the raw bytes may hide a string
    (parquet pages are compressed; gzip)."""
    out = [body]
    if body[:2] == b"\x1f\x8b":
        out.append(gzip.decompress(body))
    if key.endswith(".parquet"):
        out.append(repr(pq.read_table(pa.BufferReader(body)).to_pylist()).encode())
    return out


# ------------------------------------------------------------------------------ the run


@pytest.fixture(scope="module")
def s3_endpoint():
    """A moto S3 server on 127.0.0.1, a free port; stopped by its handle."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    quiet = logging.getLogger("werkzeug")  # one INFO line per request otherwise
    level = quiet.level
    quiet.setLevel(logging.WARNING)
    server.start()
    try:
        host, port = server.get_host_and_port()
        yield f"http://{host}:{port}"
    finally:
        server.stop()
        quiet.setLevel(level)


@pytest.fixture(scope="module")
def s3_sweep(s3_endpoint, tmp_path_factory):
    import boto3

    tmp = tmp_path_factory.mktemp("s3sweep")
    work, logs = tmp / "work", tmp / "logs"
    work.mkdir()
    logs.mkdir()
    spec = write_spec(tmp)
    secrets = {"HF_TOKEN": f"hf_FAKE_SECRET_{uuid.uuid4().hex}",
               "AWS_SECRET_ACCESS_KEY": f"fake-aws-secret-{uuid.uuid4().hex}"}
    creds = {"AWS_ACCESS_KEY_ID": f"AKIAFAKE{uuid.uuid4().hex[:12].upper()}",
             "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": s3_endpoint}
    client = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1",
                          aws_access_key_id=creds["AWS_ACCESS_KEY_ID"],
                          aws_secret_access_key=secrets["AWS_SECRET_ACCESS_KEY"])
    client.create_bucket(Bucket=BUCKET)
    # Ray's session files (logs included) in a folder of our own, short for Ray's sockets
    ray_tmp = Path(tempfile.mkdtemp(prefix="clos3-", dir="/tmp"))
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("AWS_") and k not in ("RAY_ADDRESS", "HF_TOKEN")}
    env.update(creds, **secrets, RAY_TMPDIR=str(ray_tmp))
    marker = f"RAY_TMPDIR={ray_tmp}".encode()
    command = [sys.executable, "-m", "clo_ray.sweep", str(spec)]
    first_log = open(logs / "first.log", "wb")
    first = subprocess.Popen(command, cwd=work, env=env, stdout=first_log,
                             stderr=subprocess.STDOUT, start_new_session=True)
    started = time.time()
    try:
        planted = [f"{k}={v}".encode() for k, v in {**secrets, **creds}.items()]
        saw = {"workers": 0, "train_workers": 0}
        while finished_trials(client) < 1:
            assert first.poll() is None, (logs / "first.log").read_text()[-3000:]
            assert time.time() < started + 600, "no trial finished in 10 minutes"
            saw["workers"] = max(saw["workers"], ray_workers_with(marker, planted))
            saw["train_workers"] = max(saw["train_workers"], ray_workers_with(
                marker, planted, b"ray::RayTrainWorker"))
            time.sleep(2)
        kill_run(first, marker)  # the driver and the Ray it started
        first_log.close()
        before = history(client)
        cached = objects(client, f"{PREFIX}/cache/")
        with open(logs / "second.out", "wb") as out, open(logs / "second.err", "wb") as err:
            second = subprocess.Popen(command, cwd=work, env=env, stdout=out, stderr=err,
                                      start_new_session=True)
            try:
                code = second.wait(timeout=1200)
            finally:
                kill_run(second, marker)  # leftovers of its Ray, if any
        assert code == 0, ((logs / "second.out").read_text()[-3000:]
                           + (logs / "second.err").read_text()[-3000:])
        yield {"client": client, "work": work, "logs": logs, "ray_tmp": ray_tmp,
               "secrets": secrets, "before": before, "after": history(client),
               "cached": cached, "cache_now": objects(client, f"{PREFIX}/cache/"),
               "saw": saw, "env": env}
    finally:
        kill_run(first, marker)
        first_log.close()
        shutil.rmtree(ray_tmp, ignore_errors=True)


# ------------------------------------------------------------------------------ the tests


@pytest.mark.slow
@pytest.mark.timeout(2400)  # the first test to run sets the run up
def test_every_stage_writes_to_the_bucket_and_nothing_to_the_working_dir(s3_sweep):
    client = s3_sweep["client"]
    keys = set(objects(client))
    run = f"{PREFIX}/tiny"

    def under(prefix: str, suffix: str = "") -> list[str]:
        return [k for k in keys if k.startswith(prefix) and k.endswith(suffix)]

    assert under(f"{PREFIX}/cache/translations/", ".parquet"), sorted(keys)
    assert under(f"{PREFIX}/cache/reference/", ".parquet"), sorted(keys)
    assert under(f"{PREFIX}/cache/pairs/", ".train.parquet")
    assert under(f"{PREFIX}/cache/eval/base/")  # the base model's answers, evaluated once
    assert under(f"{run}/tune/", ".json") and under(f"{run}/tune/", "tuner.pkl")
    trials = {k.split("/")[3] for k in under(f"{run}/trials/")} - {""}  # "" : folder marker
    assert len(trials) == 2, sorted(keys)
    for name in trials:  # a Ray Train checkpoint: our manifest beside the trained tensors
        assert [k for k in under(f"{run}/trials/{name}/checkpoint_") if k.endswith(".json")]
    assert {f"{run}/spec.yaml", f"{run}/results.parquet", f"{run}/report.md",
            f"{run}/best_trials.parquet"} <= keys

    results = pq.read_table(pa.BufferReader(read(client, f"{run}/results.parquet"))).to_pylist()
    trained = [r for r in results if r["method"] == "clo"]
    assert len(trained) == 2 and all(r["status"] == "completed" for r in trained)
    assert all(r["checkpoint"].startswith(f"{BUCKET}/{run}/trials/") for r in trained)
    assert [r["budget"] for r in results if r["method"] == "base"] == [0]
    assert "| tiny-llama |" in read(client, f"{run}/report.md").decode()
    import matplotlib.image

    png = read(client, f"{run}/budget_curves_target_fidelity.png")
    assert matplotlib.image.imread(io.BytesIO(png), format="png").shape[0] > 100
    assert list(s3_sweep["work"].rglob("*")) == []  # the working dir: nothing of the run


@pytest.mark.slow
@pytest.mark.timeout(2400)  # the first test to run sets the run up
def test_restart_on_s3_reruns_no_finished_trial_and_hits_the_caches(s3_sweep):
    before, after = s3_sweep["before"], s3_sweep["after"]
    finished = [name for name, rows in before.items()
                if rows and rows[-1].get("stage_step") == rows[-1].get("stage_steps")]
    assert finished, before
    for name in finished:  # its training was not run again: no report appended
        assert after[name] == before[name]
    assert len(after) == 2 and set(finished) < set(after)
    # reference log-probs: computed by the first trial (8 pairs), only read by the second
    assert {row["reference_computed"] for rows in after.values() for row in rows} == {0, 8}
    cached, now = s3_sweep["cached"], s3_sweep["cache_now"]
    for kind in ("translations", "reference", "pairs", "eval"):  # none rewritten, none added
        old = {k: v for k, v in cached.items() if f"/cache/{kind}/" in k}
        new = {k: v for k, v in now.items() if f"/cache/{kind}/" in k}
        assert old and new == old, kind


@pytest.mark.slow
@pytest.mark.timeout(2400)  # the first test to run sets the run up
def test_planted_secrets_reach_ray_but_no_object_and_no_log(s3_sweep):
    """Results, report, checkpoints, Tune state, caches, the driver's output and Ray's own
    session logs (the runtime_env agent logs every runtime_env it builds, verbatim)."""
    secrets = {name: value.encode() for name, value in s3_sweep["secrets"].items()}
    # the env (secrets, endpoint, credentials) reaches Ray's workers, the Train workers too,
    # which get a worker_runtime_env of their own (so an absence below means something)
    assert s3_sweep["saw"]["workers"] > 0 and s3_sweep["saw"]["train_workers"] > 0
    client, leaked = s3_sweep["client"], []
    keys = sorted(objects(client))
    assert len(keys) > 20
    for key in keys:
        for text in texts_of(key, read(client, key)):
            leaked += [(name, key) for name, secret in secrets.items() if secret in text]
    ray_logs = [p for p in s3_sweep["ray_tmp"].rglob("logs/**/*") if p.is_file()]
    assert "runtime_env_agent.log" in {p.name for p in ray_logs}
    for path in [*s3_sweep["logs"].iterdir(), *ray_logs]:
        data = path.read_bytes()
        leaked += [(name, str(path)) for name, secret in secrets.items() if secret in data]
    assert not leaked


def test_credentials_in_storage_options_are_refused_naming_no_value():
    """A key in the spec would be saved in the run folder and Tune's state: refused."""
    from clo_ray.errors import SpecError
    from clo_ray.spec.schema import load_spec

    data = yaml.safe_load(SPEC.read_text())
    data["run"]["storage"] = f"s3://{BUCKET}/{PREFIX}"
    data["run"]["storage_options"] = {"region": "us-east-1", "secret": "s3cr3t-value",
                                      "session_token": "t0ken-value"}
    with pytest.raises(SpecError, match="AWS_SECRET_ACCESS_KEY") as err:
        load_spec(data)
    assert "['secret', 'session_token']" in str(err.value)
    assert "s3cr3t-value" not in str(err.value) and "t0ken-value" not in str(err.value)
    del data["run"]["storage_options"]["secret"], data["run"]["storage_options"]["session_token"]
    assert load_spec(data).run.storage_options == {"region": "us-east-1"}


@pytest.mark.slow
def test_report_cli_rebuilds_the_report_of_an_s3_run_folder(s3_sweep):
    """``python -m clo_ray.report s3://.../RUN``: results and the spec record read from the
    bucket, report.md written back there."""
    client, key = s3_sweep["client"], f"{PREFIX}/tiny/report.md"
    client.delete_object(Bucket=BUCKET, Key=key)
    done = subprocess.run([sys.executable, "-m", "clo_ray.report", f"s3://{BUCKET}/{PREFIX}/tiny"],
                          cwd=s3_sweep["work"], env=s3_sweep["env"], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"s3://{BUCKET}/{key}" in done.stdout.splitlines()
    text = read(client, key).decode("utf-8")
    assert text.startswith("# tiny\n")  # the title the recorded spec gives (run.name)
