"""video/vae: exact causality of the real module (float32), 1 + 4k -> 1 + k shapes, one image =
one latent frame, positions on the shared time axis, latent statistics, cache, resumable
fits (bit-identical to an uninterrupted fit), checkpoints and bad inputs.

Fits run on a tiny synthetic set of moving squares (8x8, 5 frames) with a tiny network.
"""

from __future__ import annotations

import math

import attrs
import pytest
import torch
import torch.nn.functional as F

from selfflow.core.types import time_ticks
from selfflow.plugins.protocols import Example, Tokenizer
from selfflow.plugins.video import vae as vae_mod
from selfflow.plugins.video.vae import FitSource, VideoVAEConfig, VideoVAETokenizer, latent_grid
from selfflow.plugins.video.vae_net import (
    CausalVideoAutoencoder,
    FrameNorm,
    down_steps,
    pixel_shuffle,
    pixel_unshuffle,
)

pytestmark = pytest.mark.usefixtures("one_thread_module")


class Squares:
    """Deterministic clips ``(1, T, S, S)`` in [-1, 1]: a bright square moving one pixel per
    frame in one of four directions (label = direction)."""

    modalities = ("video",)
    num_classes = 4
    class_names = ("→", "←", "↓", "↑")
    fps = 10.0

    def __init__(self, n: int = 12, frames: int = 5, size: int = 8, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.clips, self.labels = [], []
        moves = ((0, 1), (0, -1), (1, 0), (-1, 0))
        for i in range(n):
            d = i % 4
            y0, x0 = (int(v) for v in torch.randint(2, size - 4, (2,), generator=g))
            clip = -torch.ones(1, frames, size, size)
            for f in range(frames):
                y, x = (y0 + moves[d][0] * f) % (size - 2), (x0 + moves[d][1] * f) % (size - 2)
                clip[0, f, y : y + 2, x : x + 2] = 1.0
            self.clips.append(clip)
            self.labels.append(d)
        self.tag = f"squares-{n}-{frames}-{size}-{seed}"

    def __len__(self) -> int:
        return len(self.clips)

    def __getitem__(self, i: int) -> Example:
        return Example(media={"video": self.clips[i]}, label=self.labels[i])

    def fingerprint(self) -> str:
        return self.tag


TINY = VideoVAEConfig(
    base_channels=8, latent_channels=4, mid_blocks=1, steps=4, batch_size=4, holdout=2, stats_items=16, progress=False
)


def _fitted(config: VideoVAEConfig = TINY, data=None, cache_dir=None) -> VideoVAETokenizer:
    tok = VideoVAETokenizer(config)
    tok.fit(data or Squares(), cache_dir=cache_dir)
    return tok


# ---------------------------------------------------------------- causality (the real default module, float32)


def _replace_after(x: torch.Tensor, frame: int, seed: int) -> torch.Tensor:
    y = x.clone()
    y[:, :, frame + 1 :] = torch.rand(y[:, :, frame + 1 :].shape, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    return y


@pytest.mark.parametrize(
    ("downsample", "conv", "pixel_patch"),
    [(4, "3d", 1), (8, "3d", 1), (4, "2+1d", 1), (8, "2+1d", 1), (4, "3d", 2), (4, "3d", 4), (8, "3d", 4)],
)
def test_encoder_and_decoder_are_exactly_causal(downsample: int, conv: str, pixel_patch: int) -> None:
    """Replacing the frames after chunk j leaves latent frames <= j, and decoded frames <= 4j,
    bit-identical (torch.equal), for every j, in float32, with the default architecture
    (full and factorised kernels, with and without the pixel patchify, including a network with
    no spatial step left: ``pixel_patch = downsample = 4``)."""
    torch.manual_seed(0)
    net = CausalVideoAutoencoder(
        video_channels=1,
        base_channels=16,
        downsample=downsample,
        latent_channels=8,
        conv=conv,
        pixel_patch=pixel_patch,
    ).eval()
    x = torch.rand(2, 1, 17, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        z = net.encode(x)[0]
        recon = net.decode(z)
        assert z.shape == (2, 8, 5, 32 // downsample, 32 // downsample)
        for j in range(5):
            y = _replace_after(x, 4 * j, seed=j)
            z2 = net.encode(y)[0]
            assert torch.equal(z2[:, :, : j + 1], z[:, :, : j + 1]), f"latent frames <= {j} changed"
            if j < 4:
                assert not torch.equal(z2[:, :, j + 1 :], z[:, :, j + 1 :])  # the later ones do see the change
            assert torch.equal(net.decode(z2)[:, :, : 4 * j + 1], recon[:, :, : 4 * j + 1]), f"frames <= {4 * j}"
            # the decoder alone: later latent frames never reach earlier decoded frames
            zz = z.clone()
            zz[:, :, j + 1 :] = torch.randn(zz[:, :, j + 1 :].shape, generator=torch.Generator().manual_seed(9 + j))
            assert torch.equal(net.decode(zz)[:, :, : 4 * j + 1], recon[:, :, : 4 * j + 1])


def test_the_pixel_patchify_is_an_exact_per_frame_regrouping() -> None:
    """``pixel_unshuffle`` folds each frame's p x p blocks into channels (channel ``c p p + i p +
    j`` is pixel ``(i, j)`` of the block) and ``pixel_shuffle`` inverts it exactly; the down
    steps always halve time twice, spatially only what the patchify left."""
    x = torch.randn(2, 3, 5, 8, 12)
    for p in (1, 2, 4):
        y = pixel_unshuffle(x, p)
        assert y.shape == (2, 3 * p * p, 5, 8 // p, 12 // p)
        assert torch.equal(pixel_shuffle(y, p), x)
    y = pixel_unshuffle(x, 2)
    assert torch.equal(y[:, 1 * 4 + 1 * 2 + 0, :, 2, 3], x[:, 1, :, 2 * 2 + 1, 2 * 3 + 0])
    assert down_steps(4) == [(True, True), (True, True)]
    assert down_steps(8) == [(True, False), (True, True), (True, True)]
    assert down_steps(4, 2) == [(True, True), (False, True)]
    assert down_steps(4, 4) == [(False, True), (False, True)]
    with pytest.raises(ValueError, match="pixel_patch must be 1, 2 or 4"):
        CausalVideoAutoencoder(video_channels=1, base_channels=8, downsample=4, latent_channels=4, pixel_patch=8)


def test_a_groupnorm_over_time_would_break_causality(monkeypatch) -> None:
    """The test above can see a leak: with an ordinary GroupNorm over (C, T, H, W) the first
    latent frame depends on the last video frame."""
    monkeypatch.setattr(FrameNorm, "forward", torch.nn.GroupNorm.forward)
    torch.manual_seed(0)
    net = CausalVideoAutoencoder(video_channels=1, base_channels=8, downsample=4, latent_channels=4).eval()
    x = torch.rand(1, 1, 9, 16, 16) * 2 - 1
    with torch.no_grad():
        assert not torch.equal(net.encode(_replace_after(x, 4, 0))[0][:, :, :1], net.encode(x)[0][:, :, :1])


def test_default_config_is_the_calibrated_size() -> None:
    tok = VideoVAETokenizer()
    assert isinstance(tok, Tokenizer)
    assert tok.mask_ratio == 0.10 and tok.channels == 8
    assert 1.0e6 < tok.num_parameters < 1.4e6  # the pilot: 1.2M parameters, 4x / 4x, 8 channels


# ---------------------------------------------------------------- shapes and positions


@pytest.fixture(scope="module")
def tiny() -> VideoVAETokenizer:
    return _fitted()


@pytest.mark.parametrize("k", [0, 1, 2, 3])
def test_one_plus_4k_frames_make_one_plus_k_latent_frames(tiny: VideoVAETokenizer, k: int) -> None:
    x = torch.rand(3, 1, 1 + 4 * k, 8, 8) * 2 - 1
    seg = tiny.encode(x)
    assert seg.tokens.shape == (3, (1 + k) * 2 * 2, 4)
    assert latent_grid(seg) == (1 + k, 2, 2)
    t = seg.positions[0, :, 0].reshape(1 + k, 4)[:, 0]
    assert torch.equal(t, time_ticks(4 * torch.arange(1 + k), 10.0))  # latent frame j stands for frame 4j
    assert torch.equal(seg.positions[0, :4, 1:], torch.tensor([[0, 0], [0, 1], [1, 0], [1, 1]]))
    assert tiny.decode(seg).shape == x.shape


def test_an_image_is_a_one_frame_video(tiny: VideoVAETokenizer) -> None:
    image = torch.rand(2, 1, 8, 8) * 2 - 1
    seg = tiny.encode(image)
    assert seg.num_tokens == 4 and bool((seg.positions[..., 0] == 0).all())
    assert torch.equal(seg.tokens, tiny.encode(image[:, :, None]).tokens)
    assert tiny.decode(seg).shape == (2, 1, 1, 8, 8)


def test_first_frame_encodes_on_its_own(tiny: VideoVAETokenizer) -> None:
    """Latent frame 0 of a clip is the encoding of its first frame as an image.

    To float32 rounding, not bit for bit: a 17-frame and a 1-frame input are different
    convolution shapes, for which the CPU backend may pick different algorithms that sum in
    another order (seen on one machine of this kind: 7e-7 apart on values up to 2, i.e. a few
    ulps). The bit-exact causal property, which compares equal shapes, is
    ``test_encoder_and_decoder_are_exactly_causal``."""
    x = Squares()[0].media["video"][None]
    clip, image = tiny.encode(x).tokens[:, :4], tiny.encode(x[:, :, 0]).tokens
    ulp = torch.finfo(torch.float32).eps * float(image.abs().max())
    torch.testing.assert_close(clip, image, rtol=0.0, atol=8 * ulp)


def test_latents_are_standardised_per_channel() -> None:
    data = Squares(n=12)
    tok = _fitted(attrs.evolve(TINY, stats_items=100), data)  # all 10 training clips
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(0))
    train = torch.stack([data[int(i)].media["video"] for i in order[2:]])
    tokens = tok.encode(train).tokens.reshape(-1, 4).double()
    assert torch.allclose(tokens.mean(0), torch.zeros(4, dtype=torch.float64), atol=1e-4)
    assert torch.allclose(tokens.std(0, unbiased=False), torch.ones(4, dtype=torch.float64), atol=1e-3)


def test_reconstruction_beats_the_black_baseline_after_a_short_fit() -> None:
    tok = _fitted(attrs.evolve(TINY, steps=60, lr=3e-3, holdout=4), Squares(n=24))
    m = tok.metrics
    assert m.items == 4 and m.steps == 60
    assert m.psnr > m.black_psnr and m.mse_ratio_black < 1.0
    assert math.isclose(m.black_psnr, 10 * math.log10(4 / m.mse * m.mse_ratio_black), rel_tol=1e-6)
    x = torch.stack([Squares(n=24)[i].media["video"] for i in range(4)])
    recon = tok.decode(tok.encode(x))
    assert recon.shape == x.shape and recon.min() >= -1 and recon.max() <= 1


# ---------------------------------------------------------------- cache, resume, checkpoint


def test_cache_is_reused_and_the_weights_file_is_a_checkpoint(tmp_path) -> None:
    a = _fitted(cache_dir=str(tmp_path))
    assert a.source is FitSource.TRAINED and a.path.is_file() and a.cache_key() is not None
    assert not (a.path.parent / "partial").exists()
    b = _fitted(cache_dir=str(tmp_path))
    assert b.source is FitSource.CACHE and b.cache_key() == a.cache_key()
    x = Squares()[1].media["video"][None]
    assert torch.equal(a.encode(x).tokens, b.encode(x).tokens)
    c = VideoVAETokenizer.from_checkpoint(a.path)
    assert c.source is FitSource.CHECKPOINT and c.fps == 10.0 and c.metrics == a.metrics
    assert torch.equal(c.encode(x).tokens, a.encode(x).tokens)
    d = VideoVAETokenizer(attrs.evolve(TINY, checkpoint=str(a.path)))
    d.fit(Squares(n=5, seed=3))  # other data: a checkpoint never trains
    assert d.source is FitSource.CHECKPOINT and torch.equal(d.encode(x).tokens, a.encode(x).tokens)
    e = _fitted(attrs.evolve(TINY, lr=1e-3), cache_dir=str(tmp_path))  # a weight-changing field: a new entry
    assert e.source is FitSource.TRAINED and e.path != a.path
    f = _fitted(attrs.evolve(TINY, fps=25.0), cache_dir=str(tmp_path))  # positions only: same weights
    assert f.source is FitSource.CACHE and f.cache_key() != a.cache_key()


def test_an_interrupted_fit_resumes_bit_identically(tmp_path, monkeypatch) -> None:
    config = attrs.evolve(TINY, steps=6, partial_every=2)
    reference = _fitted(config, cache_dir=str(tmp_path / "a"))

    calls = {"n": 0}
    gather = vae_mod._gather

    def interrupt_at_step_5(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return gather(*args, **kwargs)

    monkeypatch.setattr(vae_mod, "_gather", interrupt_at_step_5)
    with pytest.raises(KeyboardInterrupt):
        _fitted(config, cache_dir=str(tmp_path / "b"))
    monkeypatch.setattr(vae_mod, "_gather", gather)
    partial = list((tmp_path / "b").rglob("partial/state.safetensors"))
    assert len(partial) == 1  # written at step 4
    resumed = _fitted(config, cache_dir=str(tmp_path / "b"))
    assert resumed.source is FitSource.RESUMED and not partial[0].exists()
    for (k, v), (k2, v2) in zip(reference.net.state_dict().items(), resumed.net.state_dict().items()):
        assert k == k2 and torch.equal(v, v2), k
    assert torch.equal(reference.shift, resumed.shift)
    assert _fitted(config, cache_dir=str(tmp_path / "b")).source is FitSource.CACHE


def test_an_unreadable_partial_checkpoint_restarts_with_a_warning(tmp_path) -> None:
    tok = VideoVAETokenizer(TINY)
    key = tok.fit_key(Squares())
    partial = tmp_path / "video-vae" / key / "partial" / "state.safetensors"
    partial.parent.mkdir(parents=True)
    partial.write_bytes(b"not a safetensors file")
    with pytest.warns(UserWarning, match="partial checkpoint"):
        tok.fit(Squares(), cache_dir=str(tmp_path))
    assert tok.source is FitSource.TRAINED


def test_a_corrupt_cache_is_retrained_with_a_warning(tmp_path) -> None:
    a = _fitted(cache_dir=str(tmp_path))
    a.path.write_bytes(b"garbage")
    tok = VideoVAETokenizer(TINY)
    with pytest.warns(UserWarning, match="unreadable cache"):
        tok.fit(Squares(), cache_dir=str(tmp_path))
    assert tok.source is FitSource.TRAINED


# ---------------------------------------------------------------- bad inputs


def test_bad_inputs_name_the_fix(tiny: VideoVAETokenizer, tmp_path) -> None:
    with pytest.raises(ValueError, match=r"1 \+ 4k frames; got 6 \(use 5 or 9 frames\)"):
        tiny.encode(torch.zeros(1, 1, 6, 8, 8))
    with pytest.raises(ValueError, match="video_channels = 3"):
        tiny.encode(torch.zeros(1, 3, 5, 8, 8))
    with pytest.raises(ValueError, match="divisible by 4"):
        tiny.encode(torch.zeros(1, 1, 5, 10, 8))
    with pytest.raises(TypeError, match="tensor batch"):
        tiny.encode([torch.zeros(1, 5, 8, 8)])
    with pytest.raises(RuntimeError, match="not fitted"):
        VideoVAETokenizer(TINY).encode(torch.zeros(1, 1, 5, 8, 8))
    seg = tiny.encode(torch.zeros(1, 1, 5, 8, 8))
    with pytest.raises(ValueError, match="decodes 4-channel tokens"):
        tiny.decode(seg.with_tokens(torch.zeros(1, 8, 5)))

    class NoFps(Squares):
        fps = None

    with pytest.raises(ValueError, match="set tokenizer_options.fps"):
        VideoVAETokenizer(TINY).fit(NoFps())
    with pytest.raises(ValueError, match="'video_channels' must be in"):
        VideoVAEConfig(video_channels=2)
    with pytest.raises(ValueError, match="multiple of 8"):
        VideoVAEConfig(base_channels=12)
    with pytest.raises(ValueError, match="'loss' must be in"):
        VideoVAEConfig(loss="l2")
    assert VideoVAETokenizer(attrs.evolve(TINY, loss="l1")).fit_key(Squares()) != tiny.fit_key(Squares())
    with pytest.raises(FileNotFoundError, match="does not exist"):
        VideoVAETokenizer.from_checkpoint(tmp_path / "missing.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"x" * 16)
    with pytest.raises(ValueError, match="not a readable video/vae file"):
        VideoVAETokenizer.from_checkpoint(bad)
    a = _fitted(cache_dir=str(tmp_path))
    with pytest.raises(ValueError, match="latent_channels=4 but the video/vae config says latent_channels=8"):
        VideoVAETokenizer(attrs.evolve(TINY, latent_channels=8, checkpoint=str(a.path))).fit(Squares())


def test_fit_leaves_the_global_rng_alone(global_rng_untouched) -> None:
    with global_rng_untouched():
        _fitted()


def test_sampled_latents_are_never_cached(tiny: VideoVAETokenizer) -> None:
    assert VideoVAETokenizer(attrs.evolve(TINY, sample=True)).cache_key() is None
    assert tiny.cache_key() is not None
    assert F.mse_loss(tiny.decode(tiny.encode(torch.zeros(1, 1, 5, 8, 8))), torch.zeros(1, 1, 5, 8, 8)) >= 0


def test_latent_patches_are_a_lossless_regrouping(tmp_path) -> None:
    """patch=2: one token per 2x2 latent positions (4x the channels, 1/4 the tokens); decoding
    gives exactly what patch=1 decodes; the weights (cache entry) are shared."""
    one = _fitted(attrs.evolve(TINY, holdout=2), Squares(n=12, size=16), cache_dir=str(tmp_path))
    two = _fitted(attrs.evolve(TINY, holdout=2, patch=2), Squares(n=12, size=16), cache_dir=str(tmp_path))
    assert two.source is FitSource.CACHE and two.channels == 16 and two.cache_key() != one.cache_key()
    x = torch.stack([Squares(n=12, size=16)[i].media["video"] for i in range(3)])
    s1, s2 = one.encode(x), two.encode(x)
    assert s1.tokens.shape == (3, 2 * 4 * 4, 4) and s2.tokens.shape == (3, 2 * 2 * 2, 16)
    assert latent_grid(s2) == (2, 2, 2)
    # token (t, 0, 1) of patch 2 holds latent rows 0-1, cols 2-3 in (row, col, channel) order
    grid1 = s1.tokens.reshape(3, 2, 4, 4, 4)
    assert torch.equal(s2.tokens[:, 1], grid1[:, 0, 0:2, 2:4].reshape(3, 16))
    assert torch.equal(two.decode(s2), one.decode(s1))


# ---------------------------------------------------------------- the reconstruction loss


def test_the_reconstruction_loss_weights_strokes_and_edges() -> None:
    """With no weights it is the plain MSE / L1; ``foreground_weight`` makes an error on a bright
    pixel cost ``1 + w`` times one on the black background; ``gradient_weight`` adds the loss of
    the pixel differences, which a constant offset (no edge wrong) does not change."""
    x = -torch.ones(1, 1, 5, 8, 8)
    x[..., 2:4, 2:4] = 1.0
    recon = x.clone()
    plain = attrs.evolve(TINY, foreground_weight=0.0, gradient_weight=0.0)
    y = recon + 0.1 * torch.randn(recon.shape, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(vae_mod.reconstruction_loss(y, x, plain), F.mse_loss(y, x))
    assert torch.allclose(vae_mod.reconstruction_loss(y, x, attrs.evolve(plain, loss="l1")), F.l1_loss(y, x))
    fg = attrs.evolve(plain, foreground_weight=4.0)
    on_stroke, on_background = recon.clone(), recon.clone()
    on_stroke[0, 0, 0, 2, 2] = 0.5  # bright target, dimmer output: the brighter of the two is 1
    on_background[0, 0, 0, 6, 6] = -0.5  # black target, dark output: brightness 0.25
    stroke, background = (
        vae_mod.reconstruction_loss(on_stroke, x, fg),
        vae_mod.reconstruction_loss(on_background, x, fg),
    )
    assert torch.isclose(stroke, F.mse_loss(on_stroke, x) * 5.0)
    assert torch.isclose(background, F.mse_loss(on_background, x) * 2.0)
    edges = attrs.evolve(plain, gradient_weight=3.0)
    shifted = recon - 0.2
    assert torch.isclose(vae_mod.reconstruction_loss(shifted, x, edges), F.mse_loss(shifted, x))
    assert vae_mod.reconstruction_loss(on_stroke, x, edges) > F.mse_loss(on_stroke, x)


def tiny_key(config: VideoVAEConfig) -> str:
    return VideoVAETokenizer(config).fit_key(Squares())


def test_a_file_that_predates_the_new_fields_loads_with_their_old_values(tmp_path) -> None:
    """Files written before ``conv``, ``foreground_weight`` and ``gradient_weight`` existed were
    trained with a full 3x3x3 kernel and the plain loss: reading one assumes exactly that."""
    old = attrs.evolve(TINY, conv="3d", foreground_weight=0.0, gradient_weight=0.0)
    a = _fitted(old, cache_dir=str(tmp_path))
    tensors, meta = vae_mod._read(a.path)
    for name in ("conv", "foreground_weight", "gradient_weight"):
        del meta["config"][name]
    legacy = tmp_path / "legacy.safetensors"
    vae_mod.save_tensors(legacy, tensors, metadata={"selfflow": vae_mod.json.dumps(meta)})
    b = VideoVAETokenizer.from_checkpoint(legacy)
    assert b.config.conv == "3d" and b.config.foreground_weight == 0.0 and b.config.gradient_weight == 0.0
    x = Squares()[1].media["video"][None]
    assert torch.equal(b.encode(x).tokens, a.encode(x).tokens)
    with pytest.raises(ValueError, match="conv='3d' but the video/vae config says conv='2\\+1d'"):
        VideoVAETokenizer(attrs.evolve(TINY, conv="2+1d", checkpoint=str(legacy))).fit(Squares())
    # at the old values the new fields stay out of the key (old caches still match); any other value is a new fit
    assert VideoVAETokenizer(old).fit_key(Squares()) == VideoVAETokenizer(TINY).fit_key(Squares())
    for changed in (
        {"conv": "2+1d"},
        {"foreground_weight": 10.0},
        {"gradient_weight": 1.0},
        {"crop_frames": 5},
        {"pixel_patch": 2},
    ):
        assert VideoVAETokenizer(attrs.evolve(old, **changed)).fit_key(Squares()) != tiny_key(old)


def test_a_fit_on_random_windows_trains_on_1_plus_4k_frame_crops(monkeypatch) -> None:
    """``crop_frames = 5``: each training clip is a random 5-frame window (its first frame
    encoded alone, as a clip's is); held-out clips and the statistics stay whole."""
    with pytest.raises(ValueError, match=r"crop_frames=6 must be 1 \+ 4k frames"):
        VideoVAEConfig(crop_frames=6)
    seen: list[int] = []
    encode = CausalVideoAutoencoder.encode

    def spy(self, x):
        if self.training:
            seen.append(x.shape[2])
        return encode(self, x)

    monkeypatch.setattr(CausalVideoAutoencoder, "encode", spy)
    data = Squares(frames=9)
    tok = _fitted(attrs.evolve(TINY, crop_frames=5), data=data)
    assert seen == [5] * TINY.steps  # training windows, never the 9-frame clips
    assert latent_grid(tok.encode(data[0].media["video"][None]))[0] == 3  # a whole clip: 1 + 8/4 latent frames
    seen.clear()
    _fitted(attrs.evolve(TINY, crop_frames=9), data=data)
    assert seen == [9] * TINY.steps  # a window as long as the clip is the clip


def test_a_patchified_network_fits_to_the_same_latent_grid(tiny: VideoVAETokenizer) -> None:
    """``pixel_patch = 2`` changes the network, not the latents' shape or positions."""
    tok = _fitted(attrs.evolve(TINY, pixel_patch=2))
    assert tok.net.pixel_patch == 2 and tok.num_parameters != tiny.num_parameters
    x = Squares()[0].media["video"][None]
    a, b = tok.encode(x), tiny.encode(x)
    assert a.tokens.shape == b.tokens.shape and torch.equal(a.positions, b.positions)
    assert tok.decode(a).shape == x.shape
