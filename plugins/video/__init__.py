"""The built-in ``video`` plugin (optional extra ``selfflow[video]``)."""

from __future__ import annotations

from selfflow.plugins.hookspecs import hookimpl
