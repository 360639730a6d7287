"""image/sd-vae: a tiny random AutoencoderKL saved to a temporary directory and loaded back."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from selfflow.core.types import Role, grid_positions
from selfflow.plugins.image.sd_vae import SDVAEConfig, SDVAETokenizer
from selfflow.plugins.protocols import Example, Tokenizer

TINY = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
    up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
    block_out_channels=(8, 16),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=4,
    sample_size=16,
)


def _save(path, **config):
    diffusers = pytest.importorskip(
        "diffusers", exc_type=ImportError, reason="image/sd-vae needs diffusers: pip install 'selfflow[sd-vae]'"
    )
    torch.manual_seed(0)
    model = diffusers.AutoencoderKL(**TINY, **config).eval()
    model.save_pretrained(str(path))
    return model


class Images:
    modalities = ("image",)
    num_classes = 0
    class_names = ()

    def __init__(self, channels: int = 3) -> None:
        self.images = torch.rand(4, channels, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> Example:
        return Example(media={"image": self.images[i]})

    def fingerprint(self) -> str:
        return "images"


pytestmark = pytest.mark.usefixtures("one_thread_module")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("sd-vae")
    return path, _save(path, scaling_factor=0.5, shift_factor=0.1)


def test_loads_the_saved_weights(saved):
    path, model = saved
    tok = SDVAETokenizer.from_config(SDVAEConfig(path=str(path)))
    assert tok.vae is None  # construction touches no file
    tok.fit(Images())
    assert isinstance(tok, Tokenizer) and tok.channels == 4 and tok.downsample == 2
    mine, theirs = tok.vae.state_dict(), model.state_dict()
    assert mine.keys() == theirs.keys()
    assert all(torch.equal(mine[k], theirs[k]) for k in theirs)


def test_encode_decode_shapes_scaling_and_round_trip(saved):
    path, model = saved
    tok = SDVAETokenizer.from_pretrained(path)
    x = Images().images
    seg = tok.encode(x)
    assert seg.tokens.shape == (4, 64, 4) and seg.role is Role.GENERATE and seg.modality == "image"
    assert torch.equal(seg.positions, grid_positions(1, 8, 8, batch=4))
    with torch.no_grad():
        z = model.encode(x).latent_dist.mean
        expected = ((z - 0.1) * 0.5).permute(0, 2, 3, 1).reshape(4, 64, 4)
        direct = model.decode(z).sample.clamp(-1, 1)
    torch.testing.assert_close(seg.tokens, expected)
    assert torch.equal(seg.tokens, tok.encode(x).tokens)  # posterior mean: deterministic
    y = tok.decode(seg)
    assert y.shape == x.shape
    torch.testing.assert_close(y, direct, atol=1e-5, rtol=1e-5)  # the normalisation inverts exactly


def test_per_channel_latent_statistics(tmp_path):
    mean, std = [0.1, -0.2, 0.3, 0.0], [1.0, 2.0, 0.5, 4.0]
    model = _save(tmp_path, scaling_factor=0.5, latents_mean=mean, latents_std=std)
    tok = SDVAETokenizer.from_pretrained(tmp_path)
    x = Images().images
    with torch.no_grad():
        z = model.encode(x).latent_dist.mean
    expected = (z - torch.tensor(mean)[:, None, None]) * 0.5 / torch.tensor(std)[:, None, None]
    torch.testing.assert_close(tok.encode(x).tokens, expected.permute(0, 2, 3, 1).reshape(4, 64, 4))


def test_missing_or_incomplete_directory_names_the_path(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=r"nowhere is not a directory.*config\.json"):
        SDVAETokenizer(SDVAEConfig(path=str(missing))).fit(Images())
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "diffusion_pytorch_model.bin").write_bytes(b"")
    with pytest.raises(
        FileNotFoundError, match="lacks diffusion_pytorch_model.safetensors.*convert them to safetensors"
    ):
        SDVAETokenizer.from_pretrained(tmp_path)


def test_missing_diffusers_names_the_extra(tmp_path, monkeypatch):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "diffusion_pytorch_model.safetensors").write_bytes(b"")
    monkeypatch.setitem(sys.modules, "diffusers", None)  # import fails as if not installed
    with pytest.raises(ImportError, match=r"selfflow\[sd-vae\]"):
        SDVAETokenizer.from_pretrained(tmp_path)


def test_importing_the_module_does_not_import_diffusers():
    code = "import sys, selfflow.plugins.image.sd_vae; assert 'diffusers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_wrong_images_give_clear_errors(saved):
    tok = SDVAETokenizer.from_pretrained(saved[0])
    with pytest.raises(ValueError, match="3-channel images, got 1"):
        tok.encode(torch.zeros(2, 1, 16, 16))
    with pytest.raises(ValueError, match="3-channel images, got 1"):
        tok.fit(Images(channels=1))
    with pytest.raises(ValueError, match="not divisible by 2"):
        tok.encode(torch.zeros(2, 3, 15, 15))
    seg = tok.encode(torch.zeros(1, 3, 16, 16))
    with pytest.raises(ValueError, match="4-channel tokens"):
        tok.decode(seg.with_tokens(torch.zeros(1, 64, 3)))
