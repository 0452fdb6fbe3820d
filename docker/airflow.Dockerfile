# syntax=docker/dockerfile:1
# Airflow image of the Cogumi stack (api-server, scheduler, dag-processor, triggerer, init).
# Base: the official apache/airflow image (entrypoint, `airflow` user uid 50000, psycopg2, curl),
# with the cogumi package and its `airflow` extra installed on top, plus the DAGs, the plugins
# (cogumi_provider) and the YAML configs.
#
#   docker build -f docker/airflow.Dockerfile -t cogumi/airflow:0.1.0 .
#
# Build from the repository root. docker/airflow.Dockerfile.dockerignore keeps the context small
# (BuildKit, the default builder of docker >= 23 and of `docker compose`).
ARG AIRFLOW_BASE_IMAGE=apache/airflow:3.3.2-python3.11
FROM ${AIRFLOW_BASE_IMAGE}

# Extras of the cogumi package to install: add "ml" to run model steps with compute=local here.
ARG COGUMI_EXTRAS=airflow

USER root
RUN mkdir -p /opt/cogumi/src /opt/cogumi/bin /opt/airflow/auth \
    && chown -R airflow:0 /opt/cogumi /opt/airflow/auth
USER airflow
WORKDIR /opt/airflow

# The package first (best layer caching: DAG edits do not reinstall dependencies).
COPY --chown=airflow:0 pyproject.toml /opt/cogumi/src/pyproject.toml
COPY --chown=airflow:0 cogumi_tasks /opt/cogumi/src/cogumi_tasks
# Installing apache-airflow at the image's own version keeps pip from moving Airflow itself.
RUN pip install --no-cache-dir \
        "apache-airflow[postgres,statsd]==${AIRFLOW_VERSION}" \
        "/opt/cogumi/src[${COGUMI_EXTRAS}]" \
    && python -c "import cogumi_tasks, airflow.providers.edge3, airflow.providers.amazon"

COPY --chown=airflow:0 docker/airflow-init.sh /opt/cogumi/bin/airflow-init.sh
COPY --chown=airflow:0 configs /opt/cogumi/configs
COPY --chown=airflow:0 plugins /opt/airflow/plugins
COPY --chown=airflow:0 dags /opt/airflow/dags

ENV COGUMI_CONFIG_DIR=/opt/cogumi/configs \
    AIRFLOW__CORE__DAGS_FOLDER=/opt/airflow/dags \
    AIRFLOW__CORE__PLUGINS_FOLDER=/opt/airflow/plugins
