"""Bad inputs through the command lines: each ends in seconds with exit 2 and a short error
that names what is wrong (file, YAML path, value), never a traceback, and nothing is claimed.

The CLIs run in-process (their ``main``), so the table costs about a second per row; the
sweep cases that pass validation stop at the checks a run makes before Ray starts (model
references, the corpus), which is what they test.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import pytest
import yaml

from clo_ray.sweep.__main__ import main as sweep_main
from clo_ray.train.__main__ import main as train_main
from clo_ray.translate.__main__ import main as translate_main

SPECS = Path(__file__).resolve().parent / "specs"
LAUGHS = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(  # 10^9 nodes once expanded
    f"{b}: &{b} [{', '.join(['*' + a] * 10)}]\n"
    for a, b in zip("abcdefgh", "bcdefghi", strict=True))


def base(tmp: Path) -> dict[str, Any]:
    data = yaml.safe_load((SPECS / "minimal.yaml").read_text())
    data["run"]["storage"] = str(tmp / "runs")
    data["evaluation"] = {"holdout": 8}
    return data


def stage(**fields: Any) -> dict[str, Any]:
    return {"loss": "clo", "modules": "attention", "epochs": 1, **fields}


def with_(path: str, value: Any):
    """A change of one key (``a.b.0.c`` walks mappings and lists)."""
    def change(data: dict[str, Any]) -> None:
        *parents, last = [int(p) if p.isdigit() else p for p in path.split(".")]
        node: Any = data
        for part in parents:
            node = node.setdefault(part, {}) if isinstance(part, str) else node[part]
        node[last] = value
    return change


def schedule(**fields: Any):
    def change(data: dict[str, Any]) -> None:
        data["schedules"] = {"clo": [stage(**fields)]}
    return change


# (id, change to the base spec or raw file bytes, CLI args after the spec, fragments the error
# must hold). Args "plan" validates only; "run" starts the sweep (it stops before Ray).
CASES: list[tuple[str, Any, str, list[str]]] = [
    ("lr-inf", schedule(lr=math.inf), "plan", ["schedules.clo[0].lr", "finite", "inf"]),
    ("lr-nan", schedule(lr=math.nan), "plan", ["schedules.clo[0].lr", "finite"]),
    ("beta-inf", schedule(beta=math.inf), "plan", ["schedules.clo[0].beta", "finite"]),
    ("epochs-inf", schedule(epochs=math.inf), "plan", ["schedules.clo[0].epochs", "finite"]),
    ("lambda-above-1", schedule(**{"lambda": 2}), "plan", ["schedules.clo[0].lambda", "got 2"]),
    ("warmup-1", schedule(warmup_ratio=1.0), "plan", ["warmup_ratio", "got 1.0"]),
    ("unknown-module-set", schedule(modules="atention"), "plan", ["modules", "atention"]),
    ("cpus-inf", with_("resources.cpus_per_worker", math.inf), "plan",
     ["resources.cpus_per_worker", "finite"]),
    ("trial-resource-nan", with_("resources.trial_resources", {"on_demand": math.nan}), "plan",
     ["resources.trial_resources", "finite"]),
    ("negative-failures", with_("resources.max_failures", -1), "plan",
     ["resources.max_failures", "got -1"]),
    ("budget-negative", with_("budgets", [-5]), "plan", ["budgets[0]", "got -5"]),
    ("budget-twice", with_("budgets", [8, 8]), "plan", ["budgets[1]", "listed twice"]),
    ("unknown-language", with_("languages", ["xx"]), "plan", ["languages[0]", "'xx'"]),
    ("source-as-target", with_("languages", ["en"]), "plan", ["languages[0]", "source"]),
    ("typo-key", with_("run.nmae", "x"), "plan", ["run.nmae", "did you mean 'name'"]),
    ("bad-run-name", with_("run.name", "a b"), "plan", ["run.name", "'a b'"]),
    ("bad-storage", with_("run.storage", "ftp://host/x"), "plan", ["run.storage", "ftp://"]),
    ("unknown-method", with_("methods", ["cl0"]), "plan", ["methods[0]", "'cl0'"]),
    ("bad-backend", with_("translator.backend", "google"), "plan",
     ["translator.backend", "'google'"]),
    ("bad-batch", with_("train", {"batch_pairs": 3, "micro_batch_pairs": 2}), "plan",
     ["train.batch_pairs", "divisible"]),
    ("bad-metric", with_("search.metric", "bleu"), "plan", ["search.metric", "'bleu'"]),
    ("bad-label", with_("models", [{"name": "builtin:tiny-llama", "label": "a/b"}]), "plan",
     ["models[0].label", "'a/b'"]),
    ("unknown-builtin", with_("models", [{"name": "builtin:gpt5"}]), "plan",
     ["models[0].name", "builtin:gpt5"]),
    ("missing-section", lambda d: d.pop("methods"), "plan", ["methods: required key missing"]),
    ("yaml-syntax", b"run: {name: x\ncorpus: [\n", "plan", ["invalid YAML", "line"]),
    ("duplicate-key", b"run: {name: a}\nrun: {name: b}\n", "plan", ["duplicate key 'run'"]),
    ("non-utf8", "run: {name: caf\xe9}\n".encode("latin-1"), "plan", ["not UTF-8", "0xe9"]),
    ("billion-laughs", LAUGHS.encode(), "plan", ["aliases expand", "100,000"]),
    ("top-level-list", b"- run\n- corpus\n", "plan", ["top level must be a mapping"]),
    ("empty-file", b"", "plan", ["top level must be a mapping"]),
    ("spec-missing", None, "plan", ["not found"]),
    ("model-dir-missing", with_("models", [{"name": "/nonexistent/model"}]), "run",
     ["models[0].name", "/nonexistent/model", "does not exist"]),
    ("model-dir-no-config", "EMPTY_DIR_MODEL", "run", ["models[0].name", "no config.json"]),
    ("hub-model-offline", with_("models", [{"name": "nobody/no-such-model"}]), "run",
     ["models[0].name", "nobody/no-such-model", "not in the Hugging Face cache"]),
    ("corpus-missing", with_("corpus.path", "/nonexistent/corpus.jsonl"), "run",
     ["/nonexistent/corpus.jsonl"]),
    ("budget-over-corpus", with_("budgets", [10_000]), "run", ["budgets[0]", "10000"]),
    ("judge-endpoint-env-unset", with_("evaluation.judge", {
        "enabled": True, "backend": "endpoint",
        "endpoint": {"base_url": "http://127.0.0.1:9/v1", "model_env": "CLO_TEST_UNSET_MODEL"}}),
     "run", ["evaluation.judge.endpoint.model_env", "CLO_TEST_UNSET_MODEL", "is not set"]),
    ("prompt-set-missing", with_("evaluation.prompt_sets", [
        {"name": "alpaca", "path": "/nonexistent/alpaca_eval.json"}]), "run",
     ["prompt set 'alpaca'", "/nonexistent/alpaca_eval.json", "cannot read"]),
    ("prompt-set-bad-row", "BAD_PROMPT_SET", "run",
     ["prompt set 'alpaca'", "row 2: field 'instruction' is missing"]),
    ("unknown-benchmark", with_("evaluation.benchmarks", ["mmlu_pro"]), "plan",
     ["evaluation.benchmarks[0]", "unknown benchmark"]),
]


def write_case(tmp: Path, change: Any) -> Path:
    path = tmp / "spec.yaml"
    if isinstance(change, bytes):
        path.write_bytes(change)
        return path
    data = base(tmp)
    if change == "BAD_PROMPT_SET":
        (tmp / "alpaca.json").write_text('[{"instruction": "Hi"}, {"output": "no instruction"}]')
        data["evaluation"]["prompt_sets"] = [{"name": "alpaca", "path": str(tmp / "alpaca.json")}]
    elif change == "EMPTY_DIR_MODEL":
        (tmp / "empty-model").mkdir()
        data["models"] = [{"name": str(tmp / "empty-model")}]
    elif change is not None:
        change(data)
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("change,mode,fragments", [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_a_bad_input_is_one_clear_error(tmp_path, monkeypatch, capsys, change, mode, fragments):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    spec = write_case(tmp_path, change) if change is not None else tmp_path / "nope.yaml"
    code = sweep_main([str(spec), "--plan"] if mode == "plan" else [str(spec)])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "error: " in err and "Traceback" not in err, err
    # the stage lines before it (e.g. the corpus loaded) are the console's; the error ends it
    err = err[err.index("error: "):]
    for fragment in fragments:
        assert fragment in err, (fragment, err)
    assert len(err.splitlines()) <= 4, err  # a headline and the problem, not a dump
    assert not (tmp_path / "runs").exists()  # nothing claimed, nothing written


def test_the_table_covers_thirty_kinds():
    assert len({case[0] for case in CASES}) >= 30


@pytest.mark.parametrize("argv,fragment", [
    (["--part-rows", "0"], "--part-rows: expected a whole number > 0, got 0"),
    (["--part-rows", "-3"], "--part-rows: expected a whole number > 0, got -3"),
    (["--part-rows", "ten"], "--part-rows: expected a whole number > 0, got 'ten'"),
])
def test_translate_cli_numbers(capsys, argv, fragment):
    with pytest.raises(SystemExit) as info:
        translate_main([str(SPECS / "minimal.yaml"), *argv])
    assert info.value.code == 2
    assert fragment in capsys.readouterr().err


@pytest.mark.parametrize("setting,fragment", [
    ("lr=abc", "override lr='abc': Input should be a valid number"),
    ("lr=.inf", "override lr=inf: Input should be a finite number"),
    ("beta=-1", "override beta=-1: Input should be greater than 0"),
    ("lr", "expected KEY=VALUE"),
    ("nope=1", "unknown override 'nope'"),
])
def test_train_cli_overrides_fail_before_ray(capsys, setting, fragment):
    code = train_main([str(SPECS / "minimal.yaml"), "--model", "builtin:tiny-llama",
                       "--language", "sw", "--method", "clo", "--budget", "8",
                       "--set", setting])
    err = capsys.readouterr().err
    assert code == 2 and fragment in err and "Traceback" not in err, err


def test_train_cli_budget_must_be_positive(capsys):
    with pytest.raises(SystemExit) as info:
        train_main([str(SPECS / "minimal.yaml"), "--model", "builtin:tiny-llama",
                    "--language", "sw", "--method", "clo", "--budget", "0"])
    assert info.value.code == 2
    assert "--budget: expected a whole number > 0, got 0" in capsys.readouterr().err


def test_yaml_merge_keys_are_accepted(tmp_path):
    from clo_ray.spec.schema import load_spec

    data = base(tmp_path)
    text = yaml.safe_dump(data) + (
        "x-stage: &stage {loss: clo, modules: attention, epochs: 1, lr: 1.0e-4}\n"
        "schedules:\n  clo:\n    - <<: *stage\n      lr: 2.0e-4\n")
    path = tmp_path / "merge.yaml"
    path.write_text(text)
    [only] = load_spec(path).schedules["clo"]
    assert only.lr == 2.0e-4 and only.epochs == 1  # own key wins, the rest is merged


def test_a_garbage_spec_record_in_the_run_folder_is_named(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    spec = write_case(tmp_path, None)
    record = tmp_path / "runs" / "minimal" / "spec.yaml"
    record.parent.mkdir(parents=True)
    record.write_bytes(b"\x00\xff{{ not: [yaml")
    code = sweep_main([str(spec)])
    err = capsys.readouterr().err
    assert code == 2 and str(record) in err and "move it aside" in err, err
    assert "Traceback" not in err
    assert record.read_bytes() == b"\x00\xff{{ not: [yaml"  # nothing of the user's is lost


def test_a_failed_start_leaves_the_run_name_free(tmp_path, monkeypatch, capsys):
    """A sweep refused for its corpus has not claimed the run: the corrected spec starts."""
    from clo_ray.layout import RunLayout
    from clo_ray.spec.schema import load_spec
    from clo_ray.sweep.runner import claim_run

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    data = base(tmp_path)
    broken = copy.deepcopy(data)
    broken["corpus"]["path"] = str(tmp_path / "missing.jsonl")
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(broken))
    assert sweep_main([str(path)]) == 2
    assert "missing.jsonl" in capsys.readouterr().err
    fixed = load_spec(data)
    assert RunLayout.of(fixed).read_spec_record() is None
    claim_run(fixed)  # the corrected spec takes the name
    assert RunLayout.of(fixed).read_spec_record() is not None
