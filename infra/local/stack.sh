#!/usr/bin/env bash
# The local stack (S3 + MLflow + Ray head on 127.0.0.1): a thin wrapper over
# `python -m devstack` (infra/local/devstack.py), plus the network namespace a shared host needs.
#
#   infra/local/stack.sh up [--no-ray] [--num-cpus N]   start what is not running; prints the exports
#   infra/local/stack.sh status | env | down
#   infra/local/stack.sh exec CMD [ARGS...]              run a client (ray job submit, python, a shell) beside it,
#                                                        with the venv's bin (PYTHON's folder) first on PATH
#
# Ray binds the machine's own address even when told 127.0.0.1. As root with `ip netns` (a shared host, CI
# sandbox) the whole stack runs in a named, loopback-only namespace that outlives this script; its servers are
# reachable only from commands started with `exec`. Elsewhere (a workstation) it runs directly. Override with
# STACK_NETNS=name, or STACK_NETNS=none for no namespace. Other settings: STACK_STATE_DIR (default .stack),
# PYTHON (default .venv/bin/python).
set -euo pipefail

cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-.venv/bin/python}
STATE_DIR=${STACK_STATE_DIR:-.stack}

if [ -z "${STACK_NETNS+x}" ]; then
  if [ "$(id -u)" = 0 ] && ip netns list >/dev/null 2>&1; then STACK_NETNS=metaformer-stack; else STACK_NETNS=none; fi
fi

ns_exists() { [ "$STACK_NETNS" != none ] && ip netns list | grep -qw "^$STACK_NETNS"; }

in_ns() {  # run "$@" inside the namespace (or directly)
  if [ "$STACK_NETNS" = none ]; then
    "$@"
  elif ns_exists; then
    ip netns exec "$STACK_NETNS" "$@"
  else
    echo "no stack here: network namespace $STACK_NETNS does not exist ('$0 up' creates it)" >&2
    return 1
  fi
}

localstack() {
  in_ns env PYTHONPATH="infra/local${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" -m devstack "$1" --state-dir "$STATE_DIR" "${@:2}"
}

cmd=${1:-}
[ $# -gt 0 ] && shift
case "$cmd" in
  up)
    if [ "$STACK_NETNS" != none ] && ! ns_exists; then
      ip netns add "$STACK_NETNS"
      ip netns exec "$STACK_NETNS" ip link set lo up
      echo "network namespace $STACK_NETNS created (loopback only): use '$0 exec CMD' to reach the stack"
    fi
    localstack up "$@"
    ;;
  down)
    if [ "$STACK_NETNS" != none ] && ! ns_exists; then echo "nothing to stop: no namespace $STACK_NETNS"; exit 0; fi
    localstack down
    # Remove the namespace once nothing runs in it any more.
    if ns_exists && [ -z "$(ip netns pids "$STACK_NETNS")" ]; then
      ip netns delete "$STACK_NETNS"
      echo "network namespace $STACK_NETNS removed"
    fi
    ;;
  status | env)
    localstack "$cmd"
    ;;
  exec)
    [ $# -gt 0 ] || { echo "usage: $0 exec CMD [ARGS...]" >&2; exit 2; }
    # The stack's variables are exported for the command, and the venv's tools (ray, mlflow, python) come first
    # on PATH without an activated venv: `stack.sh exec ray job submit -- python ...` works.
    python_path=$(command -v "$PYTHON") || { echo "PYTHON=$PYTHON: not found (make install creates .venv)" >&2; exit 1; }
    exports=$(localstack env)  # a failure stops here (inside `eval "$(...)"` it would go unnoticed)
    eval "$exports"
    PATH="$(cd "$(dirname "$python_path")" && pwd):$PATH"
    export PATH
    in_ns "$@"
    ;;
  *)
    sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
    ;;
esac
