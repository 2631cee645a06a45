"""``python -m clo_ray.train``: one training run alone, through the real CLI, on a tiny spec
(builtin:tiny-llama, the parallel translator over the bundled sample, 2 DeepSpeed workers),
multi-target: Swahili and Yoruba mixed in one run, metrics reported per language."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from clo_ray.train.__main__ import main, parse_overrides
from clo_ray.train.checkpoint import read_manifest
from clo_ray.train.trainer import read_history

SPEC = """\
run: {{name: cli, storage: "{storage}"}}
corpus: {{path: "builtin:parallel-sample", format: parallel}}
translator: {{backend: parallel}}
languages: [sw, yo]
models: [{{name: "builtin:tiny-llama"}}]
schedules:
  clo:
    - {{loss: clo, modules: attention, steps: 2, lr: 1.0e-3, warmup_ratio: 0.0}}
methods: [clo]
budgets: [8]
resources: {{workers_per_trial: 2, cpus_per_worker: 0.5, zero_stage: 2, precision: fp32}}
train: {{batch_pairs: 2, micro_batch_pairs: 1, max_length: 96, report_every: 1,
         gradient_checkpointing: false}}
evaluation: {{holdout: 8}}
"""


def test_overrides_are_read_as_yaml():
    assert parse_overrides(["lr=1e-4", "modules=[attention, mlp]", "schedule=clo"]) == {
        "lr": 1e-4, "modules": ["attention", "mlp"], "schedule": "clo"}


def test_a_bad_spec_is_reported_without_starting_ray(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("run: {name: x}\n")
    assert main([str(bad), "--model", "builtin:tiny-llama", "--language", "sw",
                 "--method", "clo", "--budget", "8"]) == 2
    assert "error:" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_trains_and_prints_where_results_landed(tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text(SPEC.format(storage=tmp_path / "runs"))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    done = subprocess.run(
        [sys.executable, "-m", "clo_ray.train", str(spec), "--model", "builtin:tiny-llama",
         "--language", "sw", "--language", "yo", "--method", "clo", "--budget", "8",
         "--num-cpus", "2",
         "--export", str(tmp_path / "export")],
        capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = dict(line.split(": ", 1) for line in done.stdout.splitlines() if ": " in line)
    assert Path(lines["results"]).is_dir()
    manifest = read_manifest(lines["checkpoint"])
    assert manifest["complete"] and manifest["global_step"] == 2
    assert manifest["base_model"] == "builtin:tiny-llama"
    assert (Path(lines["exported"]) / "config.json").is_file()
    metrics = json.loads(lines["metrics"])
    assert metrics["step"] == 2
    assert manifest["data"]["languages"] == ["sw", "yo"] and manifest["data"]["n_pairs"] == 16
    reported = {key for row in read_history(str(Path(lines["results"]) / "history.jsonl"))
                for key in row}
    for language in ("sw", "yo"):  # per-language metrics of the mixed batches
        assert {f"{language}/train_loss", f"{language}/target_nll"} <= reported
