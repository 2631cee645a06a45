"""Storage paths for every stage: local paths, ``s3://`` and ``gs://`` through ``pyarrow.fs``.

Each stage reads its inputs and writes its outputs through these few helpers, so any stage can
be re-run alone against a laptop folder or a bucket, and a crashed stage never leaves a
half-written file that a later run would mistake for a finished one (writes are atomic).
"""

from __future__ import annotations

import contextlib
import errno
import os
import posixpath
import uuid
from collections.abc import Callable
from typing import Any, BinaryIO
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from clo_ray.errors import StorageError, StorageWriteError

StorageOptions = dict[str, Any] | None

SUPPORTED = "a local path, s3://bucket/key or gs://bucket/key"
_OBJECT_STORE_SCHEMES = ("s3", "gs")
# fsspec / s3fs spellings users bring from Ray Data and Hugging Face -> pyarrow's names.
_S3_ALIASES = {
    "endpoint_url": "endpoint_override",
    "key": "access_key",
    "secret": "secret_key",
    "token": "session_token",
    "region_name": "region",
}
# Options that carry a credential (pyarrow's names and the aliases above). The spec is written
# into the run folder and travels in Tune's experiment state, so these must come from the
# environment (AWS SDK chain, GCS service account), never from run.storage_options.
CREDENTIAL_OPTIONS = frozenset({"access_key", "secret_key", "session_token", "access_token",
                                "key", "secret", "token"})
