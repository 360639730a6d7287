"""selfflow-points: the "points" modality (2-D point sets) as a selfflow plugin.

This module is the plugin: the entry point ``points = "selfflow_points"`` in the setuptools
group ``selfflow`` names it. It only defines hook implementations; each imports what it
registers when selfflow calls it (matplotlib only when a grid is drawn), and nothing
registers on import.

Media convention: a set is ``(N, 2)`` float ``(x, y)`` in [-1, 1], a batch ``(B, N, 2)``.
"""

from __future__ import annotations

from selfflow.plugins import hookimpl

__version__ = "0.1.0"


@hookimpl
def selfflow_register_datasets(register) -> None:
    from selfflow_points.dataset import ShapesConfig, shapes

    register.add(
        "points/shapes",
        shapes,
        ShapesConfig,
        "2-D point sets on circles, squares, triangles and crosses (seeded, random scale and rotation)",
    )


@hookimpl
def selfflow_register_tokenizers(register) -> None:
    from selfflow_points.tokenizer import XYConfig, XYTokenizer

    register.add(
        "points/xy", XYTokenizer.from_config, XYConfig, "one token per point, (x, y) as 2 channels (exact round trip)"
    )


@hookimpl
def selfflow_register_writers(register) -> None:
    from selfflow_points.writer import PointsWriter, PointsWriterConfig

    register.add(
        "points",
        PointsWriter.from_config,
        PointsWriterConfig,
        "point sets as a PNG grid of scatter plots, one row per label",
    )


@hookimpl
def selfflow_register_references(register) -> None:
    from selfflow_points.reference import PointNetConfig, PointReference

    register.add(
        "points",
        PointReference.from_config,
        PointNetConfig,
        "small PointNet classifier trained on the run's point sets (cached by data+config hash)",
    )


@hookimpl
def selfflow_register_metrics(register) -> None:
    from selfflow_points.metric import OnShape, OnShapeConfig

    register.add(
        "points/on-shape",
        OnShape.from_config,
        OnShapeConfig,
        "mean distance of generated points to the outline of the requested shape (exact geometry)",
    )


def _recipe(config: None) -> str:
    import importlib.resources

    return importlib.resources.files("selfflow_points").joinpath("shapes-selfflow.toml").read_text()


@hookimpl
def selfflow_register_runs(register) -> None:
    register.add(
        "points/shapes-selfflow", _recipe, None, "Self-Flow on 2-D point-set shapes; about a minute on 2 CPU cores"
    )
