"""The built-in ``text`` plugin: text as condition tokens (``text/chars``)."""
