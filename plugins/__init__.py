"""Plugins: hookspecs, the plugin manager, and the built-in plugins per modality.

Write a plugin with ``from selfflow.plugins import hookimpl`` (see ``hookspecs.py``).
"""

from selfflow.plugins.hookspecs import hookimpl, hookspec

__all__ = ["hookimpl", "hookspec"]
