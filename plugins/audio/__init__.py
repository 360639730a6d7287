"""The built-in ``audio`` plugin (optional extra ``selfflow[audio]``): audio tokenizers
(``audio/frames``, ``audio/mel``, ``audio/mel-vae``, ``audio/encodec``), datasets
(``audio/spoken-digits``, ``audio/tones``, ``audio/folder``), the WAV + spectrogram writer,
the audio reference network and audio metrics.

Media convention: an audio batch is ``(B, channels, samples)`` float in [-1, 1]; a dataset
item's ``media["audio"]`` is ``(channels, samples)`` with ``channels = 1`` (files are mixed
down to mono). soundfile, soxr, PyAV and encodec are imported lazily by one module each
(``io.py`` for soundfile and PyAV's audio decoding, ``resample.py`` for soxr), so
registering this plugin needs none of them. ``docs/audio.md`` documents every option.
"""

from __future__ import annotations

from selfflow.plugins.hookspecs import hookimpl


@hookimpl
def selfflow_register_tokenizers(register) -> None:
    from selfflow.plugins.audio.frames import FramesConfig, FramesTokenizer
    from selfflow.plugins.audio.mel import MelConfig, MelTokenizer

    register.add(
        "audio/frames",
        FramesTokenizer.from_config,
        FramesConfig,
        "plain waveform frames (320 samples at 16 kHz = 50 frames/s; exact round trip)",
    )
    register.add(
        "audio/mel",
        MelTokenizer.from_config,
        MelConfig,
        "log-mel frames (80 bins, 62.5 frames/s at 16 kHz) standardised per bin from the data; Griffin-Lim decoder",
    )

    from selfflow.plugins.audio.mel_vae import MelVAEConfig, MelVAETokenizer

    register.add(
        "audio/mel-vae",
        MelVAETokenizer.from_config,
        MelVAEConfig,
        "small 1-D conv KL autoencoder over audio/mel frames trained on the run's data (cached by data+config hash), "
        "16 channels at 31.25 frames/s; Griffin-Lim decoder",
    )

    from selfflow.plugins.audio.encodec import EncodecConfig, EncodecTokenizer  # imports encodec only when used

    register.add(
        "audio/encodec",
        EncodecTokenizer.from_config,
        EncodecConfig,
        "continuous EnCodec latents before quantisation (75 Hz at 24 kHz), standardised; official 24 kHz "
        "checkpoint from a local path (sha256-checked), a selfflow .safetensors, or a SEANet fitted on the run's data",
    )


@hookimpl
def selfflow_register_datasets(register) -> None:
    from selfflow.plugins.audio.folder import AudioFolderConfig, folder
    from selfflow.plugins.audio.spoken_digits import SpokenDigitsConfig, spoken_digits
    from selfflow.plugins.audio.tones import TonesConfig, tones

    register.add(
        "audio/spoken-digits",
        spoken_digits,
        SpokenDigitsConfig,
        "the digits zero..nine spoken by espeak-ng (Debian espeak-ng) across voices, speeds and pitches; "
        "rendered once to a WAV cache, 1 s clips at 16 kHz",
    )
    register.add(
        "audio/tones",
        tones,
        TonesConfig,
        "synthetic pitched notes (harmonics, ADSR envelopes, random octave/loudness/length); label = pitch class",
    )
    register.add(
        "audio/folder",
        folder,
        AudioFolderConfig,
        "a folder of WAV/FLAC/OGG/MP3 files, any rate/channels: mono mixdown, soxr resampling, fixed-length "
        "crops or padding; labels from sub-folder names",
    )


@hookimpl
def selfflow_register_writers(register) -> None:
    from selfflow.plugins.audio.writer import AudioWriter, AudioWriterConfig

    register.add(
        "audio",
        AudioWriter.from_config,
        AudioWriterConfig,
        "one WAV (<audio> player) and one log-mel spectrogram PNG per sample",
    )


@hookimpl
def selfflow_register_references(register) -> None:
    from selfflow.plugins.audio.reference import AudioReference, AudioReferenceConfig

    register.add(
        "audio",
        AudioReference.from_config,
        AudioReferenceConfig,
        "log-mel CNN classifier trained on the run's clips (per-clip normalised, augmented; cached by data+config): "
        "feature network for fd (FAD-style)/kid/class-accuracy and REPA",
    )


@hookimpl
def selfflow_register_metrics(register) -> None:
    from selfflow.plugins.audio.metrics import AudioReconstruction, AudioSanity, ReconstructionConfig, SanityConfig

    register.add(
        "audio/sanity",
        AudioSanity.from_config,
        SanityConfig,
        "reference-free check that clips are not silence or noise: classifier confidence, spectral flatness, RMS dBFS",
    )
    register.add(
        "audio/reconstruction",
        AudioReconstruction.from_config,
        ReconstructionConfig,
        "the tokenizer's ceiling: clips through encode->decode, scored by class accuracy, FD and SNR (use with --real)",
    )
