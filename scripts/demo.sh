#!/usr/bin/env bash
# Install sagaline into ./.venv and run the reference order system on the embedded default:
# it creates ./sagaline.db, runs three orders through the saga and prints their timelines.
source "$(dirname "$0")/_venv.sh" ""
exec sagaline demo "$@"
