#!/usr/bin/env bash
# Install sagaline into ./.venv and run the reference order system on the embedded default:
# it creates ./sagaline.db, runs three orders through the saga and prints their timelines.
# Every driver is installed (the "all" extra), so the same venv runs on PostgreSQL, RabbitMQ
# and NATS too.
source "$(dirname "$0")/_venv.sh" "all"
exec sagaline demo "$@"
