"""One driver per run: a lease file in the run folder, renewed while the sweep runs.

Two drivers on one run (a re-submitted job while a retry still runs, a forgotten terminal)
would both write the same Tune experiment and spec record. So a sweep takes
``<run>/driver.lease`` before it claims the run and keeps it fresh from a background thread
(every ``ttl / 4``); a second driver finds it and stops at once, naming the holder (host,
pid, Ray job id when submitted as a job, since when, last renewal). A lease renewed more than
two periods ago is watched until it expires or is renewed (a RayJob retried on a new
cluster finds its dead predecessor's lease this way and waits at most ``ttl``). A lease not
renewed for ``ttl`` is expired (the driver was killed, its node lost) and the next driver
takes it, at once when the holder was a process on the same host that no longer exists (a
killed local sweep re-run at once); ``--takeover`` takes a live-looking one whose holder the
user knows is gone.

The file lives where the run does (local path, s3://, gs://), written atomically. Object
stores offer no compare-and-swap through pyarrow, so taking a lease is write-then-verify: a
driver writes its token, waits :data:`SETTLE_S`, reads the file back, and runs only if its
own token is still there; of two drivers starting in the same instant, the later writer wins
and the other stops. A holder that finds another token at a renewal has been taken over: it
stops the sweep with a SIGINT to itself (as Ctrl-C: Tune saves its experiment, finished work
is kept) rather than write beside the new one.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import Any

from clo_ray import storage
from clo_ray.errors import CloRayError
from clo_ray.layout import RunLayout
from clo_ray.ray_env import submitted_job_config

logger = logging.getLogger(__name__)

LEASE_FILE = "driver.lease"
DEFAULT_TTL_S = 120.0
SETTLE_S = 1.0


class RunBusy(CloRayError):
    """Another driver holds the run's lease."""


@dataclass(frozen=True)
class Holder:
    """Who holds a lease, and since when (seconds since the epoch)."""

    token: str
    host: str
    pid: int
    job_id: str | None
    since: float
    renewed: float
    ttl_s: float

    def describe(self) -> str:
        who = f"Ray job {self.job_id} on {self.host} (pid {self.pid})" if self.job_id \
            else f"pid {self.pid} on {self.host}"
        return f"{who}, since {_when(self.since)}, last renewed {_when(self.renewed)}"

    def expired(self, now: float) -> bool:
        return now - self.renewed > self.ttl_s

    def missed_beats(self, now: float) -> bool:
        """Not renewed for more than two renewal periods: probably gone, not yet expired."""
        return now - self.renewed > self.ttl_s / 2


