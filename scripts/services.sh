#!/usr/bin/env bash
# Make sure the local RabbitMQ (with the management plugin) and PostgreSQL are up.
# Idempotent: starts only what is down. Used by `make demo`, `make test` and CI.
set -euo pipefail

say() { printf 'services: %s\n' "$*" >&2; }

pg_up() { pg_isready -h 127.0.0.1 -p 5432 -q 2>/dev/null; }
if ! pg_up; then
  say "starting PostgreSQL"
  if command -v pg_ctlcluster >/dev/null; then
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n1)" main start || true
  fi
  for _ in $(seq 1 60); do pg_up && break; sleep 1; done
  pg_up || { say "PostgreSQL did not come up on 127.0.0.1:5432"; exit 1; }
fi

rabbit_up() { rabbitmq-diagnostics -q check_port_connectivity >/dev/null 2>&1; }
if ! rabbit_up; then
  say "starting RabbitMQ"
  rabbitmq-server -detached >/dev/null 2>&1 || true
  for _ in $(seq 1 90); do rabbit_up && break; sleep 1; done
  rabbit_up || { say "RabbitMQ did not come up on 127.0.0.1:5672"; exit 1; }
fi

if ! rabbitmq-plugins list -e -m 2>/dev/null | grep -qx rabbitmq_management; then
  say "enabling the RabbitMQ management plugin"
  rabbitmq-plugins enable rabbitmq_management >/dev/null
fi
for _ in $(seq 1 60); do
  curl -fsS -u guest:guest http://127.0.0.1:15672/api/overview >/dev/null 2>&1 && break
  sleep 1
done
# The broker's limit on one message (deploy/rabbitmq/rabbitmq.conf, above the services'
# SAGABUS_MAX_MESSAGE_BYTES): set on the running node, no restart. The setting lives as long as
# the node, so a restarted node gets it back from the next run of this script.
conf="$(dirname "${BASH_SOURCE[0]}")/../deploy/rabbitmq/rabbitmq.conf"
max_size=$(sed -n 's/^max_message_size *= *\([0-9][0-9]*\) *$/\1/p' "$conf" 2>/dev/null | tail -n1)
max_size=${max_size:-1048576}
current=$(rabbitmqctl -q eval 'application:get_env(rabbit, max_message_size).' 2>/dev/null || true)
if [ "$current" != "{ok,$max_size}" ]; then
  say "setting RabbitMQ max_message_size to $max_size bytes (was ${current:-unknown})"
  rabbitmqctl -q eval "application:set_env(rabbit, max_message_size, $max_size)." >/dev/null \
    || say "could not set max_message_size (rabbitmqctl eval failed); messages up to 128 MiB pass"
fi
say "PostgreSQL and RabbitMQ (management on :15672) are up"
