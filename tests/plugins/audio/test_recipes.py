"""The audio recipes build, train 2 steps and sample with tiny overrides (a few espeak-ng digits
at 8 kHz, the tiny model preset, a 2-step codec fit), so they cannot rot; the mel recipes
differ only in the objective."""

from __future__ import annotations

import shutil

import attrs
import pytest
import torch

from selfflow.registry import compose

pytest.importorskip("soundfile", reason="the audio recipes read WAVs with soundfile: pip install 'selfflow[audio]'")
pytest.importorskip("soxr", reason="spoken digits are resampled with soxr: pip install 'selfflow[audio]'")
if shutil.which("espeak-ng") is None:
    pytest.skip("audio/spoken-digits speaks with espeak-ng (Debian package espeak-ng)", allow_module_level=True)

pytestmark = pytest.mark.usefixtures("one_thread_module")

RECIPES = ("audio/spoken-digits-selfflow", "audio/spoken-digits-fm", "audio/spoken-digits-encodec")
RATE = 8000
TINY = [
    "output.progress=false",
    'model.preset="tiny"',
    "run.steps=2",
    "run.batch_size=4",
    f"modalities.audio.dataset_options={{sample_rate = {RATE}, seconds = 0.5, train_per_class = 1, "
    "eval_per_class = 1}",
    "sampler.options={steps = 2}",
    "output.sample_every=0",
    "output.checkpoint_every=0",
    "output.samples=false",
]
TOKENIZER = {
    "audio/mel": f"modalities.audio.tokenizer_options={{sample_rate = {RATE}, griffin_lim_iters = 2}}",
    "audio/encodec": "modalities.audio.tokenizer_options={n_filters = 4, dimension = 8, steps = 2, batch_size = 2, "
    "crop_seconds = 0.1, stft_scales = [64, 128], holdout = 2, stats_items = 8}",
}


def test_the_mel_recipes_differ_only_in_the_objective() -> None:
    a, b = (compose.resolve_config(name) for name in RECIPES[:2])
    assert attrs.evolve(b, run=a.run, objective=a.objective) == a
    assert a.objective.name == "self-flow" and b.objective.name == "flow-matching"
    audio = a.modalities["audio"]
    assert audio.tokenizer == "audio/mel" and audio.mask_ratio == 0.50 and a.model.class_conditional
    assert a.streams[0].dataset == "audio/spoken-digits" and a.sampler.cfg_scale == 2.0
    c = compose.resolve_config(RECIPES[2])
    assert c.modalities["audio"].tokenizer == "audio/encodec" and c.objective.name == "self-flow"
    assert a.model.abs_pos == c.model.abs_pos == "sincos"  # absolute time (docs/audio.md#positions)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("audio-recipes-cache")  # the digits are rendered once for all three


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_trains_two_steps_and_samples_clips(name: str, tmp_path, monkeypatch, cache) -> None:
    from selfflow.registry.sampling import sample

    monkeypatch.setenv("SELFFLOW_CACHE", str(cache))
    tokenizer = compose.resolve_config(name).modalities["audio"].tokenizer
    cfg = compose.resolve_config(name, overrides=[*TINY, TOKENIZER[tokenizer]])
    run = compose.build_run(cfg, out_dir=tmp_path / "run")
    tok = run.tokenizers["audio"]
    assert tok.mask_ratio == 0.50 and getattr(tok, "fitted", True)
    history = run.train()
    assert run.state.step == 2 and all(torch.isfinite(torch.tensor(h["loss"])) for h in history if "loss" in h)
    labels = run.streams["audio/spoken-digits"].encoded.labels[:3]
    clips = sample(run, labels, n=3, seed=0)["audio"]
    assert clips.ndim == 3 and clips.shape[:2] == (3, 1) and clips.shape[-1] >= RATE // 2
    assert clips.min() >= -1 and clips.max() <= 1
    files = run.writers["audio"].write(clips, tmp_path / "samples", stem="t", labels=["a", "b", "c"], title=name)
    assert any(f.element == "audio" for f in files) and all(f.path.is_file() for f in files)
