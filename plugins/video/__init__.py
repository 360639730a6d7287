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
    from selfflow.plugins.video.vae import VideoVAEConfig, VideoVAETokenizer

    register.add(
        "video/vae",
        VideoVAETokenizer.from_config,
        VideoVAEConfig,
        "causal 3-D KL autoencoder (1 + 4k frames -> 1 + k latent frames, 4x or 8x spatial) trained on the run's "
        "clips (cached by data+config hash, resumable), standardised latent tokens",
    )

    from selfflow.plugins.video.patch import VideoPatchConfig, VideoPatchTokenizer

    register.add(
        "video/patch",
        VideoPatchTokenizer.from_config,
        VideoPatchConfig,
        "non-overlapping pt x p x p pixel patches, (t, h, w) positions on the shared time axis (exact round trip)",
    )


@hookimpl
def selfflow_register_datasets(register) -> None:
    from selfflow.plugins.video.moving_digits import MovingDigitsConfig, moving_digits

    register.add(
        "video/moving-digits",
        moving_digits,
        MovingDigitsConfig,
        "moving MNIST (1-2 bouncing digits; label = digit(s) x initial direction) written once as MP4s, read by decord",
    )

    from selfflow.plugins.video.folder import VideoFolderConfig, video_folder

    register.add(
        "video/folder",
        video_folder,
        VideoFolderConfig,
        "a folder of videos (mp4/avi/webm/mkv/mov); labels from sub-folders; clip length, fps or stride, resize+crop",
    )


@hookimpl
def selfflow_register_writers(register) -> None:
    from selfflow.plugins.video.writer import VideoWriter, VideoWriterConfig

    register.add(
        "video",
        VideoWriter.from_config,
        VideoWriterConfig,
        "one browser-playable MP4 (H.264, yuv420p) per sample and a labelled PNG strip of frames per batch",
    )


@hookimpl
def selfflow_register_references(register) -> None:
    from selfflow.plugins.video.reference import VideoReference, VideoReferenceConfig

    register.add(
        "video",
        VideoReference.from_config,
        VideoReferenceConfig,
        "small 3-D CNN trained on the run's clips, one head per label factor (cached by data+config hash): "
        "feature network for fd/kid (FVD-style, not I3D), class-accuracy and REPA",
    )


@hookimpl
def selfflow_register_metrics(register) -> None:
    from selfflow.plugins.video.metrics import FactorAccuracy, FrameFD, FrameFDConfig, TemporalConsistency

    register.add(
        "video/frame-fd",
        FrameFD.from_config,
        FrameFDConfig,
        "frame-wise Fréchet distance: every frame through an image reference network trained on frames of the clips",
    )
    register.add(
        "video/factor-accuracy",
        FactorAccuracy.from_config,
        None,
        "per-factor (digit, direction) and joint accuracy of class-conditional samples read by the video reference",
    )
    register.add(
        "video/temporal",
        TemporalConsistency.from_config,
        None,
        "temporal consistency: mean |frame-to-frame change| of samples vs real clips (ratio, 1-D W1, KS)",
    )
