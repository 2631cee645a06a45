"""Cache files check themselves: each kind is truncated (or a byte flipped) and read again.

A damaged entry is named, moved aside and computed again where the cache can (pairs,
reference shards, evaluation and lm-eval records, judge verdicts); results.parquet, which
only the tune stage writes, stops with the file and the command that rebuilds it. The
translation cache's own cases are in tests/test_translate.py.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pytest
import torch
import yaml

from clo_ray import checked
from clo_ray.data.pairs import prepare_pairs, read_pairs
from clo_ray.spec.schema import load_spec
from clo_ray.train import reference as ref
from clo_ray.train.batches import Example

SPECS = Path(__file__).resolve().parent / "specs"


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def aside(folder: Path) -> list[str]:
    return sorted(p.name.split(".corrupt-")[0] for p in folder.rglob("*.corrupt-*"))


# ------------------------------------------------------------------------------ the files


def test_round_trip_and_what_a_read_detects(tmp_path):
    table = pa.table({"x": list(range(100))})
    uri = str(tmp_path / "t.parquet")
    checked.write_parquet(uri, table)
    assert (tmp_path / ".t.parquet.check.json").is_file()
    assert checked.read_parquet(uri).equals(table)

    truncate(tmp_path / "t.parquet")
    with pytest.raises(checked.CorruptFileError, match=r"t\.parquet is damaged \(\d+ bytes, "
                                                       r"written as \d+\)"):
        checked.read_parquet(uri)
    checked.write_parquet(uri, table)
    data = bytearray((tmp_path / "t.parquet").read_bytes())
    data[10] ^= 0x01
    (tmp_path / "t.parquet").write_bytes(bytes(data))
    with pytest.raises(checked.CorruptFileError, match="checksum differs"):
        checked.read_parquet(uri)

    moved = checked.set_aside(uri)
    assert Path(moved).is_file() and not (tmp_path / "t.parquet").exists()
    assert not (tmp_path / ".t.parquet.check.json").exists()


def test_files_without_a_checksum_must_parse(tmp_path):
    """Files written before checks existed are read as they are, and must parse."""
    (tmp_path / "old.json").write_text('{"a": 1}')
    assert checked.read_json(str(tmp_path / "old.json")) == {"a": 1}
    (tmp_path / "cut.json").write_text('{"a": ')
    with pytest.raises(checked.CorruptFileError, match="cut.json is damaged .*not readable as"):
        checked.read_json(str(tmp_path / "cut.json"))
    (tmp_path / "cut.parquet").write_bytes(b"PAR1 and then nothing")
    with pytest.raises(checked.CorruptFileError, match="not readable as parquet"):
        checked.read_parquet(str(tmp_path / "cut.parquet"))


def test_a_damaged_fingerprinted_record_is_recomputed(tmp_path):
    """Evaluation (metrics.json) and lm-eval records: damaged -> None (the caller evaluates
    again) and moved aside; a good record is returned; another fingerprint is a miss."""
    uri = str(tmp_path / "metrics.json")
    checked.write_fingerprinted(uri, "f1", {"target_nll": 1.5})
    assert checked.read_fingerprinted(uri, "f1") == {"target_nll": 1.5}
    assert checked.read_fingerprinted(uri, "f2") is None
    truncate(tmp_path / "metrics.json")
    assert checked.read_fingerprinted(uri, "f1") is None
    assert aside(tmp_path) == ["metrics.json"] and not (tmp_path / "metrics.json").exists()


# ------------------------------------------------------------------------------ the caches


def tiny_spec(tmp: Path):
    data = yaml.safe_load((SPECS / "minimal.yaml").read_text())
    data["run"]["storage"] = str(tmp / "runs")
    data["evaluation"] = {"holdout": 8}
    return load_spec(data)


def test_a_damaged_pairs_file_is_written_again(tmp_path, translations):
    spec = tiny_spec(tmp_path)
    tables = {"sw": translations("sw")}
    pairs = prepare_pairs(spec, tables, ["sw"], 16)
    train = Path(pairs.train_uri)
    good = train.read_bytes()
    truncate(train)
    with pytest.raises(checked.CorruptFileError, match="pairs stage moves the file aside"):
        read_pairs(pairs.train_uri)  # what a trial would see: the file and the fix
    again = prepare_pairs(spec, tables, ["sw"], 16)  # the pairs stage of the re-run
    assert again == pairs and train.read_bytes() == good
    assert aside(train.parent) == [train.name]


def test_a_damaged_reference_shard_is_computed_again(tmp_path):
    examples = [Example(id=f"r{i}", language="sw", input_ids=((1, 2),) * 4,
                        response_starts=(1,) * 4) for i in range(4)]
    logps = torch.arange(16, dtype=torch.float64).view(4, 4)
    uri = str(tmp_path / "ref")
    for rank in (0, 1):
        ref.write_shard(uri, examples[rank::2], logps[rank::2], rank=rank, world=2)
    assert ref.usable_reference(uri) is not None
    shard = Path(uri) / ref.shard_name(1, 2)
    truncate(shard)
    with pytest.raises(checked.CorruptFileError, match=ref.shard_name(1, 2)):
        ref.read_reference(uri)
    assert ref.usable_reference(uri) is None  # rank 0's verdict: every rank computes again
    assert aside(Path(uri)) == [shard.name] and not shard.exists()


def test_a_damaged_results_file_names_the_command_that_rebuilds_it(tmp_path):
    from clo_ray.report.schema import load_results

    run = tmp_path / "run"
    run.mkdir()
    (run / "results.parquet").write_bytes(b"PAR1 truncated")
    with pytest.raises(checked.CorruptFileError) as info:
        load_results(str(run))
    text = str(info.value)
    assert str(run / "results.parquet") in text and "--only tune" in text
    done = subprocess.run([sys.executable, "-m", "clo_ray.report", str(run)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "--only tune" in done.stderr, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
