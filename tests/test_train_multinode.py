"""Multi-node training on one machine: a 2-node ``ray.cluster_utils.Cluster`` (1 CPU each),
2 train workers of 1 CPU, so one lands on each node; gloo and DeepSpeed ZeRO-3 run across
them and the training completes."""

import pytest
from conftest import sample_translations

from clo_ray.data.pairs import prepare_pairs
from clo_ray.ray_env import ray_runtime_env
from clo_ray.spec.schema import load_spec
from clo_ray.train.checkpoint import read_manifest
from clo_ray.train.trainer import TrainRun, run_training

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def two_nodes():
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, runtime_env=ray_runtime_env())
    yield cluster
    ray.shutdown()
    cluster.shutdown()


def test_two_workers_on_two_nodes(two_nodes, tmp_path):
    import ray
    from ray.util.state import list_actors

    assert len([n for n in ray.nodes() if n["Alive"]]) == 2
    spec = load_spec({
        "run": {"name": "nodes", "storage": str(tmp_path), "seed": 0},
        "corpus": {"path": "builtin:parallel-sample"},
        "translator": {"backend": "parallel"},
        "languages": ["sw"],
        "models": [{"name": "builtin:tiny-llama"}],
        "schedules": {"clo": [{"loss": "clo", "modules": "attention", "steps": 2,
                               "lr": 1e-3, "warmup_ratio": 0.0}]},
        "methods": ["clo"],
        "budgets": [8],
        "resources": {"workers_per_trial": 2, "cpus_per_worker": 1, "zero_stage": 3,
                      "precision": "fp32"},
        "train": {"batch_pairs": 2, "micro_batch_pairs": 1, "max_length": 96,
                  "report_every": 1, "gradient_checkpointing": False},
        "evaluation": {"holdout": 8},
    })
    pairs = prepare_pairs(spec, {"sw": sample_translations("sw")}, ["sw"], 8)
    result = run_training(spec, pairs, model="builtin:tiny-llama", method="clo",
                          run=TrainRun(name="two-nodes"))
    assert result.metrics["step"] == 2
    assert read_manifest(result.checkpoint.path)["complete"]

    workers = list_actors(address=two_nodes.gcs_address, detail=True,
                          filters=[("class_name", "=", "RayTrainWorker")])
    assert len(workers) == 2
    assert len({w.node_id for w in workers}) == 2, "both workers ran on the same node"
