#!/bin/sh
# Container start: migrate (bounded retries while the database comes up), then either
# `exec` the command given as arguments (a Celery worker, the one-off migrate task) or
# seed the admin and `exec` the server, so SIGTERM from ECS/Docker reaches the process
# directly.
#
# Migrations here are a convenience for `docker run` and single-task set-ups
# (RUN_MIGRATIONS=true, the default). Tasks starting at once are safe (on PostgreSQL
# the migration holds an advisory lock: one applies, the others wait and find nothing
# to do), but the schema should change before new code serves, so the ECS stack sets
# RUN_MIGRATIONS=false and runs the one-off migrate task before a deploy
# (deploy/aws/README.md). The step is bounded: it gives up after
# MIGRATION_ATTEMPTS attempts or once MIGRATION_TIMEOUT_SECONDS have passed, whichever
# comes first; keep that budget (plus one attempt) below the load balancer's health
# check grace period so a task never gets killed for being slow to migrate.
set -eu

HOST="${HOST:-0.0.0.0}"
PORT="${PORT:-8000}"
RUN_MIGRATIONS="${RUN_MIGRATIONS:-true}"
MIGRATION_ATTEMPTS="${MIGRATION_ATTEMPTS:-30}"
MIGRATION_RETRY_SECONDS="${MIGRATION_RETRY_SECONDS:-2}"
MIGRATION_TIMEOUT_SECONDS="${MIGRATION_TIMEOUT_SECONDS:-60}"
SHUTDOWN_GRACE_SECONDS="${SHUTDOWN_GRACE_SECONDS:-30}"
# Longer than the ALB's idle timeout (60 s): the ALB, not uvicorn, closes idle
# connections, so uvicorn never closes one the ALB is sending a request on.
KEEP_ALIVE_SECONDS="${KEEP_ALIVE_SECONDS:-65}"
WEB_CONCURRENCY="${WEB_CONCURRENCY:-1}"
UVICORN_LOG_LEVEL="$(printf '%s' "${LOG_LEVEL:-INFO}" | tr '[:upper:]' '[:lower:]')"

# Until the exec below this shell is PID 1, which ignores SIGTERM by default:
# stop at once when the task is stopped during start-up.
trap 'echo "entrypoint: stopped during start-up" >&2; exit 143' TERM INT

if [ "$RUN_MIGRATIONS" = "true" ]; then
    deadline=$(($(date +%s) + MIGRATION_TIMEOUT_SECONDS))
    attempt=1
    until python -m backend.admin.cli migrate; do
        if [ "$attempt" -ge "$MIGRATION_ATTEMPTS" ] || [ "$(date +%s)" -ge "$deadline" ]; then
            echo "entrypoint: migrations failed $attempt times within ${MIGRATION_TIMEOUT_SECONDS}s; giving up" >&2
            exit 1
        fi
        echo "entrypoint: database not ready (attempt $attempt/$MIGRATION_ATTEMPTS); retrying in ${MIGRATION_RETRY_SECONDS}s" >&2
        attempt=$((attempt + 1))
        sleep "$MIGRATION_RETRY_SECONDS"
    done
fi

if [ "$#" -gt 0 ]; then
    trap - TERM INT
    exec "$@"
fi

python -m backend.admin.cli seed-admin

# uvicorn believes X-Forwarded-For/-Proto only from these peers: the same CIDRs the
# application trusts (TRUSTED_PROXIES, comma-separated or a JSON list).
FORWARDED_ALLOW_IPS="${FORWARDED_ALLOW_IPS:-$(printf '%s' "${TRUSTED_PROXIES:-127.0.0.1}" | tr -d '[]" ')}"

trap - TERM INT
exec uvicorn backend.api.main:app \
    --host "$HOST" \
    --port "$PORT" \
    --workers "$WEB_CONCURRENCY" \
    --proxy-headers \
    --forwarded-allow-ips "$FORWARDED_ALLOW_IPS" \
    --timeout-graceful-shutdown "$SHUTDOWN_GRACE_SECONDS" \
    --timeout-keep-alive "$KEEP_ALIVE_SECONDS" \
    --no-server-header \
    --no-access-log \
    --log-level "$UVICORN_LOG_LEVEL"
