"""Attribution profiles of graph nodes."""
