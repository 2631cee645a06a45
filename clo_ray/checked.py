"""Cache files that check themselves: written with their size and checksum, read back verified.

Atomic writes (:mod:`clo_ray.storage`) stop a crash from leaving half a file, but not a disk,
a copy tool or a person from truncating or damaging one later; without a check, a damaged
reference shard or pairs file fails every trial that reads it with a raw pyarrow error, run
after run. Each checked file ``NAME`` gets a hidden sidecar ``.NAME.check.json`` with
``{"size", "sha256"}`` (hidden: Arrow and Ray Data dataset readers skip dot files). A read
compares the bytes with the sidecar and parses them; a file that fails either raises
:class:`CorruptFileError` naming it. The cache that owns the file then moves it aside
(:func:`set_aside`, kept for a post-mortem) and recomputes it, or, where it cannot, stops with
the error and the command that rebuilds it.

A file without a sidecar (written before checks existed, or a crash between the two writes)
is accepted when it parses.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import posixpath
import time
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from clo_ray import storage
from clo_ray.errors import StorageError

logger = logging.getLogger(__name__)


class CorruptFileError(StorageError):
    """A stored file is truncated, damaged, or does not match its recorded checksum."""

    def __init__(self, uri: str, reason: str, fix: str = "") -> None:
        super().__init__(f"{uri} is damaged ({reason})" + (f"; {fix}" if fix else ""))
        self.uri, self.reason = uri, reason


def check_uri(uri: str) -> str:
    """Where ``uri``'s size and checksum are kept."""
    parent, name = posixpath.split(uri) if "://" in uri else os.path.split(uri)
    return storage.join(parent, f".{name}.check.json")


def write_bytes(uri: str, data: bytes, options: storage.StorageOptions = None) -> None:
    """Write ``data`` atomically, then its size and checksum."""
    storage.write_bytes_atomic(uri, data, options)
    record = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    storage.write_bytes_atomic(check_uri(uri), json.dumps(record).encode(), options)


def write_parquet(uri: str, table: pa.Table, options: storage.StorageOptions = None) -> None:
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    write_bytes(uri, buffer.getvalue(), options)


def write_json(uri: str, data: Any, options: storage.StorageOptions = None) -> None:
    write_bytes(uri, json.dumps(data, indent=2, ensure_ascii=False).encode("utf-8"), options)


def read_bytes(uri: str, options: storage.StorageOptions = None) -> bytes:
    """The bytes at ``uri``, verified against its sidecar when it has one."""
    with storage.open_input(uri, options) as handle:
        data = handle.read()
    sidecar = check_uri(uri)
    if not storage.exists(sidecar, options):
        return data
    try:
        with storage.open_input(sidecar, options) as handle:
            record = json.loads(handle.read().decode("utf-8"))
        size, digest = int(record["size"]), str(record["sha256"])
    except (ValueError, KeyError, TypeError):
        return data  # a damaged sidecar says nothing about the file: parsing decides
    if len(data) != size:
        raise CorruptFileError(uri, f"{len(data)} bytes, written as {size}")
    if hashlib.sha256(data).hexdigest() != digest:
        raise CorruptFileError(uri, "its checksum differs from the one written with it")
    return data


def check_size(uri: str, options: storage.StorageOptions = None) -> None:
    """Raise CorruptFileError when ``uri`` is missing or its size differs from the recorded
    one: a cheap look (no read) for large files that are checksummed when read."""
    fs, path = storage.resolve(uri, options)
    info = fs.get_file_info(path)
    if info.type != pafs.FileType.File:
        raise CorruptFileError(uri, "missing")
    sidecar = check_uri(uri)
    if not storage.exists(sidecar, options):
        return
    try:
        with storage.open_input(sidecar, options) as handle:
            size = int(json.loads(handle.read().decode("utf-8"))["size"])
    except (ValueError, KeyError, TypeError):
        return
    if info.size != size:
        raise CorruptFileError(uri, f"{info.size} bytes, written as {size}")


def read_parquet(uri: str, options: storage.StorageOptions = None, *, fix: str = "") -> pa.Table:
    """The verified table at ``uri``; ``fix``: what the error tells a user to do (for files
    whose reader cannot recompute them itself)."""
    try:
        data = read_bytes(uri, options)
        try:
            return pq.read_table(pa.BufferReader(data))
        except (pa.ArrowException, OSError, ValueError) as exc:
            raise CorruptFileError(uri, f"not readable as parquet: {exc}") from None
    except CorruptFileError as bad:
        if not fix:
            raise
        raise CorruptFileError(uri, bad.reason, fix) from None


def read_json(uri: str, options: storage.StorageOptions = None) -> Any:
    data = read_bytes(uri, options)
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise CorruptFileError(uri, f"not readable as JSON: {exc}") from None


def set_aside(uri: str, options: storage.StorageOptions = None) -> str:
    """Move a damaged file to ``<uri>.corrupt-<UTC time>`` (out of every reader's way, kept
    for a look) and drop its sidecar; returns the new name."""
    target = f"{uri}.corrupt-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"
    fs, path = storage.resolve(uri, options)
    _, new_path = storage.resolve(target, options)
    fs.move(path, new_path)
    sidecar_fs, sidecar = storage.resolve(check_uri(uri), options)
    try:
        sidecar_fs.delete_file(sidecar)
    except OSError:
        pass
    logger.warning("%s is damaged: moved to %s; it is computed again", uri, target)
    return target


def write_fingerprinted(uri: str, fingerprint: str, result: Any,
                        options: storage.StorageOptions = None) -> None:
    """A ``{"fingerprint", "result"}`` JSON cache record (evaluation, lm-eval caches)."""
    write_bytes(uri, json.dumps({"fingerprint": fingerprint, "result": result},
                                sort_keys=True, ensure_ascii=False).encode("utf-8"), options)


def read_fingerprinted(uri: str, fingerprint: str,
                       options: storage.StorageOptions = None) -> Any | None:
    """The ``result`` of a record written by :func:`write_fingerprinted`; None when it is
    missing, damaged (then moved aside) or was made from other inputs: the caller recomputes."""
    if not storage.exists(uri, options):
        return None
    try:
        record = read_json(uri, options)
        if not isinstance(record, dict) or "result" not in record:
            raise CorruptFileError(uri, "not a cache record")
    except CorruptFileError:
        set_aside(uri, options)
        return None
    if record.get("fingerprint") != fingerprint:
        logger.warning("cache %s was made with other inputs: recomputing", uri)
        return None
    return record["result"]
