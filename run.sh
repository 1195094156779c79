#!/usr/bin/env bash
# Set-up and entry points, on a fresh Debian or Ubuntu machine:
#   ./run.sh demo     3 workers and a dozen tasks on your local RabbitMQ, or a throwaway one
#   ./run.sh test     the test suite, on throwaway RabbitMQ nodes (extra arguments go to pytest)
#   ./run.sh lint     ruff check and ruff format --check
#   ./run.sh bench    the benchmark (a few minutes; --quick for a small run)
# Everything Python goes into .venv; rabbitmq-server comes from the system's packages.
set -euo pipefail
cd "$(dirname "$0")"

need_debian_package() {  # need_debian_package PACKAGE WHAT-IS-MISSING
    local package=$1 what=$2
    local sudo=""
    if [ "$(id -u)" != 0 ]; then
        if command -v sudo >/dev/null && sudo -n true 2>/dev/null; then sudo="sudo"; else
            echo "run.sh: $what is missing; install it with: sudo apt-get install $package" >&2
            exit 1
        fi
    fi
    if ! command -v apt-get >/dev/null; then
        echo "run.sh: $what is missing; install the package $package with your system's package manager" >&2
        exit 1
    fi
    echo "run.sh: installing $package (for $what)..." >&2
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "$package" >/dev/null
}

setup_python() {  # setup_python REQUIREMENTS-FILE
    if [ ! -x .venv/bin/python ]; then
        python3 -m venv .venv 2>/dev/null || { need_debian_package python3-venv "Python's venv module"; python3 -m venv .venv; }
    fi
    # Reinstall only when the requirements changed.
    local stamp=".venv/.installed-$(cat requirements*.txt "$1" | sha256sum | cut -c1-16)"
    if [ ! -e "$stamp" ]; then
        .venv/bin/python -m pip install -q --disable-pip-version-check -r "$1"
        touch "$stamp"
    fi
}

setup_rabbitmq() {
    [ -x /usr/lib/rabbitmq/bin/rabbitmq-server ] || need_debian_package rabbitmq-server "RabbitMQ (rabbitmq-server)"
}

case "${1:-}" in
    demo)
        shift
        setup_python requirements.txt
        # The demo can use a broker that already answers; it needs rabbitmq-server only if none does.
        .venv/bin/python -c 'import local_broker,sys; sys.exit(0 if local_broker.amqp_answers("localhost", 5672) else 1)' \
            || setup_rabbitmq
        exec .venv/bin/python exercises.py demo --local "$@"
        ;;
    test)
        shift
        setup_python requirements-dev.txt
        setup_rabbitmq
        exec .venv/bin/python -m pytest "$@"
        ;;
    bench)
        shift
        setup_python requirements-bench.txt  # ours, and Celery and Dramatiq to compare with
        setup_rabbitmq
        exec .venv/bin/python bench/bench.py "$@"
        ;;
    lint)
        setup_python requirements-dev.txt
        .venv/bin/ruff check .
        .venv/bin/ruff format --check .
        ;;
    *)
        sed -n '2,7p' "$0" | sed 's/^# \{0,1\}//'
        exit 2
        ;;
esac
