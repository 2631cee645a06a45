"""The run layout: every path of a run from one place, and the spec record's round trip."""

from __future__ import annotations

import os

import pytest

from clo_ray.errors import SpecError
from clo_ray.layout import RunLayout, read_spec_record, safe_name
from clo_ray.spec.schema import load_spec, spec_hash


def test_safe_name_keeps_plain_names_and_joins_runs_of_other_characters():
    assert safe_name("smollm2-135m-sw-clo-4-t1") == "smollm2-135m-sw-clo-4-t1"
    assert safe_name("meta-llama/Llama-2-7b hf") == "meta-llama_Llama-2-7b_hf"
    assert safe_name("lr=1e-4:a  b") == "lr=1e-4_a_b"


def test_local_layout_paths(tmp_path):
    layout = RunLayout(str(tmp_path), "smoke")
    run = os.path.join(str(tmp_path), "smoke")
    assert layout.uri == f"{tmp_path}/smoke"
    assert layout.results == os.path.join(run, "results.parquet")
    assert layout.spec_record == os.path.join(run, "spec.yaml")
    assert layout.tune == os.path.join(run, "tune")
    assert layout.trials == os.path.join(run, "trials")
    assert layout.pairs == os.path.join(str(tmp_path), "cache", "pairs")
    assert layout.reference == os.path.join(str(tmp_path), "cache", "reference")
    assert layout.translations == os.path.join(str(tmp_path), "cache", "translations")
    assert layout.base_eval("builtin:smollm2-135m", "sw", "abc") == os.path.join(
        str(tmp_path), "cache", "eval", "base", "builtin_smollm2-135m-sw-abc")
    assert layout.trial_eval(f"{run}/trials/t-1/checkpoint_2026 12") == os.path.join(
        run, "eval", "t-1", "checkpoint_2026_12")


def test_object_store_layout_and_run_dir_round_trip():
    layout = RunLayout("s3://bucket/sweeps", "paper")
    assert layout.uri == "s3://bucket/sweeps/paper"
    assert layout.results == "s3://bucket/sweeps/paper/results.parquet"
    assert layout.judge_verdict("k") == "s3://bucket/sweeps/cache/judge/k.json"
    again = RunLayout.of_run_dir("s3://bucket/sweeps/paper/")
    assert (again.storage, again.name, again.uri) == ("s3://bucket/sweeps", "paper", layout.uri)


def test_spec_record_round_trip_and_bare_spec(tmp_path):
    spec = load_spec("sweeps/smoke.yaml")
    layout = RunLayout(str(tmp_path), "smoke")
    assert layout.read_spec_record() is None
    data = spec.model_dump(mode="json", by_alias=True)
    layout.write_spec_record(spec_hash(spec), data)
    recorded, got = layout.read_spec_record()
    assert recorded == spec_hash(spec) and got == data
    assert spec_hash(load_spec(got)) == spec_hash(spec)
    assert read_spec_record("sweeps/smoke.yaml")[0] is None  # a user's own YAML: no hash


def test_garbage_spec_record_names_the_file(tmp_path):
    layout = RunLayout(str(tmp_path), "broken")
    os.makedirs(layout.uri)
    with open(layout.spec_record, "w") as fh:
        fh.write("- just\n- a list\n")
    with pytest.raises(SpecError, match="spec.yaml"):
        layout.read_spec_record()
