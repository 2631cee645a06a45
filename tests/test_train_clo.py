"""CLO on Ray Train + DeepSpeed (CPU, gloo, 2 workers), on one shared local Ray cluster.

builtin:tiny-llama, 12 training pairs, 4 pairs per step (1 per worker per micro-step, 2
micro-steps): 6 steps are 2 epochs over the same pairs, so epoch means of the loss compare.

- ZeRO-2 and ZeRO-3: the loss goes down, only attention weights change (gathered to full
  shape in the checkpoint even on ZeRO-3), the checkpoint reloads, the export generates;
- the second run with the same reference key computes no reference log-probs;
- resume equivalence: 3 steps, stop, resume, 3 steps == 6 steps straight (same sample
  order on every rank, same trained weights), on ZeRO-2 and ZeRO-3;
- a train worker process killed mid-stage: the run resumes from its checkpoint, the step
  counter continues, and the result equals the uninterrupted run.
"""

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import sample_translations

from clo_ray.data.pairs import prepare_pairs
from clo_ray.models.resolve import resolve_model
from clo_ray.models.selectors import select_parameters
from clo_ray.ray_env import ray_runtime_env
from clo_ray.spec.schema import load_spec
from clo_ray.train.checkpoint import export_model, load_model, load_trained, read_manifest
from clo_ray.train.trainer import TrainRun, read_history, run_training

pytestmark = pytest.mark.slow

TINY = "builtin:tiny-llama"
STEPS, BUDGET = 6, 12


CLO = [{"loss": "clo", "modules": "attention", "steps": STEPS, "lr": 1e-3, "warmup_ratio": 0.0}]
# SFT with LoRA adapters on attention, then DPO on the MLPs against the SFT result.
SFT_DPO = [{"loss": "sft", "modules": "attention", "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
            "steps": 2, "lr": 1e-2, "warmup_ratio": 0.0},
           {"loss": "dpo", "modules": "mlp", "steps": 2, "lr": 1e-3, "warmup_ratio": 0.0}]


def spec_for(storage: Path, zero_stage: int, *, max_failures: int = 0, stages=None,
             method: str = "clo"):
    return load_spec({
        "run": {"name": "t", "storage": str(storage), "seed": 0},
        "corpus": {"path": "builtin:parallel-sample"},
        "translator": {"backend": "parallel"},
        "languages": ["sw"],
        "models": [{"name": TINY}],
        "schedules": {method: stages or CLO},
        "methods": [method],
        "budgets": [BUDGET],
        "resources": {"workers_per_trial": 2, "cpus_per_worker": 1, "zero_stage": zero_stage,
                      "precision": "fp32", "max_failures": max_failures},
        "train": {"batch_pairs": 4, "micro_batch_pairs": 1, "max_length": 128,
                  "report_every": 1, "checkpoint_every": 2, "gradient_checkpointing": False},
        "evaluation": {"holdout": 8},
    })


def train(storage: Path, zero_stage: int, name: str, *, max_failures: int = 0, stages=None,
          method: str = "clo", **extra):
    spec = spec_for(storage, zero_stage, max_failures=max_failures, stages=stages,
                    method=method)
    pairs = prepare_pairs(spec, {"sw": sample_translations("sw")}, ["sw"], BUDGET)
    return run_training(spec, pairs, model=TINY, method=method, run=TrainRun(
        name=name, extra={"sample_log": str(storage / "samples" / name), **extra}))


def run_dir(storage: Path, name: str) -> Path:
    return storage / "t" / "train" / name


