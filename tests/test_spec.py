"""The sweep spec: every shipped YAML validates, defaults are documented, and every bad spec
fails before anything expensive with the YAML path, the bad value and the allowed values."""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import pytest
import yaml

from clo_ray.errors import SpecError
from clo_ray.layout import RunLayout
from clo_ray.spec.schema import SweepSpec, check_corpus_size, load_spec, spec_hash
from clo_ray.spec.sections import CORPUS_FORMATS

ROOT = Path(__file__).resolve().parents[1]
SPECS = Path(__file__).resolve().parent / "specs"
SWEEPS = sorted((ROOT / "sweeps").glob("*.yaml"))


def minimal() -> dict[str, Any]:
    return yaml.safe_load((SPECS / "minimal.yaml").read_text())


def error_of(data: dict[str, Any]) -> str:
    with pytest.raises(SpecError) as info:
        load_spec(data)
    return str(info.value)


def stage(**fields: Any) -> dict[str, Any]:
    return {"loss": "clo", "modules": "attention", "epochs": 1, **fields}


# ------------------------------------------------------------------------------ good specs


def test_sweeps_folder_has_the_paper_crpo_and_smoke_specs():
    assert {p.name for p in SWEEPS} >= {"paper.yaml", "smoke.yaml", "crpo.yaml"}


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.name)
def test_every_sweep_yaml_validates(path: Path):
    spec = load_spec(path)
    for method in spec.methods:  # every method's schedules are resolved
        assert all(spec.stages(s) for s in method.schedules or [])


def test_minimal_spec_takes_documented_defaults():
    spec = load_spec(SPECS / "minimal.yaml")
    # relative local paths become absolute (Ray workers run elsewhere), against the cwd
    assert spec.run.storage == os.path.abspath("runs") and spec.run.seed == 0
    assert RunLayout.of(spec).uri == os.path.abspath("runs/minimal")
    assert spec.corpus.format == "auto" and spec.corpus.source_language == "en"
    assert spec.translator.path == "builtin:parallel-sample"  # parallel backend's default
    assert spec.models[0].label == "tiny-llama" and spec.models[0].trust_remote_code is False
    (clo,) = spec.stages("clo")  # the built-in: one stage, the paper's attention-only CLO
    assert (clo.loss, clo.modules, clo.lambda_, clo.beta) == ("clo", ["attention"], 0.5, 0.1)
    assert (clo.epochs, clo.lr, clo.warmup_ratio) == (2, 8e-6, 0.1)
    assert clo.sft_data is None and clo.dpo_variant is None  # not clo fields
    assert spec.search.trials_per_cell == 1 and spec.search.sampler == "tpe"
    assert spec.resources.zero_stage == 0 and spec.resources.precision == "bf16"
    assert spec.train.batch_pairs == 32 and spec.train.lr_scheduler == "linear"
    assert spec.evaluation.holdout == 100 and spec.evaluation.judge.enabled is False
    assert spec.report.formats == ["md", "parquet"]


def test_builtin_methods_and_override():
    data = minimal() | {"methods": ["clo", "sft", "sft_dpo"],
                        "schedules": {"clo": [stage(modules=["attention", "mlp"])]}}
    spec = load_spec(data)
    assert spec.stages("clo")[0].modules == ["attention", "mlp"]  # the spec's own wins
    sft, dpo = spec.stages("sft_dpo")
    assert (sft.loss, sft.sft_data, dpo.loss, dpo.beta) == ("sft", "target", "dpo", 0.1)
    assert [m.schedules for m in spec.methods] == [["clo"], ["sft"], ["sft_dpo"]]


def test_method_with_several_schedules_and_a_schedule_search():
    data = minimal() | {
        "schedules": {"attn": [stage()], "two": [stage(modules="all"), stage(loss="sft",
                                                                          **{"lambda": None})]},
        "methods": [{"name": "clo_mix", "schedules": ["attn", "two"]}],
        "search": {"space": {"schedule": {"type": "categorical", "choices": ["attn", "two"]},
                             "clo.lambda": {"type": "float", "low": 0.2, "high": 0.8},
                             "modules": {"type": "categorical",
                                         "choices": ["attention", ["attention", "mlp"]]},
                             "lr": {"type": "categorical", "choices": ["1e-5", 2e-5]}}},
    }
    spec = load_spec(data)
    assert spec.methods[0].schedules == ["attn", "two"]
    assert spec.search.space["lr"].choices == [1e-5, 2e-5]  # YAML 1.1 reads 1e-5 as a string


