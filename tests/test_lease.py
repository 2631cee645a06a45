"""One driver per run: the lease in the run folder (clo_ray.sweep.lease). Two drivers, an
expired lease, a takeover, and the sweep CLI refusing a run another driver holds."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from clo_ray.layout import RunLayout
from clo_ray.sweep.lease import LEASE_FILE, Lease, RunBusy, read_holder

ROOT = Path(__file__).resolve().parents[1]
SPEC = ROOT / "tests" / "specs" / "tiny_sweep.yaml"

HOLD = """
import sys, time
from clo_ray.layout import RunLayout
from clo_ray.sweep.lease import Lease
lease = Lease(RunLayout(sys.argv[1], "tiny"), ttl_s=float(sys.argv[2])).acquire()
print("held", flush=True)
time.sleep(60)
"""


def hold_in_another_process(storage: Path, ttl: float) -> subprocess.Popen:
    """A second driver: holds the run's lease (renewing it) until killed."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(storage), str(ttl)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_driver_is_refused_naming_the_holder_until_the_first_releases(tmp_path):
    layout = RunLayout(str(tmp_path), "tiny")
    first = Lease(layout, ttl_s=30).acquire()
    with pytest.raises(RunBusy) as busy:
        Lease(layout, ttl_s=30).acquire()
    text = str(busy.value)
    assert f"pid {os.getpid()} on " in text and "since 20" in text and "--takeover" in text
    first.release()
    assert not (tmp_path / "tiny" / LEASE_FILE).exists()
    with Lease(layout, ttl_s=30):  # free again
        assert read_holder(str(tmp_path / "tiny" / LEASE_FILE)) is not None


def test_the_holder_renews_its_lease(tmp_path):
    layout = RunLayout(str(tmp_path), "tiny")
    uri = str(tmp_path / "tiny" / LEASE_FILE)
    with Lease(layout, ttl_s=0.8) as lease:  # renewed every 0.2 s
        first = read_holder(uri)
        time.sleep(0.7)
        later = read_holder(uri)
        assert first is not None and later is not None
        assert later.token == lease.holder.token and later.renewed > first.renewed


def test_an_expired_lease_is_taken(tmp_path, caplog):
    layout = RunLayout(str(tmp_path), "tiny")
    path = tmp_path / "tiny" / LEASE_FILE
    path.parent.mkdir(parents=True)
    gone = {"token": "x", "host": "lost-node", "pid": 1, "job_id": "raysubmit_1",
            "since": time.time() - 900, "renewed": time.time() - 600, "ttl_s": 120.0}
    path.write_text(json.dumps(gone))
    with Lease(layout, ttl_s=30) as lease:
        assert read_holder(str(path)).token == lease.holder.token
    assert "Ray job raysubmit_1 on lost-node (pid 1)" in caplog.text and "expired" in caplog.text


def test_a_killed_local_driver_leaves_no_live_lease(tmp_path, caplog):
    holder = hold_in_another_process(tmp_path, ttl=60.0)
    holder.kill()
    holder.wait()
    with Lease(RunLayout(str(tmp_path), "tiny"), ttl_s=30):
        pass
    assert f"pid {holder.pid} on " in caplog.text and "its process is gone" in caplog.text


def test_a_lease_that_missed_its_beats_is_waited_out(tmp_path, caplog):
    """A retried job on a new cluster: its predecessor's lease (another host) stopped being
    renewed a while ago; the new driver waits for it to expire instead of failing."""
    layout = RunLayout(str(tmp_path), "tiny")
    path = tmp_path / "tiny" / LEASE_FILE
    path.parent.mkdir(parents=True)
    renewed = time.time() - 1.5  # ttl 2 s: missed its beats, expires in 0.5 s
    path.write_text(json.dumps({"token": "x", "host": "old-head", "pid": 7, "job_id": None,
                                "since": renewed - 60, "renewed": renewed, "ttl_s": 2.0}))
    started = time.perf_counter()
    with Lease(layout, ttl_s=30) as lease:
        assert read_holder(str(path)).token == lease.holder.token
    assert 0.4 < time.perf_counter() - started < 10
    assert "has not been renewed" in caplog.text and "expired" in caplog.text


