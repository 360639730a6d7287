from __future__ import annotations

from pathlib import Path

import pytest
import torch

from selfflow.registry import compose
from selfflow.registry.config import ConfigError, load_config, parse_override, to_toml

BASE = """
[run]
name = "t"
steps = 10
[modalities.image]
dataset = "image/digits"
tokenizer = "image/patch"
"""


def test_defaults_and_overrides():
    cfg = load_config(
        BASE,
        [
            "objective.gamma=0.5",
            'model.preset="tiny"',
            "sampler.options={steps = 7}",
            "objective.attention_separation=true",
            "modalities.image.mask_ratio=0.1",
        ],
    )
    assert cfg.objective.gamma == 0.5 and cfg.model.preset == "tiny" and cfg.sampler.options == {"steps": 7}
    assert cfg.objective.attention_separation is True and cfg.modalities["image"].mask_ratio == 0.1
    assert cfg.ema.decay == 0.9999 and cfg.optimizer.grad_clip == 1.0  # core.distill.EMAConfig's default


@pytest.mark.parametrize(
    "override, message",
    [
        ("objective.gama=0.5", "'objective.gama': unknown key; did you mean 'objective.gamma'"),
        ('objective.gamma="high"', "'objective.gamma': expected a number"),
        ("run.steps=0", "'run.steps'"),
        ("modalities.image.mask_ratio=0.7", "'modalities.image.mask_ratio'"),
        ('modalities.image.mask_unit="patch"', "'modalities.image.mask_unit'"),
        ('objective.teacher_rule="max"', "'objective.teacher_rule': expected one of ['min', 'gap']"),
        ("optimizer.lr=-1", "'optimizer.lr'"),
        ("run.batch_size=true", "'run.batch_size': expected an integer"),
        ("runn.steps=3", "'runn': unknown key; did you mean 'run'"),
    ],
)
def test_errors_name_the_key_and_the_fix(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(BASE, [override])
    assert message in str(err.value)


def test_missing_required_key_and_bad_toml():
    with pytest.raises(ConfigError, match="'modalities.image.tokenizer': required"):
        load_config('[modalities.image]\ndataset = "image/digits"\n')
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config("[run\n")
    with pytest.raises(ConfigError, match="no \\[modalities.NAME\\] table"):
        load_config("[run]\nsteps = 3\n")


def test_override_values_are_toml_with_string_fallback():
    assert parse_override("a.b=[1, 2]") == (["a", "b"], [1, 2])
    assert parse_override("a=ode/heun") == (["a"], "ode/heun")
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_override("nothing")


def test_resolved_config_round_trips_through_toml():
    cfg = load_config(BASE, ["sampler.options={steps = 7}", "objective.max_gap=0.2"])
    again = load_config(to_toml(cfg))
    assert again == cfg


REPO = Path(__file__).resolve().parents[2]

# recipes whose full-size build fits a video VAE or an audio codec and renders thousands of clips
# (minutes on a CPU): each is built, trained 2 steps and sampled with tiny overrides in
# tests/plugins/video/test_recipes.py and tests/plugins/audio/test_recipes.py
BUILT_SMALL_ELSEWHERE = ("video/", "audio/")


def test_every_registered_run_builds(tmp_path, monkeypatch):
    monkeypatch.setenv("SELFFLOW_CACHE", str(tmp_path / "cache"))
    regs = compose.default_registries()
    assert {"image/mnist-selfflow", "image/mnist-fm", "debug"} <= set(regs.runs.names())
    for entry in regs.runs:
        cfg = compose.resolve_config(entry.name, overrides=["output.progress=false"])
        compose.check_names(regs, cfg)  # every registry name of every recipe resolves
        if entry.name.startswith(BUILT_SMALL_ELSEWHERE):
            modality = entry.name.split("/")[0]
            listed = (REPO / "tests" / "plugins" / modality / "test_recipes.py").read_text()
            assert f'"{entry.name}"' in listed, f"{entry.name} is not built by tests/plugins/{modality}/test_recipes.py"
            continue
        run = compose.build_run(cfg, out_dir=tmp_path / entry.name.replace("/", "-"))
        assert run.state.step == 0 and run.teacher.num_parameters() > 0
        batch = run.loop.source.next_batch()
        assert batch.batch_size == cfg.run.batch_size // cfg.run.grad_accum


def test_default_and_baseline_recipes_differ_only_in_the_objective():
    a = compose.resolve_config("image/mnist-selfflow")
    b = compose.resolve_config("image/mnist-fm")
    import attrs

    assert attrs.evolve(b, run=a.run, objective=a.objective) == a
    assert a.objective.name == "self-flow" and b.objective.name == "flow-matching"


def test_optimizer_fused_switch_picks_the_kernel_and_both_train_alike(tmp_path, single_thread):
    """``optimizer.fused`` chooses torch's fused AdamW or the foreach one; the two are the same
    update up to float rounding, so a few steps from the same seed end at the same weights."""
    runs = {}
    for fused in (True, False):
        cfg = compose.resolve_config(
            "debug", overrides=["output.progress=false", f"optimizer.fused={str(fused).lower()}", "run.steps=3"]
        )
        run = compose.build_run(cfg, out_dir=tmp_path / f"fused-{fused}")
        assert run.state.optimizer.defaults["fused"] is (True if fused else None)
        assert run.state.optimizer.defaults["foreach"] is (None if fused else True)
        run.loop.run()
        runs[fused] = run
    for a, b in zip(runs[True].state.model.parameters(), runs[False].state.model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
