"""Stages: after a stage only the selected parameters changed, frozen ones are bit-identical,
and the optimizer holds only what trains. Plain torch on builtin:tiny-llama (no Ray)."""

import pytest
import torch

from clo_ray.models.resolve import resolve_model
from clo_ray.models.selectors import select_parameters
from clo_ray.spec.training import StageSpec
from clo_ray.train.losses import sequence_logps
from clo_ray.train.schedule import (
    ScheduleError,
    apply_overrides,
    build_lr_scheduler,
    build_optimizer,
    finish_stage,
    needs_reference,
    prepare_stage_model,
    stage_steps,
    trainable_parameters,
)


@pytest.fixture(scope="module")
def tiny_path():
    return resolve_model("builtin:tiny-llama")


def _model(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def _stage(**fields):
    return StageSpec.model_validate({"loss": "sft", "modules": ["attention"], "steps": 2,
                                     **fields})


def _run_stage(path, stage, steps=2):
    """Train a stage for a few AdamW steps; return (base state, final state, model, optimizer)."""
    model = _model(path)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model = prepare_stage_model(model, stage)
    optimizer = build_optimizer(model, lr=1e-2)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(10, 2000, (4, 24), generator=generator)
    mask = torch.ones_like(ids)
    for _ in range(steps):
        logps, n = sequence_logps(model(input_ids=ids).logits, ids, mask)
        loss = -logps.sum() / n.sum()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    trainable = {id(p) for _, p in trainable_parameters(model)}
    assert in_optimizer == trainable, "the optimizer must hold exactly the trainable parameters"
    model = finish_stage(model)
    return before, {k: v.clone() for k, v in model.state_dict().items()}, model


def _changed(before, after):
    assert before.keys() == after.keys()
    return {k for k in before if not torch.equal(before[k], after[k])}


@pytest.mark.parametrize("modules,layers,pattern", [
    (["attention"], None, r"self_attn\.[qkvo]_proj"),
    (["mlp"], None, r"mlp\.(gate|up|down)_proj"),
    (["attention"], (1, 2), r"layers\.1\.self_attn\.[qkvo]_proj"),
    (["embeddings"], None, r"embed_tokens"),
])
def test_only_selected_parameters_change(tiny_path, modules, layers, pattern):
    import re

    before, after, model = _run_stage(tiny_path, _stage(modules=modules, layers=layers))
    expected = {k for k in before if re.search(pattern, k)}
    assert expected
    assert _changed(before, after) == expected  # selected all changed, frozen bit-identical
    assert set(select_parameters(model, modules, layers=layers)) == expected


def test_lora_stage_changes_only_its_targets(tiny_path):
    stage = _stage(modules=["attention"], lora={"r": 4, "alpha": 8, "dropout": 0.0})
    before, after, model = _run_stage(tiny_path, stage)
    attention = {k for k in before if "self_attn" in k}
    assert _changed(before, after) == attention  # merged adapters moved q/k/v/o, nothing else
    assert type(model).__name__ == "LlamaForCausalLM"  # merged back into a plain model
    assert not any("lora" in k for k in after)


def test_lora_trains_only_adapters(tiny_path):
    stage = _stage(modules=["mlp"], layers=(0, 1), lora={"r": 2, "alpha": 4, "dropout": 0.0})
    model = prepare_stage_model(_model(tiny_path), stage)
    names = [n for n, _ in trainable_parameters(model)]
    assert names and all("lora_" in n and "layers.0.mlp" in n for n in names)
    assert len(names) == 2 * 3  # A and B for gate/up/down of layer 0


def test_lora_on_norms_is_refused(tiny_path):
    with pytest.raises(ScheduleError, match="LoRA cannot adapt"):
        prepare_stage_model(_model(tiny_path), _stage(modules=["norms"], lora={"r": 2}))


def test_stage_steps_from_epochs_or_steps():
    assert stage_steps(_stage(steps=7), n_pairs=100, batch_pairs=8) == 7
    epochs = StageSpec.model_validate({"loss": "clo", "modules": ["attention"], "epochs": 2})
    assert stage_steps(epochs, n_pairs=100, batch_pairs=8) == 25  # ceil(200 / 8)
    half = epochs.model_copy(update={"epochs": 0.01})
    assert stage_steps(half, n_pairs=100, batch_pairs=8) == 1
    assert needs_reference(epochs) and not needs_reference(_stage())


def test_overrides_apply_to_the_stages_that_take_them():
    sft = _stage(lr=1e-5)
    dpo = StageSpec.model_validate({"loss": "dpo", "modules": ["all"], "epochs": 1})
    out = apply_overrides([sft, dpo], {"lr": 3e-4, "dpo.beta": 0.3, "steps": 5})
    assert [s.lr for s in out] == [3e-4, 3e-4]
    assert out[1].beta == 0.3 and out[0].beta is None
    assert [s.steps for s in out] == [5, 5] and out[1].epochs is None
    assert sft.lr == 1e-5  # inputs untouched
    with pytest.raises(ScheduleError, match="applies to no stage"):
        apply_overrides([sft], {"beta": 0.2})
    with pytest.raises(ScheduleError, match="unknown override"):
        apply_overrides([sft], {"learning_rate": 0.2})
    clo = StageSpec.model_validate({"loss": "clo", "modules": ["attention"], "steps": 1})
    assert apply_overrides([clo], {"lambda": 0.2, "modules": "mlp"})[0].lambda_ == 0.2


def test_lr_schedule_warms_up_then_decays():
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([param], lr=1.0)
    scheduler = build_lr_scheduler(optimizer, "linear", total_steps=10, warmup_ratio=0.2)
    lrs = []
    for _ in range(10):
        lrs.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    assert lrs[:3] == [0.0, 0.5, 1.0] and lrs[-1] == pytest.approx(0.125)


def test_effective_beta_is_the_schedules_or_the_searched_one():
    """What the held-out reward margin is measured with (tune/trainable.py): the last clo /
    dpo stage's beta after search overrides; 0.1 for a method without one."""
    from clo_ray.spec.schema import load_spec
    from clo_ray.train.schedule import preference_beta
    from clo_ray.train.trainer import method_stages

    spec = load_spec({
        "run": {"name": "beta", "storage": "runs"},
        "corpus": {"path": "builtin:parallel-sample", "format": "parallel"},
        "translator": {"backend": "parallel", "path": "builtin:parallel-sample"},
        "languages": ["sw"], "models": [{"name": "builtin:tiny-llama"}],
        "schedules": {"clo": [{"loss": "clo", "modules": "attention", "steps": 2,
                               "beta": 0.5}]},
        "methods": ["clo", "sft", "sft_dpo"], "budgets": [8],
    })
    assert preference_beta(method_stages(spec, "clo")) == 0.5
    assert preference_beta(method_stages(spec, "clo", {"beta": 0.3})) == 0.3
    assert preference_beta(method_stages(spec, "sft_dpo")) == 0.1
    assert preference_beta(method_stages(spec, "sft_dpo", {"dpo.beta": 0.7})) == 0.7
    assert preference_beta(method_stages(spec, "sft")) == 0.1
