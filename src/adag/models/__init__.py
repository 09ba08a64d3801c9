"""Models: the only place that knows about architectures (see DESIGN.md)."""
