#!/usr/bin/env bash
# `make run`: the collector on the embedded default (./data/loupe.duckdb), streaming every
# record it receives to this terminal.
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/loupe collector run --data-dir ./data --print
