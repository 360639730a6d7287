"""The built-in ``text`` plugin: text as condition tokens (``text/chars``)."""

from selfflow.plugins.hookspecs import hookimpl


@hookimpl
def selfflow_register_tokenizers(register) -> None:
    from selfflow.plugins.text.chars import CharsConfig, CharTokenizer

    register.add(
        "text/chars",
        CharTokenizer.from_config,
        CharsConfig,
        "strings as a condition segment of one-hot character tokens (padded, valid mask)",
    )


@hookimpl
def selfflow_register_writers(register) -> None:
    from selfflow.plugins.text.writer import TextWriter

    register.add(
        "text",
        TextWriter.from_config,
        None,
        "one UTF-8 .txt per batch (a title line, then label<TAB>text per sample), shown in samples.html",
    )