def test_a_lease_released_while_waited_on_is_taken(tmp_path):
    import threading

    layout = RunLayout(str(tmp_path), "tiny")
    path = tmp_path / "tiny" / LEASE_FILE
    path.parent.mkdir(parents=True)
    renewed = time.time() - 40  # ttl 60 s: missed its beats, 20 s from expiry
    path.write_text(json.dumps({"token": "x", "host": "old-head", "pid": 7, "job_id": None,
                                "since": renewed, "renewed": renewed, "ttl_s": 60.0}))
    threading.Timer(0.5, path.unlink).start()  # its driver ends cleanly meanwhile
    started = time.perf_counter()
    with Lease(layout, ttl_s=30) as lease:
        assert read_holder(str(path)).token == lease.holder.token
    assert time.perf_counter() - started < 10  # the next look (<= 5 s) finds it free


def test_takeover_stops_the_old_holder(tmp_path):
    holder = hold_in_another_process(tmp_path, ttl=6.0)  # a loaded box may delay a renewal
    try:
        layout = RunLayout(str(tmp_path), "tiny")
        with pytest.raises(RunBusy, match=rf"pid {holder.pid} on "):
            Lease(layout, ttl_s=30).acquire()
        with Lease(layout, ttl_s=30, takeover=True):
            _, err = holder.communicate(timeout=20)  # its next renewal sees our token
        assert holder.returncode != 0
        assert "taken over by pid" in err and "KeyboardInterrupt" in err  # as Ctrl-C
    finally:
        holder.kill()


def test_the_sweep_refuses_a_run_another_driver_holds(tmp_path):
    data = yaml.safe_load(SPEC.read_text())
    data["run"]["storage"] = str(tmp_path / "runs")
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(data))
    holder = hold_in_another_process(tmp_path / "runs", ttl=60.0)
    try:
        started = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "clo_ray.sweep", str(spec)], cwd=tmp_path,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 2, done.stderr[-2000:]
        assert f"is being driven by pid {holder.pid} on " in done.stderr
        assert time.perf_counter() - started < 60  # before Ray, translation or training
        assert not (tmp_path / "runs" / "tiny" / "spec.yaml").exists()  # nothing claimed
    finally:
        holder.kill()
        holder.wait()


def test_a_job_finding_a_fresh_lease_of_a_job_elsewhere_watches_it(tmp_path, monkeypatch, caplog):
    """A RayJob retried on a new cluster seconds after its head was lost: the old driver's
    lease is still fresh. The new driver watches it instead of failing the retry, takes it
    when it expires, and is refused if it is renewed (a live driver on another cluster)."""
    import clo_ray.sweep.lease as lease_module

    monkeypatch.setattr(lease_module, "_job_id", lambda: "raysubmit_retry")
    layout = RunLayout(str(tmp_path), "tiny")
    path = tmp_path / "tiny" / LEASE_FILE
    path.parent.mkdir(parents=True)

    def write(renewed: float) -> None:
        path.write_text(json.dumps({"token": "x", "host": "old-head", "pid": 7,
                                    "job_id": "raysubmit_first", "since": renewed - 60,
                                    "renewed": renewed, "ttl_s": 2.0}))

    write(time.time())  # renewed just now, expires in 2 s
    started = time.perf_counter()
    with Lease(layout, ttl_s=30) as lease:
        assert read_holder(str(path)).token == lease.holder.token
    assert 1.5 < time.perf_counter() - started < 10 and "waiting up to" in caplog.text

    import threading

    write(time.time())
    threading.Timer(0.5, lambda: write(time.time())).start()  # the holder is alive after all
    with pytest.raises(RunBusy, match="Ray job raysubmit_first on old-head"):
        Lease(layout, ttl_s=30).acquire()
    monkeypatch.setattr(lease_module, "_job_id", lambda: None)  # a plain driver: refused at once
    write(time.time())
    started = time.perf_counter()
    with pytest.raises(RunBusy):
        Lease(layout, ttl_s=30).acquire()
    assert time.perf_counter() - started < 1
