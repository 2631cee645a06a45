"""Where a trial's train workers go: the spec's placement strategy and node labels reach Ray
Train's ScalingConfig (built, not run: no cluster needed)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from clo_ray.data.pairs import PreparedPairs
from clo_ray.errors import SpecError
from clo_ray.spec.schema import load_spec
from clo_ray.train.trainer import build_trainer, loop_config, method_stages

SPEC = Path(__file__).resolve().parent / "specs" / "tiny_sweep.yaml"


def spec_with(tmp_path: Path, **resources):
    data = yaml.safe_load(SPEC.read_text())
    data["run"]["storage"] = str(tmp_path / "runs")
    data["resources"].update(resources)
    data["train"]["batch_pairs"] = 2 * data["resources"]["workers_per_trial"]
    return load_spec(data)


def scaling(spec):
    pairs = PreparedPairs(train_uri="t.parquet", eval_uri="e.parquet", fingerprint="f",
                          n_train=8, n_eval=8, languages=("sw",), budget="8")
    config = loop_config(spec, model="builtin:tiny-llama",
                         stages=method_stages(spec, "sft"), pairs=pairs)
    return build_trainer(spec, config, run_name="placement").scaling_config


def test_the_default_packs_workers_anywhere(tmp_path):
    got = scaling(spec_with(tmp_path))
    assert got.placement_strategy == "PACK" and not got.label_selector


def test_strategy_and_labels_reach_the_scaling_config(tmp_path):
    spec = spec_with(tmp_path, workers_per_trial=2, placement_strategy="STRICT_PACK",
                     worker_labels={"ray.io/market-type": "on-demand"})
    got = scaling(spec)
    assert got.num_workers == 2 and got.placement_strategy == "STRICT_PACK"
    assert got.label_selector == {"ray.io/market-type": "on-demand"}


def test_an_unknown_strategy_is_a_spec_error(tmp_path):
    with pytest.raises(SpecError, match="placement_strategy"):
        spec_with(tmp_path, placement_strategy="PACKED")