# The AWS SDK's credential variables: every Ray process of a node inherits them from its
# raylet (or the job's runtime_env), nothing of ours copies them anywhere (see
# clo_ray.ray_env.keep_credentials_out_of_ray_logs).
CREDENTIAL_ENV_VARS = frozenset({"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                 "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN"})


def _scheme(uri: str) -> str:
    """URI scheme, or "" for a local path (a one-letter scheme is a Windows drive letter)."""
    scheme = urlparse(uri).scheme.lower()
    return "" if len(scheme) <= 1 else scheme


def _s3_options(storage_options: StorageOptions) -> dict[str, Any]:
    """Keyword arguments for S3FileSystem: aliases renamed, endpoint taken from the AWS env.

    Credentials and region also come from the standard AWS variables (AWS_ACCESS_KEY_ID,
    AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, AWS_DEFAULT_REGION) through the AWS SDK's
    default chain when not given here; the endpoint variables are read here so that MinIO,
    Ceph or a test server work without code changes.
    """
    opts = {_S3_ALIASES.get(k, k): v for k, v in (storage_options or {}).items()}
    endpoint = opts.get("endpoint_override") or os.environ.get(
        "AWS_ENDPOINT_URL_S3", os.environ.get("AWS_ENDPOINT_URL")
    )
    if endpoint:
        # pyarrow wants "host:port" plus a separate scheme.
        parsed = urlparse(endpoint)
        if parsed.scheme and parsed.netloc:
            opts.setdefault("scheme", parsed.scheme)
            endpoint = parsed.netloc + parsed.path.rstrip("/")
        opts["endpoint_override"] = endpoint
    return opts


def credential_options(storage_options: StorageOptions) -> list[str]:
    """The keys of ``storage_options`` that hold a secret (see CREDENTIAL_OPTIONS), sorted."""
    return sorted(k for k in storage_options or {} if k.lower() in CREDENTIAL_OPTIONS)


def _make_filesystem(scheme: str, storage_options: StorageOptions) -> pafs.FileSystem:
    try:
        if scheme == "s3":
            return pafs.S3FileSystem(**_s3_options(storage_options))
        return pafs.GcsFileSystem(**(storage_options or {}))
    except TypeError as exc:  # an option the filesystem does not know
        raise StorageError(
            f"storage_options {sorted(storage_options or {})} not accepted for {scheme}://: {exc}"
        ) from None


def resolve(uri: str, storage_options: StorageOptions = None) -> tuple[pafs.FileSystem, str]:
    """The filesystem that holds ``uri`` and the path to pass to it.

    Local paths (relative ones too, and ``file://`` URIs) become absolute paths on a
    LocalFileSystem; ``s3://bucket/key`` -> S3FileSystem (options such as endpoint_override,
    region, access_key/secret_key, or their s3fs spellings) and path ``bucket/key``;
    ``gs://`` -> GcsFileSystem. Any other scheme raises StorageError naming the supported ones.
    """
    scheme = _scheme(uri)
    if scheme in ("", "file"):
        path = urlparse(uri).path if scheme == "file" else uri
        return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(path))
    if scheme not in _OBJECT_STORE_SCHEMES:
        raise StorageError(f"unsupported storage URI scheme {scheme + '://'!r} in {uri!r}; "
                         f"use {SUPPORTED}")
    parsed = urlparse(uri)
    if not parsed.netloc:
        raise StorageError(f"storage URI {uri!r} has no bucket; use {scheme}://bucket/key")
    path = (parsed.netloc + parsed.path).rstrip("/")
    return _make_filesystem(scheme, storage_options), path


def join(uri: str, *parts: str) -> str:
    """``uri`` with ``parts`` appended: "/" for object stores, the OS separator for local paths."""
    if _scheme(uri) in _OBJECT_STORE_SCHEMES:
        return posixpath.join(uri.rstrip("/"), *(p.strip("/") for p in parts))
    return os.path.join(uri, *parts)


def exists(uri: str, storage_options: StorageOptions = None) -> bool:
    """Whether a file or directory exists at ``uri``."""
    fs, path = resolve(uri, storage_options)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def open_input(uri: str, storage_options: StorageOptions = None) -> pa.NativeFile:
    """A random-access binary reader for ``uri`` (what parquet needs; line reading works too).

    No decompression is applied: callers that accept ``.gz`` decide that themselves, so they
    can report a corrupt archive in their own words.
    """
    fs, path = resolve(uri, storage_options)
    return fs.open_input_file(path)


def write_bytes_atomic(uri: str, data: bytes, storage_options: StorageOptions = None) -> None:
    """Write ``data`` to ``uri`` so that readers see the old file or the whole new one."""
    _write_atomic(uri, lambda out: out.write(data), storage_options)


def write_parquet_atomic(
    uri: str, table: pa.Table, storage_options: StorageOptions = None
) -> None:
    """Write ``table`` as parquet to ``uri`` atomically (see ``write_bytes_atomic``)."""
    _write_atomic(uri, lambda out: pq.write_table(table, out), storage_options)


def _write_atomic(
    uri: str, write: Callable[[BinaryIO], object], storage_options: StorageOptions
) -> None:
    """Write to a hidden temp name next to the target, then move it into place.

    Local: fsync then ``os.replace`` (atomic on POSIX and Windows). Object stores: a put is
    atomic per object (a reader never sees a partial object), but pyarrow's output stream
    *completes* the upload when closed, also when our writer raised half-way; so we write a
    temp object and move (copy + delete) it only after the writer succeeded. On failure the
    temp is removed and the target is untouched. The temp name starts with "." so dataset
    readers (Arrow, Ray Data) skip it while it exists.

    A failed write (disk full, a file-size limit, no permission, a file where a folder
    should be, an object store refusing the upload) raises :class:`StorageWriteError`
    naming ``uri``: the stages' own messages and a user's traceback then say *which* output
    could not be written, where a bare ``OSError`` would name at most a temp file.
    """
    fs, path = resolve(uri, storage_options)
    suffix = f".tmp-{uuid.uuid4().hex[:12]}"
    try:
        if isinstance(fs, pafs.LocalFileSystem):
            parent, name = os.path.split(path)
            _write_local(path, os.path.join(parent, f".{name}{suffix}"), write)
            return
        parent, name = posixpath.split(path)
        tmp = posixpath.join(parent, f".{name}{suffix}")
        try:
            with fs.open_output_stream(tmp) as out:
                write(out)
            fs.move(tmp, path)
        except BaseException:
            _delete_quietly(fs, tmp)
            raise
    except StorageWriteError:
        raise
    except OSError as exc:  # pyarrow's ArrowIOError is an OSError too
        raise _write_error(uri, exc) from exc


_WRITE_CAUSES = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is used up",
    errno.EFBIG: "the file is larger than the filesystem or the process (ulimit -f) allows",
    errno.EROFS: "the filesystem is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.ENOTDIR: "a file stands where a folder is needed",
    errno.EEXIST: "a file stands where a folder is needed",
}


def _write_error(uri: str, exc: OSError) -> StorageWriteError:
    cause = _WRITE_CAUSES.get(exc.errno or 0, "the write failed")
    error = StorageWriteError(
        f"cannot write {uri}: {cause} ({exc}); no partial file was left and an earlier "
        "version, if any, is untouched. Free space or fix the location (run.storage, "
        "run.storage_options), then re-run: finished outputs are kept, not computed again")
    error.errno = exc.errno
    return error


def _write_local(path: str, tmp: str, write: Callable[[BinaryIO], object]) -> None:
    """Local half of :func:`_write_atomic`: the temp file is fsynced before the rename, so a
    crash or full disk leaves the old file or the new one, and a failed temp is removed."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    try:
        with open(tmp, "wb") as out:
            write(out)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):  # the write's error matters more
            os.remove(tmp)
        raise


def _delete_quietly(fs: pafs.FileSystem, path: str) -> None:
    """Best-effort cleanup: the original error matters more than a failed delete."""
    try:
        fs.delete_file(path)
    except OSError:
        pass
