"""The built-in ``video`` plugin (optional extra ``selfflow[video]``): video tokenizers
(``video/patch``), datasets (``video/moving-digits``, ``video/folder``), the MP4 + PNG-strip
writer, the video reference network and video metrics.

Media convention: a video batch is ``(B, C, T, H, W)`` float in [-1, 1]; a dataset item's
``media["video"]`` is ``(C, T, H, W)``. decord and PyAV are imported lazily by one module each
(``decode.py``, ``encode.py``), so registering this plugin needs neither.
"""

from __future__ import annotations

from selfflow.plugins.hookspecs import hookimpl


@hookimpl
def selfflow_register_tokenizers(register) -> None:
    del register  # video/patch: added with plugins/video/patch.py


@hookimpl
def selfflow_register_datasets(register) -> None:
    from selfflow.plugins.video.moving_digits import MovingDigitsConfig, moving_digits

    register.add(
        "video/moving-digits",
        moving_digits,
        MovingDigitsConfig,
        "moving MNIST (1-2 bouncing digits; label = digit(s) x initial direction) written once as MP4s, read by decord",
    )


@hookimpl
def selfflow_register_writers(register) -> None:
    del register  # "video": added with plugins/video/writer.py


@hookimpl
def selfflow_register_references(register) -> None:
    del register


@hookimpl
def selfflow_register_metrics(register) -> None:
    del register
