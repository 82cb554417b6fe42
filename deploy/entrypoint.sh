#!/bin/sh
# Container start: migrate (retrying while the database comes up), seed the admin,
# then `exec` the server so SIGTERM from ECS/Docker reaches uvicorn directly.
set -eu

HOST="${HOST:-0.0.0.0}"
PORT="${PORT:-8000}"
MIGRATION_ATTEMPTS="${MIGRATION_ATTEMPTS:-30}"
MIGRATION_RETRY_SECONDS="${MIGRATION_RETRY_SECONDS:-2}"
SHUTDOWN_GRACE_SECONDS="${SHUTDOWN_GRACE_SECONDS:-30}"
WEB_CONCURRENCY="${WEB_CONCURRENCY:-1}"
UVICORN_LOG_LEVEL="$(printf '%s' "${LOG_LEVEL:-INFO}" | tr '[:upper:]' '[:lower:]')"

# Until the exec below this shell is PID 1, which ignores SIGTERM by default:
# stop at once when the task is stopped during start-up.
trap 'echo "entrypoint: stopped during start-up" >&2; exit 143' TERM INT

attempt=1
until python -m backend.admin.cli migrate; do
    if [ "$attempt" -ge "$MIGRATION_ATTEMPTS" ]; then
        echo "entrypoint: migrations failed $attempt times; giving up" >&2
        exit 1
    fi
    echo "entrypoint: database not ready (attempt $attempt/$MIGRATION_ATTEMPTS); retrying in ${MIGRATION_RETRY_SECONDS}s" >&2
    attempt=$((attempt + 1))
    sleep "$MIGRATION_RETRY_SECONDS"
done

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
    --no-server-header \
    --no-access-log \
    --log-level "$UVICORN_LOG_LEVEL"
