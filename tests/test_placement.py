"""Where a trial's train workers go: the spec's placement strategy and node labels reach Ray
Train's ScalingConfig (built, not run: no cluster needed)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from clo_ray.data.pairs import PreparedPairs
from clo_ray.errors import SpecError
from clo_ray.ray_env import trial_placement
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


def test_trial_labels_reach_the_trials_placement_group(tmp_path):
    spec = spec_with(tmp_path, trial_labels={"clo-ray/capacity": "on-demand"},
                     trial_resources={"trial_slot": 1})
    placement = trial_placement(spec)
    assert placement.bundles == [{"CPU": 1.0, "trial_slot": 1.0}]
    assert placement._bound.kwargs["bundle_label_selector"] == [{"clo-ray/capacity": "on-demand"}]
    assert trial_placement(spec_with(tmp_path))._bound.kwargs["bundle_label_selector"] is None


def test_a_bad_label_selector_is_a_spec_error(tmp_path):
    with pytest.raises(SpecError, match="trial_labels"):
        spec_with(tmp_path, trial_labels={"clo-ray/capacity": "on demand"})
    with pytest.raises(SpecError, match="worker_labels"):
        spec_with(tmp_path, worker_labels={"-bad key": "x"})


@pytest.fixture(scope="module")
def labelled_ray():
    """A one-node Ray whose node carries the on-demand label of the clusters/ configs."""
    import ray

    ray.init(address="local", num_cpus=2, labels={"clo-ray/capacity": "on-demand"},
             include_dashboard=False, log_to_driver=False)
    try:
        yield ray
    finally:
        ray.shutdown()


def test_ray_places_the_trial_only_on_a_node_with_its_labels(tmp_path, labelled_ray):
    """Ray's scheduler itself: the trial's bundle is placed on the on-demand node and stays
    pending where no node has the label (on a cluster, autoscaler v2 would add one)."""
    ray = labelled_ray
    node = ray.get_runtime_context().get_node_id()
    on_demand = trial_placement(
        spec_with(tmp_path, trial_labels={"clo-ray/capacity": "on-demand"})).to_placement_group()
    spot = trial_placement(
        spec_with(tmp_path, trial_labels={"clo-ray/capacity": "spot"})).to_placement_group()
    try:
        assert on_demand.wait(timeout_seconds=60)
        table = ray.util.placement_group_table(on_demand)
        assert table["bundles_to_node_id"][0] == node
        assert not spot.wait(timeout_seconds=3)
        assert ray.util.placement_group_table(spot)["state"] == "PENDING"
    finally:
        ray.util.remove_placement_group(on_demand)
        ray.util.remove_placement_group(spot)


@pytest.mark.parametrize("selector", [
    {"clo-ray/capacity": "on-demand"}, {"clo-ray/capacity": "on demand"}, {"-bad key": "x"},
    {"a": "!spot"}, {"a": "in(x,y)"}, {"a": "!in(x,y)"}, {"ray.io/market-type": "spot"},
    {"a": ""}, {"a": "in()"}, {"a/b/c": "x"}, {"a": "x" * 64}, {"a": "x" * 63},
    {"example.com/zone": "us-east-1a"}, {"a": "in(x,,y)"}])
def test_the_spec_checks_label_selectors_as_ray_does(selector):
    """The spec's own check (no ray import on --plan's path) agrees with Ray's."""
    from ray._private.label_utils import validate_label_selector

    from clo_ray.spec.training import label_selector_problem

    assert (label_selector_problem(selector) is None) == (validate_label_selector(selector) is None)
