"""Unit tests of the example plugin package ``examples/selfflow-points``, piece by piece.

The package is imported from its source directory (put on ``sys.path`` here, for these unit
tests only); the CLI test installs it with pip and trains through ``selfflow``.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import attrs
import pytest
import torch

PACKAGE = Path(__file__).resolve().parents[2] / "examples" / "selfflow-points"
if str(PACKAGE) not in sys.path:
    sys.path.insert(0, str(PACKAGE))

import selfflow_points  # noqa: E402
from selfflow_points.dataset import ShapesConfig, ShapesDataset, shapes  # noqa: E402
from selfflow_points.metric import OnShape, OnShapeConfig  # noqa: E402
from selfflow_points.reference import PointNetConfig, PointReference  # noqa: E402
from selfflow_points.shapes import SHAPES, fit_distance, rotate  # noqa: E402
from selfflow_points.tokenizer import XYConfig, XYTokenizer  # noqa: E402
from selfflow_points.writer import PointsWriter, layout  # noqa: E402

from selfflow.core.types import Role, Segment  # noqa: E402
from selfflow.plugins import hookspecs  # noqa: E402
from selfflow.plugins.protocols import (  # noqa: E402
    Dataset,
    FeatureNetwork,
    MediaFile,
    MediaMetric,
    MediaWriter,
    MetricContext,
    MetricResult,
    ReferenceContext,
    Tokenizer,
)

pytestmark = pytest.mark.usefixtures("one_thread_module")

SMALL = ShapesConfig(size=240, points=16)


@pytest.fixture(scope="module")
def data() -> tuple[ShapesDataset, ShapesDataset]:
    return shapes(None, split="train", seed=0), shapes(None, split="eval", seed=0)


@pytest.fixture(scope="module")
def reference_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def reference(data, reference_dir) -> tuple[PointReference, float]:
    train, held_out = data
    ctx = ReferenceContext(
        modality="points",
        train_dataset=train,
        eval_dataset=held_out,
        cache_dir=reference_dir,
        device=torch.device("cpu"),
    )
    start = time.perf_counter()
    ref = PointReference.from_config(None, context=ctx)
    return ref, time.perf_counter() - start


def _context(train: ShapesDataset, held_out: ShapesDataset, cache: Path, ref=None) -> MetricContext:
    def no_reference():
        raise AssertionError("points/on-shape must not build the reference network")

    return MetricContext(
        modality="points",
        train_dataset=train,
        eval_dataset=held_out,
        tokenizer=XYTokenizer(),
        device=torch.device("cpu"),
        cache_dir=cache,
        reference=ref or no_reference,
    )


# ----------------------------------------------------------------------------- geometry


@pytest.mark.parametrize("name", list(SHAPES))
def test_outline_points_lie_exactly_on_the_outline(name):
    shape = SHAPES[name]
    pts = shape.sample(40, torch.rand(5, dtype=torch.float64, generator=torch.Generator().manual_seed(0)))
    assert pts.shape == (5, 40, 2)
    assert float(shape.unit_distance(pts).max()) < 1e-12
    assert float(pts.norm(dim=-1).max()) <= 1 + 1e-12
    if shape.vertices is not None:  # circumradius 1
        assert float(shape.vertices.norm(dim=-1).max()) == pytest.approx(1.0, abs=1e-12)
        assert float(shape.unit_distance(shape.vertices).max()) < 1e-12
    off = pts * 1.1  # outside every outline: scaled away from the centre
    assert float(shape.unit_distance(off).min()) > 0


def test_fit_recovers_rotation_and_scale():
    pts = SHAPES["cross"].sample(32, torch.tensor([0.3], dtype=torch.float64))
    placed = rotate(pts, torch.tensor([37.0], dtype=torch.float64)) * 0.71
    d = fit_distance(placed, SHAPES["cross"], scale=(0.6, 0.9), rotation=(0.0, 360.0))
    assert float(d) < 2e-4
    assert float(fit_distance(placed, SHAPES["circle"], scale=(0.6, 0.9), rotation=(0.0, 360.0))) > 0.03


# ----------------------------------------------------------------------------- dataset


def test_dataset_items_shapes_and_protocol(data):
    train, held_out = data
    assert isinstance(train, Dataset)
    assert (len(train), len(held_out)) == (1800, 200)
    assert train.modalities == ("points",)
    assert train.num_classes == 4 and tuple(train.class_names) == ("circle", "square", "triangle", "cross")
    ex = train[0]
    x = ex.media["points"]
    assert set(ex.media) == {"points"} and isinstance(ex.label, int) and 0 <= ex.label < 4
    assert x.shape == (32, 2) and x.dtype == torch.float32
    assert float(train.points.abs().max()) <= 1.0
    counts = torch.bincount(train.labels, minlength=4)
    assert int(counts.max() - counts.min()) <= 1  # class-balanced
    with pytest.raises(IndexError, match="1800 sets"):
        train[1800]


def test_dataset_is_deterministic_and_fingerprinted():
    a, b = shapes(SMALL, split="train", seed=3), shapes(SMALL, split="train", seed=3)
    assert torch.equal(a.points, b.points) and torch.equal(a.labels, b.labels)
    assert a.fingerprint() == b.fingerprint()
    others = [
        shapes(SMALL, split="eval", seed=3),
        shapes(SMALL, split="train", seed=4),
        shapes(attrs.evolve(SMALL, jitter=0.03), split="train", seed=3),
        shapes(attrs.evolve(SMALL, rotation=(0.0, 90.0)), split="train", seed=3),
    ]
    prints = {a.fingerprint(), *(o.fingerprint() for o in others)}
    assert len(prints) == 5
    assert not torch.equal(a.points[: len(others[0])], others[0].points)  # eval is a different draw


def test_points_are_sorted_by_angle_around_the_centre(data):
    x = data[0].points[:50]
    angle = torch.atan2(x[..., 1], x[..., 0])
    assert bool((angle.diff(dim=1) >= 0).all())


def test_dataset_config_errors_name_the_key():
    with pytest.raises(ValueError, match="scale"):
        ShapesConfig(scale=(0.9, 0.5))
    with pytest.raises(ValueError, match="classes"):
        ShapesConfig(classes=("circle", "hexagon"))
    with pytest.raises(ValueError, match="split"):
        shapes(None, split="test", seed=0)


# ----------------------------------------------------------------------------- tokenizer


def test_tokenizer_round_trip_is_exact_and_positions_are_point_indices(data):
    tok = XYTokenizer.from_config(XYConfig(points=32))
    assert isinstance(tok, Tokenizer)
    assert tok.modality == "points" and tok.mask_ratio == 0.25 and tok.channels == 2
    tok.fit(data[0], cache_dir=None, generator=torch.Generator())  # a no-op
    x = data[0].points[:5]
    seg = tok.encode(x)
    assert isinstance(seg, Segment) and seg.modality == "points" and seg.role is Role.GENERATE
    assert seg.tokens.shape == (5, 32, 2)
    assert seg.positions.dtype == torch.long and seg.positions.shape == (5, 32, 3)
    assert torch.equal(seg.positions[..., 1], torch.arange(32).expand(5, -1))
    assert int(seg.positions[..., 0].abs().max()) == 0 and int(seg.positions[..., 2].abs().max()) == 0
    assert torch.equal(tok.decode(seg), x)


def test_tokenizer_cache_key_follows_the_config():
    assert isinstance(XYTokenizer().cache_key(), str)
    assert XYTokenizer().cache_key() == XYTokenizer().cache_key()
    assert XYTokenizer(XYConfig(points=16)).cache_key() != XYTokenizer(XYConfig(points=32)).cache_key()


@pytest.mark.parametrize(
    ("media", "error", "match"),
    [
        (torch.zeros(32, 2), ValueError, r"\(B, N, 2\).*add a batch dimension"),
        (torch.zeros(4, 32, 3), ValueError, r"\(B, N, 2\)"),
        (torch.zeros(4, 32, 2, dtype=torch.long), TypeError, "float"),
        ([[0.0, 0.0]], TypeError, "tensor"),
        (torch.zeros(4, 16, 2), ValueError, "32 points"),
    ],
)
def test_tokenizer_refuses_wrong_media(media, error, match):
    with pytest.raises(error, match=match):
        XYTokenizer(XYConfig(points=32)).encode(media)


# ----------------------------------------------------------------------------- writer


def test_writer_writes_a_labelled_png(data, tmp_path):
    train = data[0]
    idx = torch.cat([torch.nonzero(train.labels == k)[:5, 0] for k in range(4)])
    labels = [train.class_names[int(train.labels[i])] for i in idx]
    writer = PointsWriter.from_config(None)
    assert isinstance(writer, MediaWriter) and writer.modality == "points"
    files = writer.write(train.points[idx], tmp_path / "samples", stem="step_0000400", labels=labels, title="real sets")
    assert len(files) == 1
    f = files[0]
    assert isinstance(f, MediaFile) and f.element == "img" and f.items == tuple(range(20)) and f.caption
    assert f.path == tmp_path / "samples" / "step_0000400.png"
    assert f.path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from PIL import Image

    with Image.open(f.path) as im:  # 4 rows of 5 plots: wider than tall
        assert im.width > im.height > 200


def test_writer_layout_rows_follow_label_runs():
    rows = layout(["a", "a", "b", "b", "b", "a"], 6, max_columns=2)
    assert rows == [("a", [0, 1]), ("b", [2, 3]), ("", [4]), ("a", [5])]
    assert layout(None, 5, max_columns=16) == [("", [0, 1, 2]), ("", [3, 4])]
    with pytest.raises(ValueError, match="one label per set"):
        layout(["a"], 2, max_columns=4)


def test_writer_refuses_wrong_media(tmp_path):
    with pytest.raises(ValueError, match=r"\(B, N, 2\)"):
        PointsWriter().write(torch.zeros(2, 8, 8), tmp_path, stem="x", labels=None, title="")


# ----------------------------------------------------------------------------- reference network


def test_reference_trains_quickly_to_high_accuracy(reference, data):
    ref, seconds = reference
    assert isinstance(ref, FeatureNetwork)
    assert not ref.from_cache
    assert ref.accuracy > 0.9
    assert seconds < 60
    info = ref.describe()
    assert info["reference"] == ref.name and info["reference_accuracy"] == ref.accuracy
    assert info["reference_eval_samples"] == len(data[1]) and data[1].fingerprint() in info["reference_eval"]
    x = data[1].points[:10]
    assert ref.features(x).shape == (10, ref.num_features)
    assert ref.logits(x).shape == (10, ref.num_classes) == (10, 4)
    assert ref.device == torch.device("cpu")


def test_reference_is_cached_and_reloaded(reference, data, reference_dir):
    ref, _ = reference
    entries = list((reference_dir / "points-reference").iterdir())
    assert len(entries) == 1
    meta = json.loads((entries[0] / "meta.json").read_text())
    assert (entries[0] / "weights.safetensors").is_file() and meta["accuracy"] == ref.accuracy
    assert not list(entries[0].glob("*.pt")) and not list(entries[0].glob("*.pkl"))
    ctx = ReferenceContext(
        modality="points",
        train_dataset=data[0],
        eval_dataset=data[1],
        cache_dir=reference_dir,
        device=torch.device("cpu"),
    )
    start = time.perf_counter()
    again = PointReference.from_config(None, context=ctx)
    assert again.from_cache and time.perf_counter() - start < 5
    x = data[1].points[:8]
    assert torch.equal(again.features(x), ref.features(x))
    other = PointReference.from_config(PointNetConfig(epochs=1), context=ctx)  # another config: another entry
    assert not other.from_cache and len(list((reference_dir / "points-reference").iterdir())) == 2


def test_reference_feature_module_and_token_features(reference, data):
    ref, _ = reference
    module = ref.feature_module()
    assert isinstance(module, torch.nn.Module) and module.num_features == ref.num_features
    module.train()
    assert not module.training
    x = data[1].points[:6]
    assert torch.allclose(module(x), ref.features(x))
    seg = XYTokenizer().encode(x)
    tf = ref.token_features(x, seg)
    assert tf.shape == (6, 32, ref.token_feature_dim)
    with pytest.raises(ValueError, match="one token per point"):
        ref.token_features(x, XYTokenizer().encode(x[:, :16]))
    rms = float(ref.features(data[0].points[:500]).square().mean().sqrt())
    assert 0.5 < rms < 2.0  # KID's kernel assumes order-one features


def test_reference_drives_torchmetrics_fd(reference, data):
    from selfflow.plugins.metrics import FrechetDistance

    ref, _ = reference
    real_vs_real, real_vs_noise = FrechetDistance(ref), FrechetDistance(ref)
    real_vs_real.update(real=data[1].points[:100], fake=data[0].points[:100])
    real_vs_noise.update(
        real=data[1].points[:100], fake=torch.rand(100, 32, 2, generator=torch.Generator().manual_seed(0)) * 2 - 1
    )
    near, far = real_vs_real.compute()[0].value, real_vs_noise.compute()[0].value
    assert near * 20 < far


# ----------------------------------------------------------------------------- metric


def test_on_shape_is_near_zero_on_real_data_and_large_on_noise(data, tmp_path):
    train, held_out = data
    metric = OnShape.from_config(None, context=_context(train, held_out, tmp_path))
    assert isinstance(metric, MediaMetric) and metric.name == "points/on-shape"
    n = 48
    metric.update(real=held_out.points[:n])
    metric.update(fake=train.points[:n], labels=train.labels[:n])
    (real_score,) = metric.compute()
    assert isinstance(real_score, MetricResult) and real_score.name == "on_shape"
    d = real_score.details
    assert real_score.value < 1.5 * train.config.jitter  # real sets: only their jitter off the outline
    assert d["real"] < 1.5 * train.config.jitter and d["real_samples"] == n
    assert d["class_agreement"] == 1.0 and d["fake_samples"] == n
    assert d["nearest_class_distance"] == pytest.approx(real_score.value)
    assert d["chance"] > 5 * real_score.value

    noise = OnShape.from_config(OnShapeConfig(), context=_context(train, held_out, tmp_path))
    g = torch.Generator().manual_seed(1)
    noise.update(fake=torch.rand(n, 32, 2, generator=g) * 2 - 1, labels=train.labels[:n])
    (noise_score,) = noise.compute()
    assert noise_score.value > 0.1 and noise_score.value > 5 * real_score.value
    assert noise_score.details["chance"] == pytest.approx(noise_score.value, rel=0.25)


def test_on_shape_requested_class_matters(data, tmp_path):
    train, held_out = data
    metric = OnShape.from_config(None, context=_context(train, held_out, tmp_path))
    wrong = (train.labels[:32] + 1) % 4  # ask for the next class: the points are on another outline
    metric.update(fake=train.points[:32], labels=wrong)
    (r,) = metric.compute()
    assert r.value > 0.03 and r.details["class_agreement"] == 0.0
    assert r.details["nearest_class_distance"] < 1.5 * train.config.jitter


def test_on_shape_errors(data, tmp_path):
    train, held_out = data
    metric = OnShape.from_config(None, context=_context(train, held_out, tmp_path))
    with pytest.raises(ValueError, match="update"):
        metric.compute()
    with pytest.raises(ValueError, match=r"\(B, N, 2\)"):
        metric.update(fake=torch.zeros(4, 32))
    with pytest.raises(ValueError, match="class ids"):
        metric.update(fake=train.points[:4], labels=torch.tensor([0, 1, 2, 7]))

    class Other:
        modalities, num_classes, class_names = ("points",), 0, ()

    with pytest.raises(ValueError, match="points/shapes"):
        OnShape.from_config(None, context=_context(Other(), Other(), tmp_path))


# ----------------------------------------------------------------------------- registration


class FakeRegister:
    """Collects ``register.add`` calls by hook, as ``plugins.protocols.Register`` is called."""

    def __init__(self) -> None:
        self.entries: dict[str, tuple] = {}

    def add(self, name, factory, config_cls=None, doc=""):
        assert name not in self.entries, f"{name} added twice"
        self.entries[name] = (factory, config_cls, doc)


def _register_all() -> dict[str, dict[str, tuple]]:
    found = {}
    for hook in hookspecs.HOOKS:
        impl = getattr(selfflow_points, hook, None)
        if impl is None:
            continue
        assert hasattr(impl, "selfflow_impl"), f"{hook} is not marked @hookimpl"
        register = FakeRegister()
        impl(register=register)
        found[hook.removeprefix("selfflow_register_")] = register.entries
    return found


def test_registration_collects_every_entry():
    found = _register_all()
    assert {kind: sorted(entries) for kind, entries in found.items()} == {
        "datasets": ["points/shapes"],
        "tokenizers": ["points/xy"],
        "writers": ["points"],
        "references": ["points"],
        "metrics": ["points/on-shape"],
        "runs": ["points/shapes-selfflow"],
    }
    for kind, entries in found.items():
        for name, (factory, config_cls, doc) in entries.items():
            assert callable(factory) and doc, f"{kind} {name}"
            assert config_cls is None or attrs.has(config_cls), f"{kind} {name}"
            if config_cls is not None:
                config_cls()  # every option has a default


def test_hooks_are_pluggy_hookimpls_and_match_hookspecs():
    import pluggy

    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    pm.register(selfflow_points, name="points")
    pm.check_pending()  # every hook implementation names a hookspec
    impls = {hook for hook in hookspecs.HOOKS if getattr(pm.hook, hook).get_hookimpls()}
    assert impls == {
        f"selfflow_register_{k}" for k in ("datasets", "tokenizers", "writers", "references", "metrics", "runs")
    }


def test_registered_factories_build_through_a_registry(data, tmp_path):
    from selfflow.registry.registry import Register, Registry

    regs = {kind: Registry(kind) for kind in ("datasets", "tokenizers", "writers", "metrics", "runs")}
    for kind, reg in regs.items():
        getattr(selfflow_points, f"selfflow_register_{kind}")(register=Register(reg, "points"))
    ds = regs["datasets"].build("points/shapes", {"points": 16, "size": 40, "scale": [0.5, 0.8]}, split="eval", seed=1)
    assert ds[0].media["points"].shape == (16, 2) and ds.config.scale == (0.5, 0.8)
    tok = regs["tokenizers"].build("points/xy", {"points": 16})
    assert tok.encode(torch.stack([ds[i].media["points"] for i in range(3)])).tokens.shape == (3, 16, 2)
    assert regs["writers"].build("points", {"max_columns": 4}).config.max_columns == 4
    metric = regs["metrics"].build("points/on-shape", {"rotation_step": 10.0}, context=_context(*data, tmp_path))
    assert metric.config.rotation_step == 10.0
    with pytest.raises(Exception, match="jiter|jitter"):
        regs["datasets"].build("points/shapes", {"jiter": 0.1}, split="train", seed=0)


def test_recipe_is_valid_toml_naming_the_plugin_entries():
    import tomllib

    text = _register_all()["runs"]["points/shapes-selfflow"][0](None)
    cfg = tomllib.loads(text)
    assert cfg["run"]["name"] == "points/shapes-selfflow"
    assert cfg["modalities"]["points"]["tokenizer"] == "points/xy"
    assert [s["dataset"] for s in cfg["streams"]] == ["points/shapes"] and cfg["streams"][0]["generate"] == ["points"]
    assert [m["name"] for m in cfg["eval"]["metrics"]] == ["points/on-shape", "fd"]


def test_importing_the_plugin_registers_nothing_and_skips_matplotlib():
    import subprocess

    code = (
        f"import sys; sys.path.insert(0, {str(PACKAGE)!r}); import selfflow_points; "
        "assert 'matplotlib' not in sys.modules, 'matplotlib imported at plugin load'; "
        "assert 'selfflow_points.writer' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