class Lease:
    """The run's lease, held by this process until :meth:`release` (a context manager)."""

    def __init__(self, layout: RunLayout, *, ttl_s: float = DEFAULT_TTL_S,
                 takeover: bool = False) -> None:
        self.uri = storage.join(layout.uri, LEASE_FILE)
        self.options = layout.options
        self.ttl_s, self.takeover = ttl_s, takeover
        now = time.time()
        self.holder = Holder(uuid.uuid4().hex, socket.gethostname(), os.getpid(), _job_id(),
                             now, now, ttl_s)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost = False

    def acquire(self) -> Lease:
        """Take the lease or raise :class:`RunBusy` naming the holder; then renew it."""
        found = read_holder(self.uri, self.options)
        now, gone = time.time(), False
        if found is not None and found.token != self.holder.token:
            gone = found.host == self.holder.host and not _alive(found.pid)
            if not (found.expired(now) or gone or self.takeover) and (
                    found.missed_beats(now) or self._maybe_a_retry_of(found)):
                found = self._wait_for_expiry(found)  # a retried job: its old driver died
        if found is not None and found.token != self.holder.token:
            if not (found.expired(time.time()) or gone or self.takeover):
                raise RunBusy(
                    f"run {self.uri.rsplit('/', 2)[-2]!r} is being driven by {found.describe()}"
                    f" (lease {self.uri}): wait for it to finish, stop it, or, if that driver is "
                    f"gone, re-run with --takeover (an unrenewed lease expires after "
                    f"{found.ttl_s:g} s)")
            why = "expired" if found.expired(time.time()) else "its process is gone" if gone \
                else "--takeover"
            logger.warning("taking over the lease of %s (%s)", found.describe(), why)
        self._write()
        time.sleep(SETTLE_S)
        now_holder = read_holder(self.uri, self.options)
        if now_holder is None or now_holder.token != self.holder.token:
            other = now_holder.describe() if now_holder else "another driver"
            raise RunBusy(f"run lease {self.uri} was taken by {other} while this driver "
                          "started: it runs the sweep, this one stops")
        self._thread = threading.Thread(target=self._renew, name="clo-ray-lease", daemon=True)
        self._thread.start()
        return self

    def _maybe_a_retry_of(self, found: Holder) -> bool:
        """A Ray job finding a fresh lease of a Ray job on another host: a RayJob retried on
        a new cluster soon after its old head was lost looks exactly like this, so the lease is
        watched (a live holder renews it within ``ttl / 4`` and is then refused) rather than
        refused at once, which would spend one of the RayJob's retries."""
        return bool(self.holder.job_id and found.job_id and found.host != self.holder.host)

    def _wait_for_expiry(self, found: Holder) -> Holder | None:
        """Watch a lease that stopped being renewed until it expires (returned as is), is
        renewed after all or taken by another driver (the lease now, which the caller
        refuses), or is released (None: free)."""
        logger.warning("the run's lease of %s has not been renewed for %.0f s: waiting up to "
                       "%.0f s for it to expire (a live driver renews it every %.0f s and is "
                       "then refused)", found.describe(), time.time() - found.renewed,
                       found.renewed + found.ttl_s - time.time(), found.ttl_s / 4)
        while not found.expired(time.time()):
            time.sleep(min(5.0, max(found.renewed + found.ttl_s - time.time(), 0.0) + 0.1))
            now_found = read_holder(self.uri, self.options)
            if now_found is None or now_found.token != found.token or \
                    now_found.renewed != found.renewed:
                return now_found
        return found

    def release(self) -> None:
        """Stop renewing; delete the file if it is still ours."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        try:
            found = read_holder(self.uri, self.options)
            if found is not None and found.token == self.holder.token:
                filesystem, path = storage.resolve(self.uri, self.options)
                filesystem.delete_file(path)
        except OSError as err:  # the lease then expires by itself
            logger.warning("could not release the run's lease %s: %s", self.uri, err)

    def __enter__(self) -> Lease:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()

    def _write(self) -> None:
        data = json.dumps(asdict(self.holder), sort_keys=True).encode("utf-8")
        storage.write_bytes_atomic(self.uri, data, self.options)

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl_s / 4):
            try:
                found = read_holder(self.uri, self.options)
                if found is not None and found.token != self.holder.token:
                    self.lost = True
                    logger.error("the run's lease was taken over by %s: stopping this "
                                 "driver (finished work is kept)", found.describe())
                    # as Ctrl-C: Tune saves the experiment, the sweep exits as interrupted
                    os.kill(os.getpid(), signal.SIGINT)
                    return
                self.holder = Holder(**{**asdict(self.holder), "renewed": time.time()})
                self._write()
            except (OSError, CloRayError) as err:  # storage hiccup: try again next beat
                logger.warning("could not renew the run's lease %s: %s", self.uri, err)


def read_holder(uri: str, options: storage.StorageOptions = None) -> Holder | None:
    """The lease at ``uri``, or None when there is none (or it is unreadable: a half-written
    file cannot exist, writes are atomic, so garbage means no valid lease)."""
    if not storage.exists(uri, options):
        return None
    try:
        with storage.open_input(uri, options) as handle:
            return Holder(**json.loads(handle.read().decode("utf-8")))
    except (ValueError, TypeError, UnicodeDecodeError):
        logger.warning("ignoring an unreadable lease file %s", uri)
        return None


def _alive(pid: int) -> bool:
    """Whether a process ``pid`` exists on this host (a killed driver's does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def _job_id() -> str | None:
    """The Ray job submission id when this driver runs as ``ray job submit``'s entrypoint."""
    job = submitted_job_config() or {}
    return (job.get("metadata") or {}).get("job_submission_id")


def _when(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
