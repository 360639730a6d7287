"""The built-in ``audio`` plugin (optional extra ``selfflow[audio]``)."""

from __future__ import annotations

from selfflow.plugins.hookspecs import hookimpl
