"""The run directory: each stage is a pure function of its config and the earlier stages' files,
writes atomically and is skipped when its output is current (see :mod:`adag.pipeline.resume`).

Stages:

- ``trace``  (:mod:`adag.pipeline.trace`): attribution graphs, viewer JSON and profiles of prompts.
- ``patch``  (:mod:`adag.pipeline.patch`): localisation tables (AtP, AtP*, exhaustive patching) and
  the cost-versus-recall evaluation in ``RUN_DIR/patching/``.
"""
