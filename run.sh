#!/usr/bin/env bash
# Set-up and entry points, on a fresh Debian or Ubuntu machine:
#   ./run.sh demo     3 workers and a dozen tasks on your local RabbitMQ, or a throwaway one
#   ./run.sh test     the test suite on every supported RabbitMQ side by side: the system's, 4.3, and 4.0
#                     (its queue-semantics tests); --rabbitmq R for one (other arguments go to pytest)
#   ./run.sh lint     ruff check and ruff format --check
#   ./run.sh bench    the benchmark (a few minutes; --quick for a small run; --rabbitmq R)
#   ./run.sh chaos    random faults at a live work queue, and a ledger of every task (--seed N --seconds S
#                     --cluster --rabbitmq R; python chaos.py --help)
#   ./run.sh broker R install RabbitMQ R (system, 4.0 or 4.3) if missing, and start a throwaway node
# Everything Python goes into .venv; the system's rabbitmq-server comes from its packages, and 4.0
# and 4.3 from Debian trixie's and sid's, installed in roots of their own under /var/cache/workqueue.
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

setup_rabbitmq() {  # setup_rabbitmq [RELEASE]: system (the default), 4.0 or 4.3
    case "${1:-system}" in
        system) [ -x /usr/lib/rabbitmq/bin/rabbitmq-server ] || need_debian_package rabbitmq-server "RabbitMQ (rabbitmq-server)" ;;
        4.0) setup_rabbitmq_root 4.0 trixie ;;
        4.3) setup_rabbitmq_root 4.3 sid ;;
        *) echo "run.sh: unknown RabbitMQ release '$1': choose system, 4.0 or 4.3" >&2; exit 2 ;;
    esac
}

setup_rabbitmq_root() {  # setup_rabbitmq_root RELEASE DEBIAN-SUITE: a minimal Debian root with its rabbitmq-server
    local root=/var/cache/workqueue/rabbitmq-$1
    [ -x "$root/usr/lib/rabbitmq/bin/rabbitmq-server" ] && return
    if [ "$(id -u)" != 0 ]; then
        echo "run.sh: RabbitMQ $1 runs in a Debian root under chroot, which needs root: run this as root (sudo)," >&2
        echo "        or start RabbitMQ $1 some other way (a container) and give the scripts its URL in AMQP_URL" >&2
        exit 1
    fi
    command -v debootstrap >/dev/null || need_debian_package debootstrap "debootstrap (to install RabbitMQ $1)"
    echo "run.sh: installing RabbitMQ $1 from Debian $2's packages into $root (about a minute, 500 MB)..." >&2
    mkdir -p "$(dirname "$root")"
    exec 9>"$root.lock"  # one install at a time (two test runs starting together)
    flock 9
    if [ -x "$root/usr/lib/rabbitmq/bin/rabbitmq-server" ]; then exec 9>&-; return; fi
    local partial=$root.partial
    if [ -e "$partial" ]; then  # an earlier try that did not finish: unmount what it mounted, then remove it
        findmnt -rn -o TARGET | grep -F "$partial/" | sort -r | xargs -r -n1 umount -l || true
        rm -rf "$partial"
    fi
    debootstrap --variant=minbase "$2" "$partial" >"$partial.log" 2>&1 \
        || { echo "run.sh: debootstrap $2 failed; see $partial.log" >&2; exit 1; }
    cp /etc/hosts "$partial/etc/hosts"  # Erlang resolves localhost through it
    printf '#!/bin/sh\nexit 101\n' >"$partial/usr/sbin/policy-rc.d"  # install, start no service
    chmod +x "$partial/usr/sbin/policy-rc.d"
    # Debian's unstable index may be past its Valid-Until on a mirror that is a snapshot: accept it.
    chroot "$partial" sh -c 'apt-get -o Acquire::Check-Valid-Until=false update -qq &&
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends rabbitmq-server' \
        >>"$partial.log" 2>&1 || { echo "run.sh: installing rabbitmq-server in $partial failed; see $partial.log" >&2; exit 1; }
    rm -f "$partial.log"
    mv "$partial" "$root"
    exec 9>&-
}

# --rabbitmq RELEASE anywhere in the arguments: which RabbitMQ the throwaway nodes run (taken out of "$@").
RABBITMQ_RELEASE=""
arguments=()
for argument in "$@"; do
    if [ "${take_release:-0}" = 1 ]; then RABBITMQ_RELEASE=$argument; take_release=0; continue; fi
    case "$argument" in
        --rabbitmq) take_release=1 ;;
        --rabbitmq=*) RABBITMQ_RELEASE=${argument#--rabbitmq=} ;;
        *) arguments+=("$argument") ;;
    esac
done
if [ "${take_release:-0}" = 1 ]; then echo "run.sh: --rabbitmq needs a release: system, 4.0 or 4.3" >&2; exit 2; fi
set -- "${arguments[@]+"${arguments[@]}"}"
if [ -n "$RABBITMQ_RELEASE" ]; then export WORKQUEUE_RABBITMQ=$RABBITMQ_RELEASE; fi

