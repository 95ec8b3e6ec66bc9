#!/usr/bin/env bash
# Install sagaline with its test tools into ./.venv, then lint, type-check and run the tests.
source "$(dirname "$0")/_venv.sh" "dev"
ruff check src tests benchmarks examples
ruff format --check src tests benchmarks examples
mypy src tests examples/trip
exec python -m pytest "$@"
