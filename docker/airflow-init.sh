#!/usr/bin/env bash
# One-shot init of the compose stack (service airflow-init): refuse short or placeholder
# secrets, then migrate the Airflow metadata database. It creates no users and no secrets.
set -euo pipefail

fail=0
check() {  # check NAME VALUE MIN_LENGTH
    local name=$1 value=$2 min=$3
    if [ "${#value}" -lt "$min" ]; then
        echo "cogumi: $name must be at least $min characters (generate with: openssl rand -hex 64)" >&2
        fail=1
    fi
    case "$value" in
        *CHANGE_ME*)
            echo "cogumi: $name still holds the placeholder from docker/.env.example" >&2
            fail=1
            ;;
    esac
}

check AIRFLOW_JWT_SECRET "${AIRFLOW__API_AUTH__JWT_SECRET:-}" 64
check AIRFLOW_API_SECRET_KEY "${AIRFLOW__API__SECRET_KEY:-}" 32
check AIRFLOW_FERNET_KEY "${AIRFLOW__CORE__FERNET_KEY:-}" 44
check AWS_SECRET_ACCESS_KEY "${AWS_SECRET_ACCESS_KEY:-}" 8
# the password sits inside the connection string: only the placeholder is checked
check POSTGRES_PASSWORD "${AIRFLOW__DATABASE__SQL_ALCHEMY_CONN:-}" 0

if [ "$fail" -ne 0 ]; then
    exit 1
fi
exec airflow db migrate
