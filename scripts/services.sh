#!/usr/bin/env bash
# Make sure the services the test suite talks to are up: start any that is down, then
# wait for it, each wait bounded. Shared by `make test` and `.ci/run`.
#
# Usage: scripts/services.sh [--require] [--timeout SECONDS] [SERVICE...]
#
#   SERVICE     postgres, redis, nats, rabbitmq (default: all four, or $BASTION_SERVICES)
#   --require   exit non-zero when a service cannot be brought up (CI); without it a
#               service that stays down is a warning, and its tests skip
#   --timeout   seconds to wait for each service after starting it (default 60)
#
# The start commands are the ones shared/ENVIRONMENT.md gives for this machine kind;
# each runs only when its service does not answer, so running this twice is harmless.
set -euo pipefail

require=0
timeout=60
services=()
while (($#)); do
    case "$1" in
        --require) require=1 ;;
        --timeout) timeout="$2"; shift ;;
        -h|--help) sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        postgres|redis|nats|rabbitmq) services+=("$1") ;;
        *) echo "services.sh: unknown argument: $1" >&2; exit 2 ;;
    esac
    shift
done
if ((${#services[@]} == 0)); then
    read -r -a services <<<"${BASTION_SERVICES:-postgres redis nats rabbitmq}"
fi

port_of() {
    case "$1" in
        postgres) echo 5432 ;;
        redis) echo 6379 ;;
        nats) echo 4222 ;;
        rabbitmq) echo 5672 ;;
    esac
}

# A TCP connect to the service's port on loopback, bounded to two seconds.
port_open() {
    timeout 2 bash -c "exec 3<>/dev/tcp/127.0.0.1/$1" 2>/dev/null
}

is_up() {
    case "$1" in
        postgres)
            if command -v pg_isready >/dev/null; then
                pg_isready -q -h 127.0.0.1 -p 5432 -t 2
            else
                port_open 5432
            fi
            ;;
        redis)
            if command -v redis-cli >/dev/null; then
                [[ "$(timeout 2 redis-cli -h 127.0.0.1 -p 6379 ping 2>/dev/null)" == PONG ]]
            else
                port_open 6379
            fi
            ;;
        *) port_open "$(port_of "$1")" ;;
    esac
}

start() {
    case "$1" in
        postgres)
            local version
            version="$(ls /etc/postgresql 2>/dev/null | sort -V | tail -n 1)"
            [[ -n "$version" ]] || return 1
            pg_ctlcluster --skip-systemctl-redirect "$version" main start
            ;;
        redis)
            mkdir -p /var/lib/redis /var/log/redis
            redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" \
                --appendonly no --dir /var/lib/redis --logfile /var/log/redis/ci.log
            ;;
        nats)
            mkdir -p /var/lib/nats-server
            start-stop-daemon --start --oknodo --background --exec /usr/sbin/nats-server -- \
                -a 127.0.0.1 -p 4222 -js -sd /var/lib/nats-server -l /var/log/nats-server.log
            ;;
        rabbitmq)
            rabbitmq-server -detached
            ;;
    esac
}

started=()
failed=()
for service in "${services[@]}"; do
    if is_up "$service"; then
        echo "services: $service is up"
        continue
    fi
    echo "services: $service is down; starting it"
    if start "$service" >/dev/null 2>&1; then
        started+=("$service")
    else
        echo "services: could not start $service" >&2
        failed+=("$service")
    fi
done

# Wait for everything started above together: RabbitMQ alone takes 5 to 10 seconds.
deadline=$((SECONDS + timeout))
for service in "${started[@]}"; do
    until is_up "$service"; do
        if ((SECONDS >= deadline)); then
            echo "services: $service did not come up within ${timeout}s" >&2
            failed+=("$service")
            continue 2
        fi
        sleep 0.5
    done
    echo "services: $service is up"
done

if ((${#failed[@]})); then
    if ((require)); then
        echo "services: required but unavailable: ${failed[*]}" >&2
        exit 1
    fi
    echo "services: unavailable (their tests will be skipped): ${failed[*]}" >&2
fi
