"""The run viewer: ``adag serve RUN_DIR`` serves a run directory's attribution graphs to a
browser (:mod:`adag.viewer.server` lists the routes and the safety rules;
:mod:`adag.viewer.data` the JSON layouts). Standard library only; the pages are the files of
``adag/viewer/static/``."""

from __future__ import annotations

from adag.viewer.server import make_server, serve

__all__ = ["make_server", "serve"]
