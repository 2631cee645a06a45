"""Storage helpers on local paths: resolution, atomic writes, and the unsupported-scheme error.
(Object stores are only constructed here, never contacted.)"""

from __future__ import annotations

import os

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from clo_ray import storage
from clo_ray.errors import StorageError


def s3_config(fs: pafs.S3FileSystem) -> dict:
    return fs.__reduce__()[1][0]  # the options pyarrow would rebuild it from


def test_local_paths_resolve_to_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fs, path = storage.resolve("data/c.jsonl")
    assert isinstance(fs, pafs.LocalFileSystem)
    assert path == os.path.join(str(tmp_path), "data", "c.jsonl")
    assert storage.resolve(f"file://{tmp_path}/x.parquet")[1] == f"{tmp_path}/x.parquet"


def test_s3_options_aliases_and_endpoint_env(monkeypatch):
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://localhost:9000")
    fs, path = storage.resolve("s3://bucket/runs/x.parquet/",
                               {"region": "eu-west-1", "key": "AK", "secret": "SK"})
    config = s3_config(fs)
    assert path == "bucket/runs/x.parquet"
    assert (config["endpoint_override"], config["scheme"]) == ("localhost:9000", "http")
    assert (config["region"], config["access_key"], config["secret_key"]) == (
        "eu-west-1", "AK", "SK")


def test_gcs_resolves():
    fs, path = storage.resolve("gs://bucket/a/b", {"anonymous": True})
    assert isinstance(fs, pafs.GcsFileSystem) and path == "bucket/a/b"


@pytest.mark.parametrize("uri", ["ftp://host/x", "hdfs://nn/x", "https://example.com/x"])
def test_unsupported_scheme_names_the_supported_ones(uri):
    with pytest.raises(StorageError, match=r"unsupported storage URI scheme .*s3://bucket/key or "
                                         r"gs://bucket/key"):
        storage.resolve(uri)


def test_bad_options_and_missing_bucket():
    with pytest.raises(StorageError, match="storage_options"):
        storage.resolve("s3://bucket/k", {"no_such_option": 1})
    with pytest.raises(StorageError, match="has no bucket"):
        storage.resolve("s3:///k")


def test_join():
    assert storage.join("s3://b/runs/", "/cache", "x.parquet") == "s3://b/runs/cache/x.parquet"
    assert storage.join("out", "a", "b.json") == os.path.join("out", "a", "b.json")


def test_write_read_roundtrip_creates_parents(tmp_path):
    uri = str(tmp_path / "a" / "b" / "blob.bin")
    assert not storage.exists(uri)
    storage.write_bytes_atomic(uri, b"one")
    storage.write_bytes_atomic(uri, b"two")
    with storage.open_input(uri) as fh:
        assert fh.read() == b"two"
    table = pa.table({"id": ["c-1", "c-2"]})
    storage.write_parquet_atomic(str(tmp_path / "t.parquet"), table)
    with storage.open_input(str(tmp_path / "t.parquet")) as fh:
        assert pq.read_table(fh).equals(table)
    assert sorted(os.listdir(tmp_path)) == ["a", "t.parquet"]


def test_failed_write_leaves_no_final_and_no_temp_file(tmp_path, monkeypatch):
    def half_write(table, out):
        out.write(b"PAR1 half a file")
        raise RuntimeError("disk full")

    monkeypatch.setattr(storage.pq, "write_table", half_write)
    target = tmp_path / "t.parquet"
    with pytest.raises(RuntimeError, match="disk full"):
        storage.write_parquet_atomic(str(target), pa.table({"x": [1]}))
    assert os.listdir(tmp_path) == []
    target.write_bytes(b"previous")  # an existing file survives a failed overwrite untouched
    with pytest.raises(RuntimeError):
        storage.write_parquet_atomic(str(target), pa.table({"x": [1]}))
    assert os.listdir(tmp_path) == ["t.parquet"] and target.read_bytes() == b"previous"
