#!/usr/bin/env bash
# Entrypoint of the cogumi/gpu-worker image, for both ways it runs:
#   - KubernetesPodOperator pods: `cogumi run-step <step> ...`, or only the arguments
#     `run-step <step> ...` (then this prepends `cogumi`);
#   - the Edge worker for queue "gpu": `airflow edge worker -q gpu`.
# A first argument that is a program on PATH (cogumi, airflow, python, bash, ...) runs as given;
# anything else (a cogumi subcommand or an option) goes to `cogumi`. No argument: `cogumi --help`.
set -euo pipefail

if [ "$#" -eq 0 ]; then
    set -- cogumi --help
fi
case "$1" in
    -*) exec cogumi "$@" ;;
esac
if command -v -- "$1" >/dev/null 2>&1; then
    exec "$@"
fi
exec cogumi "$@"
