#!/usr/bin/env bash
# Install sagaline with its test tools into ./.venv, then lint, type-check and run the tests.
source "$(dirname "$0")/_venv.sh" "dev"
ruff check src tests benchmarks
ruff format --check src tests benchmarks
mypy src tests
exec python -m pytest "$@"