def test_dump_revalidates_to_the_same_spec_and_hash():
    spec = load_spec(ROOT / "sweeps" / "paper.yaml")
    again = SweepSpec.model_validate(spec.model_dump(mode="json", by_alias=True))
    assert again == spec and spec_hash(again) == spec_hash(spec)
    changed = minimal() | {"budgets": [17]}
    assert spec_hash(load_spec(changed)) != spec_hash(load_spec(minimal()))
    assert len(spec_hash(spec)) == 16


def test_corpus_formats_match_the_loader():
    formats = pytest.importorskip("clo_ray.data.corpus_formats")
    assert set(CORPUS_FORMATS) == {"auto", *formats.FORMATS}


# ------------------------------------------------------------------------------ bad specs


def _set(path: str, value: Any):
    """A mutation setting a dotted path (``a.b``) of the minimal spec."""
    def apply(data: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        for key in parents:
            data = data.setdefault(key, {})
        data[last] = value
    return apply


def _sched(*stages: dict[str, Any], name: str = "clo", methods: list[Any] | None = None):
    def apply(data: dict[str, Any]) -> None:
        data["schedules"] = {name: list(stages)}
        data["methods"] = methods or [name]
    return apply


BAD = {  # id: (mutation, substrings the message must contain)
    "typo_top_level": (_set("lanugages", ["sw"]),
                       ["lanugages: unknown key (allowed: run, corpus,",
                        "did you mean 'languages'?"]),
    "typo_nested": (_set("run.nmae", "x"),
                    ["run.nmae: unknown key (allowed: name, storage, seed, storage_options; "
                     "did you mean 'name'?)"]),
    "typo_in_stage": (_sched(stage(lamda=0.3)),
                      ["schedules.clo[0].lamda: unknown key", "did you mean 'lambda'?"]),
    "unknown_language": (_set("languages", ["sw", "xx"]),
                         ["languages[1]: unknown language code (got 'xx'; allowed: bn, de, en, id, "
                          "ko, sw, yo, zh)"]),
    "source_as_target": (_set("languages", ["en"]),
                         ["languages[0]: is the corpus's source language ('en')", "got 'en'"]),
    "duplicate_language": (_set("languages", ["sw", "zh", "sw"]),
                           ["languages[2]: listed twice (got 'sw')"]),
    "no_language": (_set("languages", []), ["languages: needs at least one entry (got [])"]),
    "bad_model_ref": (_set("models", [{"name": "builtin:tiny-llama"}, {"name": "llama 2"}]),
                      ["models[1].name: not a model reference (got 'llama 2'; allowed: "
                       "builtin:NAME"]),
    "unknown_builtin_model": (_set("models", [{"name": "builtin:gpt5"}]),
                              ["models[0].name: unknown built-in model (got 'builtin:gpt5'; "
                               "allowed: builtin:smollm2-135m, builtin:tiny-llama"]),
    "duplicate_label": (_set("models", [{"name": "a/m"}, {"name": "b/m"}]),
                        ["models[1].label: label already used", "got 'm'"]),
    "negative_lr": (_sched(stage(lr=-1e-4)),
                    ["schedules.clo[0].lr: input should be greater than 0 (got -0.0001)"]),
    "epochs_and_steps": (_sched(stage(steps=10)),
                         ["schedules.clo[0].steps: set only one of epochs or steps", "got 10"]),
    "neither_epochs_nor_steps": (_sched({"loss": "clo", "modules": "attention"}),
                                 ["schedules.clo[0]: needs epochs or steps"]),
    "stage_without_modules": (_sched(stage(modules=[])),
                              ["schedules.clo[0].modules: stage has no trainable modules "
                               "(got []; allowed: attention, mlp, embeddings, norms, lm_head, "
                               "all)"]),
    "unknown_module_set": (_sched(stage(modules=["attention", "attn"])),
                           ["schedules.clo[0].modules[1]: unknown module set (got 'attn'; "
                            "allowed: attention, mlp"]),
    "lambda_on_sft_stage": (_sched(stage(loss="sft", **{"lambda": 0.3}), name="sft"),
                            ["schedules.sft[0].lambda: does not apply to a 'sft' stage "
                             "(got 0.3; allowed: losses clo)"]),
    "lambda_out_of_range": (_sched(stage(**{"lambda": 1.5})),
                            ["schedules.clo[0].lambda: input should be less than or equal to 1 "
                             "(got 1.5)"]),
    "bad_layers": (_sched(stage(layers=[4, 2])),
                   ["schedules.clo[0].layers: needs 0 <= start < end", "[start, end)"]),
    "unknown_method": (_set("methods", ["clo", "foo"]),
                       ["methods[1]: unknown method (no schedule of this name) (got 'foo'; "
                        "allowed: clo, sft, sft_dpo, crpo, sft_dpo_mono)"]),
    "undefined_schedule": (_set("methods", [{"name": "mine", "schedules": ["clo", "nope"]}]),
                           ["methods[0].schedules[1]: unknown schedule (got 'nope'; allowed: "
                            "clo, sft, sft_dpo, crpo, sft_dpo_mono)"]),
    "duplicate_budget": (_set("budgets", [16, 32, 16]), ["budgets[2]: listed twice (got 16)"]),
    "zero_budget": (_set("budgets", [0, 16]),
                    ["budgets[0]: a budget is a number of training pairs, > 0 (got 0)"]),
    "budget_over_max_rows": (_set("corpus.max_rows", 50),
                             ["budgets[0]: 16 training pairs + evaluation.holdout 100 = 116 "
                              "exceed the 50 rows of corpus.max_rows"]),
    "batch_not_divisible": (lambda d: d.update(train={"batch_pairs": 5, "micro_batch_pairs": 2},
                                               resources={"workers_per_trial": 1}),
                            ["train.batch_pairs: must be divisible by micro_batch_pairs x "
                             "resources.workers_per_trial = 2 x 1 = 2",
                             "(got 5; allowed: multiples of 2)"]),
    "fp16_on_cpu": (_set("resources", {"precision": "fp16"}),
                    ["resources.precision: DeepSpeed refuses fp16 on CPU",
                     "(got 'fp16'; allowed: bf16, fp32)"]),
    "unknown_precision": (_set("resources", {"precision": "fp8"}),
                          ["resources.precision: unsupported value (got 'fp8'; allowed: bf16, "
                           "fp16, fp32)"]),
    "trial_holds_a_gpu": (_set("resources", {"trial_resources": {"GPU": 1}}),
                          ["resources.trial_resources.GPU:", "holds no GPU"]),
    "offload_without_zero": (_set("resources", {"offload": "optimizer"}),
                             ["resources.offload: offloading optimizer needs zero_stage >= 1",
                              "got 'optimizer'"]),
    "param_offload_needs_zero3": (_set("resources", {"offload": "optimizer_and_params",
                                                     "zero_stage": 2}),
                                  ["resources.offload:", "zero_stage >= 3 (zero_stage is 2)"]),
    "bad_storage_scheme": (_set("run.storage", "http://host/runs"),
                           ["run.storage: unsupported storage location (got 'http://host/runs'; "
                            "allowed: a local path, s3://bucket/prefix, gs://bucket/prefix)"]),
    "bad_run_name": (_set("run.name", "my run"), ["run.name: not a valid name (got 'my run'"]),
    "search_bad_key": (_set("search", {"space": {"lrr": {"type": "float", "low": 1, "high": 2}}}),
                       ["search.space.lrr: unknown search parameter (got 'lrr'; allowed: lr, "
                        "beta, lambda"]),
    "search_low_not_below_high": (_set("search", {"space": {"lr": {
        "type": "float", "low": 1e-4, "high": 1e-5}}}),
        ["search.space.lr.low: must be below high (1e-05) (got 0.0001)"]),
    "search_log_low_not_positive": (_set("search", {"space": {"beta": {
        "type": "float", "low": 0, "high": 1, "log": True}}}),
        ["search.space.beta.low: a log distribution needs low > 0 (got 0.0)"]),
    "search_bad_module_choice": (_set("search", {"space": {"modules": {
        "type": "categorical", "choices": ["attention", ["mlp", "ffn"]]}}}),
        ["search.space.modules.choices[1]: must be a module set or a list of them "
         "(got ['mlp', 'ffn'])"]),
    "search_param_for_unused_loss": (lambda d: d.update(
        methods=["sft"], search={"space": {"beta": {"type": "float", "low": 0.05, "high": 0.5}}}),
        ["search.space.beta: no method has a clo/dpo/crpo stage", "(got 'beta'; allowed: lr, "]),
    "template_without_text": (_set("translator", {"backend": "causal", "model": "Qwen/Qwen2.5-3B",
                                                  "prompt_template": "To {target_name}:"}),
                              ["translator.prompt_template: template must contain {text} "
                               "(got 'To {target_name}:'"]),
    "model_on_parallel_translator": (_set("translator.model", "facebook/m2m100_1.2B"),
                                     ["translator.model: does not apply to the 'parallel' "
                                      "backend (got 'facebook/m2m100_1.2B'"]),
    "seq2seq_without_model": (_set("translator", {"backend": "seq2seq"}),
                              ["translator.model: required for the 'seq2seq' backend "
                               "(got null)"]),
    "judge_metric_without_judge": (_set("evaluation", {"objective": {"weights": {
        "judge_win_rate": 1.0}}}),
        ["evaluation.objective.weights.judge_win_rate: not a metric this evaluation computes "
         "(judge metrics need judge.enabled"]),
    "unknown_corpus_format": (_set("corpus.format", "csv"),
                              ["corpus.format: unsupported value (got 'csv'; allowed: auto, "
                               "alpaca, sharegpt, messages, prompt_response, oasst1, parallel, "
                               "ultrafeedback, preference)"]),
    "missing_section": (lambda d: d.pop("budgets"), ["budgets: required key missing"]),
}


@pytest.mark.parametrize("mutate,expected", BAD.values(), ids=BAD.keys())
def test_bad_spec_names_path_value_and_allowed(mutate, expected):
    data = copy.deepcopy(minimal())
    mutate(data)
    message = error_of(data)
    for part in expected:
        assert part in message, f"{part!r} not in:\n{message}"
    assert "1 problem" in message  # exactly the one problem introduced


def test_several_problems_are_reported_together():
    data = minimal()
    data["run"]["nmae"] = "x"
    data["languages"] = ["sw", "xx"]
    data["resources"] = {"zero_stage": 5}
    data["models"] = [{"name": "llama 2"}]
    message = error_of(data)
    assert "4 problems" in message
    lines = message.splitlines()[1:]
    assert [line.split(":")[0].strip() for line in lines] == [
        "run.nmae", "languages[1]", "models[0].name", "resources.zero_stage"]


def test_yaml_syntax_error_names_file_and_line():
    with pytest.raises(SpecError, match=r"syntax_error\.yaml: invalid YAML at line 7"):
        load_spec(SPECS / "syntax_error.yaml")


def test_duplicate_yaml_key_is_an_error():
    with pytest.raises(SpecError, match=r"duplicate_key\.yaml: .*line 9.*duplicate key 'budgets'"):
        load_spec(SPECS / "duplicate_key.yaml")


def test_missing_file_and_non_mapping(tmp_path: Path):
    with pytest.raises(SpecError, match="not found"):
        load_spec(tmp_path / "nope.yaml")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(SpecError, match="top level must be a mapping"):
        load_spec(tmp_path / "list.yaml")


def test_check_corpus_size_names_the_budget():
    spec = load_spec(minimal() | {"budgets": [16, 64, 200]})
    check_corpus_size(spec, 300, "corpus.jsonl")  # 200 + 100 holdout fits exactly
    with pytest.raises(SpecError) as info:
        check_corpus_size(spec, 250, "corpus.jsonl")
    message = str(info.value)
    assert "budgets[2]: 200 training pairs + evaluation.holdout 100 = 300 exceed the 250 rows " \
           "of corpus corpus.jsonl (got 200; allowed: at most 150)" in message
    assert "budgets[0]" not in message and "budgets[1]" not in message
