"""Faults, injected for real: a node of a multi-node cluster removed mid-trial, a translator
actor's process dying mid-batch, and storage that cannot take a write (a full disk).

Nothing is mocked: the node's processes are killed by ``ray.cluster_utils.Cluster``, the
actor calls ``os._exit``, and a "full disk" is the kernel refusing writes past
``RLIMIT_FSIZE`` (EFBIG) in a child process; running as root, ``chmod`` would not stop a
write, but that limit does. Each test then reads what landed in storage.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import sample_translations

from clo_ray.translate.backends import ParallelTranslator, _Translator

TESTS = Path(__file__).resolve().parent
NODE_SPEC = TESTS / "specs" / "faults_node.yaml"
STEPS = 40  # faults_node.yaml's schedule


def pid_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"  # a zombie has exited; its parent has not reaped it yet


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def parquet_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob("*.parquet") if not p.name.startswith("."))


def hidden_files(folder: Path) -> list[Path]:
    """Temp files of the atomic writes (".<name>.tmp-<hex>"): none may outlive a failure."""
    return [p for p in folder.rglob(".*") if p.is_file() and ".tmp-" in p.name]


# ---------------------------------------------------------------- 1. a node removed mid-trial


def _remove_the_train_node(cluster: Any, trials: Path, sweep: subprocess.Popen,
                           removed: dict[str, Any], timeout: float = 600) -> None:
    """Once the trial has a registered checkpoint, remove (SIGKILL) the node hosting its
    train worker, found through Ray's state API; ``removed`` says what was done."""
    from ray.util.state import list_actors

    deadline = time.time() + timeout
    while time.time() < deadline and sweep.poll() is None:
        rows = [json.loads(line) for path in trials.glob("*/history.jsonl")
                for line in path.read_text().splitlines() if line]
        if any(row["checkpoint"] for row in rows):
            workers = list_actors(address=cluster.gcs_address, detail=True,
                                  filters=[("class_name", "=", "RayTrainWorker"),
                                           ("state", "=", "ALIVE")])
            nodes = [n for n in cluster.worker_nodes if n.node_id == workers[0].node_id] \
                if workers else []
            if nodes:
                removed.update(node_id=nodes[0].node_id, step=rows[-1]["step"],
                               worker_pid=workers[0].pid)
                cluster.remove_node(nodes[0], allow_graceful=False)
                return
            removed["error"] = f"train worker not on a worker node: {workers}"
            return
        time.sleep(0.2)
    removed["error"] = "the trial never registered a checkpoint"


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_a_removed_node_retries_the_trial_on_the_nodes_left(tmp_path):
    from ray.cluster_utils import Cluster
    from ray.util.state import list_actors

    spec = yaml.safe_load(NODE_SPEC.read_text())
    spec["run"]["storage"] = str(tmp_path / "runs")
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(spec))
    run_dir = tmp_path / "runs" / spec["run"]["name"]

    # the head holds the trial (on_demand); each worker node fits one train worker. The
    # state API needs the dashboard: on a free port (other Rays may hold 8265 on this box)
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "resources": {"on_demand": 1}, "dashboard_port": free_port()})
    log = open(tmp_path / "sweep.log", "w")
    sweep = None
    try:
        for _ in range(2):
            cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        sweep = subprocess.Popen(  # the driver, as `ray job submit` runs it: RAY_ADDRESS set
            [sys.executable, "-m", "clo_ray.sweep", str(spec_path)], cwd=tmp_path,
            env={**os.environ, "RAY_ADDRESS": cluster.address}, stdout=log,
            stderr=subprocess.STDOUT, start_new_session=True)
        removed: dict[str, Any] = {}
        _remove_the_train_node(cluster, run_dir / "trials", sweep, removed)
        assert "error" not in removed, removed
        returncode = sweep.wait(timeout=900)
        output = (tmp_path / "sweep.log").read_text()
        assert returncode == 0, output[-4000:]
        workers = list_actors(address=cluster.gcs_address, detail=True,
                              filters=[("class_name", "=", "RayTrainWorker")])
    finally:
        if sweep is not None and sweep.poll() is None:
            os.killpg(sweep.pid, signal.SIGKILL)
            sweep.wait()
        log.close()
        cluster.shutdown()

    assert not pid_alive(removed["worker_pid"])  # the worker really died with its node
    # the retry ran on a node that was left; the removed node hosted only the first worker
    nodes = Counter(w.node_id for w in workers)
    assert nodes[removed["node_id"]] == 1 and len(workers) >= 2, workers

    # the trial resumed from its last checkpoint before the removal and finished
    history = [json.loads(line) for path in (run_dir / "trials").glob("*/history.jsonl")
               for line in path.read_text().splitlines()]
    resumed = [row for row in history if row["resumed_from_step"]]
    assert resumed, f"no report after a restart (node removed at step {removed['step']})"
    start = resumed[0]["resumed_from_step"]
    assert start % 5 == 0 and 0 < start < STEPS  # checkpoint_every: 5
    assert [row["step"] for row in resumed] == list(range(start + 1, STEPS + 1))

    # the sweep finished with a result for its one trial (and the base model's row)
    results = pq.read_table(run_dir / "results.parquet").to_pylist()
    trials = [row for row in results if row["method"] != "base"]
    assert [row["status"] for row in trials] == ["completed"]
    assert trials[0]["target_nll"] > 0 and 0 <= trials[0]["target_fidelity"] <= 1
    assert (run_dir / "report.md").exists()


