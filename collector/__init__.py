"""Loupe collector: gRPC ingest, storage, live subscriptions and queries."""