case "${1:-}" in
    demo)
        shift
        setup_python requirements.txt
        # The demo can use a broker that already answers; it needs rabbitmq-server only if none does.
        if [ -n "$RABBITMQ_RELEASE" ]; then
            setup_rabbitmq "$RABBITMQ_RELEASE"  # a throwaway node of that release, even if a broker answers
            exec .venv/bin/python exercises.py demo "$@"
        fi
        .venv/bin/python -c 'import local_broker,sys; sys.exit(0 if local_broker.amqp_answers("localhost", 5672) else 1)' \
            || setup_rabbitmq
        exec .venv/bin/python exercises.py demo --local "$@"
        ;;
    test)
        shift
        setup_python requirements-dev.txt
        # Tests side by side: xdist workers, each with throwaway nodes of its own (tests/conftest.py).
        # Arguments after these win: -n 0 runs them one at a time, as you would to debug.
        # Three a release when all three run side by side; five for one release alone: the tests mostly wait.
        side_by_side=(-n "${WORKQUEUE_TEST_WORKERS:-3}" --dist loadgroup --durations 10)
        if [ -n "$RABBITMQ_RELEASE" ]; then
            setup_rabbitmq "$RABBITMQ_RELEASE"
            side_by_side[1]=${WORKQUEUE_TEST_WORKERS:-5}
            exec .venv/bin/python -m pytest "${side_by_side[@]}" -o cache_dir=".pytest_cache/$RABBITMQ_RELEASE" "$@"
        fi
        # Every supported release, side by side: the whole suite on the system's and on 4.3, the queue
        # semantics on 4.0. Each one's output goes to a log of its own, shown whole if it fails.
        releases=(system 4.3 4.0)
        if [ "$(id -u)" != 0 ] && [ ! -x /var/cache/workqueue/rabbitmq-4.3/usr/lib/rabbitmq/bin/rabbitmq-server ]; then
            echo "run.sh: RabbitMQ 4.0 and 4.3 run under chroot, which needs root: testing on the system's RabbitMQ" >&2
            echo "        only (run ./run.sh test as root, or with sudo, for all three)" >&2
            releases=(system)
        fi
        for release in "${releases[@]}"; do setup_rabbitmq "$release"; done
        mkdir -p .test-logs
        rm -f .test-logs/*.seconds
        echo "run.sh: the tests on RabbitMQ ${releases[*]}, side by side (about 12 minutes on 2 cores); their output in .test-logs/" >&2
        began=$SECONDS
        # Ctrl+C or a stop: every pytest gets Ctrl+C (they stop their nodes), and this waits for them.
        trap 'trap - INT TERM; kill -INT 0 2>/dev/null; wait; echo "run.sh: tests interrupted" >&2; exit 130' INT TERM
        declare -A pids=()
        for release in "${releases[@]}"; do
            only=(); [ $release = 4.0 ] && only=(-m queue_semantics)
            (
                start=$SECONDS
                code=0
                WORKQUEUE_RABBITMQ=$release .venv/bin/python -m pytest "${side_by_side[@]}" "${only[@]+"${only[@]}"}" \
                    -o cache_dir=".pytest_cache/$release" "$@" >".test-logs/$release.log" 2>&1 || code=$?
                echo "$((SECONDS - start))" >".test-logs/$release.seconds"
                exit $code
            ) &
            pids[$release]=$!
        done
        failed=()
        ran=0
        for release in "${releases[@]}"; do
            code=0; wait "${pids[$release]}" || code=$?
            log=.test-logs/$release.log
            version=$(sed -n 's/^rabbitmq: .* (\(.*\))$/\1/p' "$log" | head -1) || true
            # pytest's last line: "=== 260 passed in 301.20s (0:05:01) ===", less its time
            outcome=$(grep -E '(passed|failed|errors?|skipped|deselected|no tests ran)' "$log" | tail -1 \
                | sed -E 's/^=+ //; s/ =+$//; s/ in [0-9.]+s.*$//') || true
            seconds=$(cat ".test-logs/$release.seconds" 2>/dev/null) || seconds="?"
            case $code in
                0) ran=1 ;;
                5) ;;  # no test selected on this release (-k cluster on 4.0, say)
                *) failed+=("$release"); ran=1; cat "$log" >&2 ;;
            esac
            printf 'run.sh: RabbitMQ %s (%s): %s, %s s\n' "$release" "${version:-?}" "${outcome:-no summary, see $log}" "$seconds" >&2
        done
        trap - INT TERM
        echo "run.sh: ${#releases[@]} release(s) in $((SECONDS - began)) s" >&2
        if [ ${#failed[@]} -gt 0 ]; then echo "run.sh: tests failed on RabbitMQ ${failed[*]}" >&2; exit 1; fi
        if [ $ran = 0 ]; then echo "run.sh: no test was selected on any release" >&2; exit 5; fi
        ;;
    bench)
        shift
        setup_python requirements-bench.txt  # ours, and Celery and Dramatiq to compare with
        setup_rabbitmq "${RABBITMQ_RELEASE:-${WORKQUEUE_RABBITMQ:-system}}"  # the release its nodes will run
        exec .venv/bin/python bench/bench.py "$@"
        ;;
    chaos)
        shift
        setup_python requirements.txt
        setup_rabbitmq "${RABBITMQ_RELEASE:-${WORKQUEUE_RABBITMQ:-system}}"  # the release its nodes will run
        exec .venv/bin/python chaos.py "$@"
        ;;
    broker)
        shift
        setup_python requirements.txt
        release=${RABBITMQ_RELEASE:-system}
        case "${1:-}" in
            system | 4.0 | 4.3) release=$1; shift ;;
            [0-9]*) echo "run.sh: unknown RabbitMQ release '$1': choose system, 4.0 or 4.3" >&2; exit 2 ;;
        esac
        setup_rabbitmq "$release"
        exec .venv/bin/python local_broker.py --rabbitmq "$release" "$@"
        ;;
    lint)
        setup_python requirements-dev.txt
        .venv/bin/ruff check .
        .venv/bin/ruff format --check .
        ;;
    *)
        sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'
        exit 2
        ;;
esac