def samples(storage: Path, name: str, rank: int) -> list[dict]:
    path = storage / "samples" / f"{name}.rank{rank}"
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def ray_local():
    import ray

    env = ray_runtime_env()  # Train's controller waits 3 s per placement attempt (not 60)
    env["env_vars"]["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] = "3"
    ray.init(address="local", num_cpus=4, runtime_env=env)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def storage(tmp_path_factory):
    return tmp_path_factory.mktemp("train")


@pytest.fixture(scope="module")
def straight(ray_local, storage):
    """Uninterrupted runs: ZeRO-2 first (it fills the reference cache), then ZeRO-3."""
    return {zero: train(storage, zero, f"straight-z{zero}") for zero in (2, 3)}


@pytest.fixture(scope="module")
def base_state():
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(resolve_model(TINY), dtype=torch.float32)
    return model.state_dict(), select_parameters(model, ["attention"])


@pytest.mark.parametrize("zero", [2, 3])
def test_clo_trains_only_attention(straight, storage, base_state, zero, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    history = read_history(str(run_dir(storage, f"straight-z{zero}") / "history.jsonl"))
    assert [row["step"] for row in history] == list(range(1, STEPS + 1))
    losses = [row["train_loss"] for row in history]
    assert sum(losses[3:]) < sum(losses[:3]), losses  # epoch 2 below epoch 1, same pairs

    result = straight[zero]
    manifest = read_manifest(result.checkpoint.path)
    base, attention = base_state
    assert manifest["complete"] and manifest["global_step"] == STEPS
    assert manifest["stages"][0]["trainable"] == attention
    trained = load_trained(result.checkpoint.path, 0)
    assert sorted(trained) == sorted(attention)
    for name, tensor in trained.items():  # gathered: full shapes, even on ZeRO-3
        assert tensor.shape == base[name].shape, name
        assert not torch.equal(tensor, base[name]), f"{name} did not train"

    out = export_model(result.checkpoint.path, tmp_path / "export")
    exported = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    state = exported.state_dict()
    for name, tensor in base.items():
        same = torch.equal(state[name], tensor)
        assert same != (name in trained), f"{name}: changed={not same}"
    reloaded = load_model(result.checkpoint.path).state_dict()
    assert all(torch.equal(reloaded[name], state[name]) for name in state)

    tokenizer = AutoTokenizer.from_pretrained(out)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Habari?"}],
                                           tokenize=False, add_generation_prompt=True)
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    generated = exported.generate(**ids, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    assert generated.shape[1] == ids["input_ids"].shape[1] + 5


def test_reference_cache_is_reused(straight, storage):
    assert straight[2].metrics["reference_computed"] > 0  # the first run computed its shard
    assert straight[3].metrics["reference_computed"] == 0  # same key: nothing computed
    keys = list((storage / "cache" / "reference").iterdir())
    assert len(keys) == 1 and len(list(keys[0].glob("shard-*.parquet"))) == 2


@pytest.mark.parametrize("zero", [2, 3])
def test_resume_is_equivalent_to_a_straight_run(straight, storage, zero):
    name = f"half-z{zero}"
    first = train(storage, zero, name, stop_after_steps=STEPS // 2)
    assert first.metrics["step"] == STEPS // 2
    second = train(storage, zero, name)  # the same run name: Ray hands back its checkpoint
    assert second.metrics["step"] == STEPS
    assert second.metrics["resumed_from_step"] == STEPS // 2

    history = read_history(str(run_dir(storage, name) / "history.jsonl"))
    assert [row["step"] for row in history] == list(range(1, STEPS + 1))  # none skipped/repeated
    for rank in (0, 1):  # the same pairs at the same steps on every rank
        assert samples(storage, name, rank) == samples(storage, f"straight-z{zero}", rank)
    resumed = load_trained(second.checkpoint.path, 0)
    reference = load_trained(straight[zero].checkpoint.path, 0)
    for key, tensor in reference.items():
        torch.testing.assert_close(resumed[key], tensor, rtol=1e-5, atol=1e-6)


def test_a_run_folder_refuses_another_configuration(straight, storage):
    """A trial name re-used by another configuration (here: another lr) must not "resume"
    the finished weights of the first (0 steps trained, reported complete): it fails, naming
    the checkpoint."""
    changed = [{**CLO[0], "lr": 2e-3}]
    with pytest.raises(Exception, match="trained with another configuration"):
        train(storage, 2, "straight-z2", stages=changed)


def test_unplaceable_workers_fail_after_the_placement_timeout(ray_local, storage,
                                                              monkeypatch):
    """Ray Train alone retries a worker group it cannot place forever: with another actor
    holding 3 of the 4 CPUs, the 2 workers wait 6 s, then the run fails and says why."""
    import ray

    from clo_ray.train.trainer import PlacementTimeoutError

    monkeypatch.setenv("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "3")

    @ray.remote(num_cpus=3)
    class Holder:
        def ready(self) -> bool:
            return True

    holder = Holder.remote()
    ray.get(holder.ready.remote())
    spec = spec_for(storage, 0)
    pairs = prepare_pairs(spec, {"sw": sample_translations("sw")}, ["sw"], BUDGET)
    started = time.monotonic()
    try:
        with pytest.raises(PlacementTimeoutError, match=r"2 train worker\(s\) of 1 CPU / 0 GPU "
                                                        r"each were not placed within 6 s"):
            run_training(spec, pairs, model=TINY, method="clo",
                         run=TrainRun(name="unplaced", placement_timeout_s=6))
    finally:
        ray.kill(holder)
    assert time.monotonic() - started < 120


def _kill_a_worker_after_first_checkpoint(folder: Path, timeout: float = 300) -> int:
    """Wait for the run's first registered checkpoint, then SIGKILL one RayTrainWorker.

    Registered means in history.jsonl: the controller writes it after every worker's report,
    which is when Ray would hand the checkpoint to a restarted worker group (a checkpoint
    folder can exist before that).
    """
    import ray
    from ray.util.state import list_actors

    address = ray.get_runtime_context().gcs_address  # other Ray instances may run here
    deadline = time.time() + timeout
    while time.time() < deadline:
        history = folder / "history.jsonl"
        if history.exists() and any(row["checkpoint"] for row in read_history(str(history))):
            workers = list_actors(address=address, detail=True,
                                  filters=[("class_name", "=", "RayTrainWorker"),
                                           ("state", "=", "ALIVE")])
            if workers:
                pid = workers[-1].pid
                os.kill(pid, signal.SIGKILL)
                return pid
        time.sleep(0.2)
    raise AssertionError("no checkpoint appeared to kill a worker after")


def test_killed_worker_resumes_from_checkpoint(straight, storage):
    name = "fault-z2"
    outcome = {}

    def fit():
        outcome["result"] = train(storage, 2, name, max_failures=1, step_sleep_s=1.0)

    thread = threading.Thread(target=fit)
    thread.start()
    killed = _kill_a_worker_after_first_checkpoint(run_dir(storage, name))
    thread.join(timeout=600)
    assert killed and "result" in outcome
    result = outcome["result"]
    assert result.metrics["step"] == STEPS
    assert 0 < result.metrics["resumed_from_step"] < STEPS  # restarted from a checkpoint

    history = read_history(str(run_dir(storage, name) / "history.jsonl"))
    after = [row["step"] for row in history if row["resumed_from_step"]]
    resumed_from = result.metrics["resumed_from_step"]
    assert after == list(range(resumed_from + 1, STEPS + 1))  # the counter continues
    resumed = load_trained(result.checkpoint.path, 0)
    for key, tensor in load_trained(straight[2].checkpoint.path, 0).items():
        torch.testing.assert_close(resumed[key], tensor, rtol=1e-5, atol=1e-6)


def test_sft_then_dpo_against_the_sft_result(straight, storage, base_state, tmp_path):
    from transformers import AutoModelForCausalLM

    result = train(storage, 2, "sft-dpo", stages=SFT_DPO, method="sft_dpo")
    manifest = read_manifest(result.checkpoint.path)
    assert manifest["complete"] and manifest["global_step"] == 4
    sft, dpo = manifest["stages"]
    assert sft["lora"]["r"] == 4 and all("lora_" in n for n in sft["trainable"])
    assert dpo["lora"] is None and all(".mlp." in n for n in dpo["trainable"])

    history = read_history(str(run_dir(storage, "sft-dpo") / "history.jsonl"))
    assert [row["stage"] for row in history] == [0, 0, 1, 1]
    assert history[-1]["reference_computed"] > 0  # the SFT result is a new reference model
    assert "target_nll" in history[0] and "preference_accuracy" in history[-1]
    assert len(list((storage / "cache" / "reference").iterdir())) == 2  # base + SFT result

    base, attention = base_state
    exported = AutoModelForCausalLM.from_pretrained(
        export_model(result.checkpoint.path, tmp_path / "export"), dtype=torch.float32)
    changed = {k for k, v in exported.state_dict().items() if not torch.equal(v, base[k])}
    assert changed == set(attention) | set(dpo["trainable"])  # merged LoRA + DPO's MLPs
