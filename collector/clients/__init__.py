"""Per-client behaviour (docs/clients.md)."""
