"""Service statistics and the service map (docs/stats.md)."""
