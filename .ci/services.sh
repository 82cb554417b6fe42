#!/usr/bin/env bash
# Make sure PostgreSQL and Redis answer on 127.0.0.1 and the test database exists.
set -euo pipefail

PG_HOST=127.0.0.1 PG_PORT=5432 REDIS_PORT=6379

wait_for() {  # wait_for <what> <command...>: up to 30 s
  local what=$1; shift
  for _ in $(seq 1 60); do "$@" >/dev/null 2>&1 && return 0; sleep 0.5; done
  echo "error: $what is not reachable after 30 s" >&2
  return 1
}

if ! pg_isready -h "$PG_HOST" -p "$PG_PORT" -q 2>/dev/null; then
  echo "starting PostgreSQL"
  clusters=(/etc/postgresql/*/)
  pg_ctlcluster --skip-systemctl-redirect "$(basename "${clusters[0]}")" main start || true
fi
wait_for "PostgreSQL at $PG_HOST:$PG_PORT" pg_isready -h "$PG_HOST" -p "$PG_PORT" -q

if ! redis-cli -h 127.0.0.1 -p "$REDIS_PORT" ping >/dev/null 2>&1; then
  echo "starting Redis"
  redis-server --daemonize yes --bind 127.0.0.1 --port "$REDIS_PORT" --save "" --appendonly no
fi
wait_for "Redis at 127.0.0.1:$REDIS_PORT" redis-cli -h 127.0.0.1 -p "$REDIS_PORT" ping

if ! psql -h "$PG_HOST" -p "$PG_PORT" -U postgres -d postgres -tAc \
    "SELECT 1 FROM pg_database WHERE datname = 'test'" | grep -q 1; then
  createdb -h "$PG_HOST" -p "$PG_PORT" -U postgres test
fi