# ---------------------------------------------------------------- Ray for tests 2 and 3


@pytest.fixture(scope="module")
def ray_local():
    """A local Ray whose workers can import this module (the crashing translator)."""
    import ray

    path = os.pathsep.join(p for p in (str(TESTS), os.environ.get("PYTHONPATH")) if p)
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level=logging.WARNING,
             runtime_env={"env_vars": {"PYTHONPATH": path}})
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


def translate_spec(storage: Path, languages: list[str], **translator: Any) -> dict[str, Any]:
    return {"run": {"name": "faults", "storage": str(storage)},
            "corpus": {"path": "builtin:parallel-sample"},
            "translator": {"backend": "parallel", **translator}, "languages": languages,
            "models": [{"name": "builtin:tiny-llama"}], "methods": ["clo"], "budgets": [8]}


def raw_part_ids(cache: Path) -> Counter[str]:
    """Every id in every part file, read file by file (no de-duplication)."""
    return Counter(row_id for part in parquet_files(cache / "parts")
                   for row_id in pq.read_table(part).column("id").to_pylist())


# ---------------------------------------------------------------- 2. an actor dies mid-batch


class CrashOnceTranslator(ParallelTranslator):
    """The parallel backend whose process dies (``os._exit``: no cleanup, no exception)
    halfway through its third batch; a marker file beside the call log makes that happen
    once, so the actor Ray restarts goes on. The marker holds the dead process's pid."""

    def __init__(self, *, translator: Any, decoding: Any, **kwargs: Any) -> None:
        super().__init__(path=translator.path, **kwargs)
        self.batches = 0

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        self.batches += 1
        if self.batches == 3 and self.call_log:
            try:
                fd = os.open(f"{self.call_log}.crashed", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                return super().__call__(batch)
            half = {k: batch[k][:len(batch["job"]) // 2] for k in ("id", "field", "text")}
            keys = [(str(i), str(f)) for i, f in zip(half["id"], half["field"], strict=True)]
            self.translate([str(t) for t in half["text"]], keys, str(batch["language"][0]))
            os.write(fd, str(os.getpid()).encode())
            os.close(fd)
            os._exit(1)
        return super().__call__(batch)


@pytest.mark.timeout(600)
def test_a_translator_killed_mid_batch_loses_and_duplicates_no_row(ray_local, tmp_path):
    from clo_ray.data.corpus import load_corpus
    from clo_ray.spec.schema import load_spec
    from clo_ray.translate.cache import read_table
    from clo_ray.translate.stage import translate_corpus

    spec = load_spec(translate_spec(tmp_path / "store", ["sw", "zh"], batch_size=4))
    corpus = load_corpus("builtin:parallel-sample", max_rows=24)
    ids = corpus.table.column("id").to_pylist()
    log = tmp_path / "calls.jsonl"
    results = translate_corpus(spec, corpus=corpus, part_rows=4, call_log=str(log),
                               actor=CrashOnceTranslator)

    dead = int(Path(f"{log}.crashed").read_text())
    assert not pid_alive(dead)
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    by_pid = Counter(call["pid"] for call in calls)
    assert by_pid[dead] == 2 and len(by_pid) == 2  # 2 batches, then a restarted process
    assert sum(call["segments"] for call in calls) == 2 * 2 * len(ids)  # each job once
    for lang, result in results.items():
        assert raw_part_ids(Path(result.uri)) == Counter(ids)  # every row once, none lost
        table = read_table(result.translations)
        assert table.column("id").to_pylist() == ids
        assert table.to_pylist() == sample_translations(lang, len(ids)).to_pylist()
        manifest = json.loads((Path(result.uri) / "manifest.json").read_text())
        assert manifest["rows"] == manifest["accepted"] == len(ids)


# ------------------------------------------------- 2b. a translator that drops the last sentence


class DropsLastSentenceTranslator(_Translator):
    """The seq2seq failure (fairseq #5108, #4167; CTranslate2 #1040) on demand: Swahili from
    the bundled sample sentence by sentence (its Swahili texts have as many sentences as the
    English ones), and every input of two or more sentences silently ends one sentence early:
    fluent, in the right language, no error."""

    backend = "seq2seq"

    def __init__(self, *, translator: Any, decoding: Any, languages: list[str],
                 storage_options: Any = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.sentences: dict[str, str] = {}
        for row in sample_rows():
            for field in ("prompt", "response"):
                en, sw = (sentences(row["text"][lang][field]) for lang in ("en", "sw"))
                self.sentences.update(zip(en, sw, strict=True))

    def translate(self, texts: list[str], keys: list[tuple[str, str]],
                  target: str) -> tuple[list[str], list[int]]:
        said = [[self.sentences[s] for s in sentences(text)] for text in texts]
        return [" ".join(s[:-1] if len(s) >= 2 else s) for s in said], [0] * len(texts)


def sentences(text: str) -> list[str]:
    from clo_ray.translate.segment import segment

    return [s.text.strip() for s in segment(text, 1) if s.translate]


def sample_rows() -> list[dict[str, Any]]:
    from clo_ray.assets import parallel_sample_path

    return [json.loads(line) for line in parallel_sample_path().read_text().splitlines()]


@pytest.mark.parametrize("policy", ["retry", "drop"])
def test_a_dropped_last_sentence_is_caught_and_translated_again_by_sentence(
        ray_local, tmp_path, policy):
    from clo_ray.data.corpus import content_id, load_corpus
    from clo_ray.spec.schema import load_spec
    from clo_ray.translate.cache import read_table
    from clo_ray.translate.segment import segment
    from clo_ray.translate.stage import translate_corpus

    rows = 40
    spec = load_spec(translate_spec(tmp_path / "store", ["sw"], backend="seq2seq",
                                    model="builtin:tiny-m2m100", quality={"policy": policy}))
    corpus = load_corpus("builtin:parallel-sample", max_rows=rows)
    result = translate_corpus(spec, corpus=corpus, part_rows=8,
                              actor=DropsLastSentenceTranslator)["sw"]
    parts = pa.concat_tables(pq.read_table(p)
                             for p in parquet_files(Path(result.uri) / "parts"))
    first = [r for r in parts.to_pylist() if r["pass"] != "retry"]
    # affected: a row with a segment of two or more sentences (the translator cut it short)
    affected = {content_id(r["text"]["en"]["prompt"], r["text"]["en"]["response"])
                for r in sample_rows()[:rows] if any(
                    len(sentences(s.text)) >= 2 for f in ("prompt", "response")
                    for s in segment(r["text"]["en"][f]) if s.translate)}
    caught = {r["id"] for r in first if "dropped_sentence" in r["reasons"]}
    assert len(affected) >= rows // 2 and len(caught & affected) >= 0.95 * len(affected)
    assert caught <= affected  # no row flagged that lost nothing
    rejects = read_table(result.rejects).to_pylist()
    # besides: a few rows the sample itself translated with localised units ("sentimita 15"
    # for "15 cm"), which the protected-span check refuses however they are translated
    localised = {r["id"] for r in rejects if r["reasons"] == ["protected_lost"]}
    assert len(localised) <= 3
    if policy == "drop":  # rejected, with the reason in the rejects table
        assert caught <= {r["id"] for r in rejects} <= caught | localised
    else:  # retried one sentence per segment: nothing left to drop, every row whole again
        assert result.retried >= len(caught)
        assert {r["id"] for r in rejects} == localised  # none lost a sentence
    table = read_table(result.translations).to_pylist()
    assert len(table) == result.accepted == rows - len(rejects)
    sample = {r["id"]: r for r in sample_translations("sw", rows).to_pylist()}
    assert table == [sample[r["id"]] for r in table]  # the sample's texts, whole


# ---------------------------------------------------------------- 3. a full disk

# A child that cannot write files past `limit` bytes (EFBIG; SIGXFSZ ignored, so the write
# fails instead of the process dying), then runs `body`; it reports one "RESULT <json>" line.
_LIMITED = """
import json, resource, signal, sys, traceback
def limit_writes(limit):
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
def outcome(exc):
    from clo_ray.errors import StorageError
    return {"type": type(exc).__name__, "storage_error": isinstance(exc, StorageError),
            "os_error": isinstance(exc, OSError), "errno": getattr(exc, "errno", None),
            "message": str(exc),
            "where": traceback.format_exception(exc)[-4:-1]}  # for the assertion messages
def report(result):
    print("RESULT " + json.dumps(result), flush=True)
"""


def run_limited(body: str, *args: str, env: dict[str, str] | None = None
                ) -> tuple[int, Any]:
    code = _LIMITED + textwrap.dedent(body)
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True,
                          text=True, timeout=300, env={**os.environ, **(env or {})})
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, done.stdout[-2000:] + done.stderr[-3000:]
    return done.returncode, json.loads(lines[-1].removeprefix("RESULT "))


@pytest.mark.timeout(300)
def test_a_full_disk_fails_atomic_writes_clearly_and_leaves_nothing(tmp_path):
    (tmp_path / "old.bin").write_bytes(b"version 1")
    code, outcomes = run_limited("""
        import pyarrow as pa
        from clo_ray import storage
        out, folder = {}, sys.argv[1]
        limit_writes(64 * 1024)
        storage.write_bytes_atomic(f"{folder}/small.bin", b"fits")  # the limit lets it through
        big = bytes(200 * 1024)
        table = pa.table({"text": [str(i) * 400 for i in range(2000)]})
        for name, write in (("blob.bin", lambda uri: storage.write_bytes_atomic(uri, big)),
                            ("old.bin", lambda uri: storage.write_bytes_atomic(uri, big)),
                            ("table.parquet",
                             lambda uri: storage.write_parquet_atomic(uri, table))):
            try:
                write(f"{folder}/{name}")
            except BaseException as exc:
                out[name] = outcome(exc)
        report(out)
        """, str(tmp_path))
    assert code == 0
    assert sorted(outcomes) == ["blob.bin", "old.bin", "table.parquet"]  # all three failed
    for name, got in outcomes.items():
        assert got["type"] == "StorageWriteError" and got["storage_error"] and got["os_error"]
        assert got["errno"] == 27  # EFBIG: what a file-size limit gives (ENOSPC on a full disk)
        assert got["message"].startswith(f"cannot write {tmp_path / name}: the file is larger")
    # no partial file under a final name, no temp file; the earlier version is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.bin", "small.bin"]
    assert (tmp_path / "old.bin").read_bytes() == b"version 1"
    assert (tmp_path / "small.bin").read_bytes() == b"fits"


def _part_and_full_sizes(rows: int, part_rows: int) -> tuple[int, int]:
    """Parquet bytes of the largest part the translate stage writes and of its full output."""
    from clo_ray.translate.cache import OUTPUT_SCHEMA, PART_SCHEMA

    table = sample_translations("sw", rows).cast(OUTPUT_SCHEMA)
    part = table.append_column("pass", pa.array(["first"] * rows)).cast(PART_SCHEMA)

    def size(t: pa.Table) -> int:
        sink = pa.BufferOutputStream()
        pq.write_table(t, sink)
        return sink.getvalue().size

    return (max(size(part.slice(i, part_rows)) for i in range(0, rows, part_rows)),
            size(table))


@pytest.mark.timeout(600)
def test_a_full_disk_in_the_translate_stage_leaves_no_complete_looking_cache(ray_local,
                                                                           tmp_path):
    """Parts fit under the limit, the whole translations file does not: the stage fails
    naming that file, no manifest says "done", and a re-run finishes from the parts."""
    from clo_ray.data.corpus import load_corpus
    from clo_ray.spec.schema import load_spec
    from clo_ray.translate.cache import read_table
    from clo_ray.translate.stage import translate_corpus

    rows, part_rows = 40, 4
    part, full = _part_and_full_sizes(rows, part_rows)
    limit = int((part * full) ** 0.5)
    assert 1.3 * part < limit < full / 1.3, (part, full)
    data = translate_spec(tmp_path / "store", ["sw"])
    code, got = run_limited("""
        import ray
        from clo_ray.data.corpus import load_corpus
        from clo_ray.translate.quality import QualityConfig, check_translation
        from clo_ray.translate.stage import translate_corpus
        from clo_ray.spec.schema import load_spec
        spec = load_spec(json.loads(sys.argv[2]))
        corpus = load_corpus("builtin:parallel-sample", max_rows=int(sys.argv[4]))
        ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False)
        # py3langid unpacks its model into a temp file at first use: done before the limit
        # (the disk fills up later), so what fails is a write of ours
        check_translation("Good morning, my friend. Today is a very good day for a walk.",
                          "Habari za asubuhi, rafiki yangu. Leo ni siku nzuri sana ya kutembea.",
                          "sw", QualityConfig.from_section(spec.translator.quality))
        limit_writes(int(sys.argv[3]))  # after ray.init: only this driver is limited
        try:
            translate_corpus(spec, corpus=corpus, part_rows=int(sys.argv[5]))
            report({"type": None})
        except BaseException as exc:
            report(outcome(exc))
        """, ray_local, json.dumps(data), str(limit), str(rows), str(part_rows),
        # The driver's Ray Data logs DEBUG lines to a per-dataset file; past the limit that
        # file's close() raises EFBIG out of iter_batches (Ray's own log hitting the full
        # disk). Warnings only keep it small, so what fills up is the cache.
        env={"RAY_DATA_LOG_LEVEL": "WARNING"})

    (cache,) = (tmp_path / "store" / "cache" / "translations").iterdir()
    assert code == 0 and got["type"] == "StorageWriteError" and got["storage_error"], \
        json.dumps(got, indent=1)
    assert got["message"].startswith(f"cannot write {cache / 'translations.parquet'}")
    assert not (cache / "manifest.json").exists()  # nothing says "complete"
    assert not (cache / "translations.parquet").exists() and not hidden_files(cache)
    corpus = load_corpus("builtin:parallel-sample", max_rows=rows)
    ids = corpus.table.column("id").to_pylist()
    assert raw_part_ids(cache) == Counter(ids)  # the finished rows were kept

    log = tmp_path / "calls.jsonl"
    result = translate_corpus(load_spec(data), corpus=corpus, call_log=str(log))["sw"]
    assert result.translated == 0 and not log.exists()  # nothing translated again
    assert read_table(result.translations).column("id").to_pylist() == ids
    assert json.loads((cache / "manifest.json").read_text())["rows"] == rows
