# PostgreSQL 18 with pgvector and the llmfdw extension (its C host embeds Debian's libpython3.11,
# and its Python half runs from /opt/llmfdw/venv, set as llmfdw.python_path).
#   docker build -f docker/postgres.Dockerfile -t llmfdw/postgres:0.3.0 .   (repository root)
# Built on the official image (Debian bookworm, user postgres uid/gid 999). Also holds
# sql/llm_schema.sql at /usr/share/llmfdw/llm_schema.sql, which the chart's DDL Job runs, and
# Debian's prometheus-postgres-exporter with the vectorizer queries (helm: postgres.exporter).
FROM postgres:18.1-bookworm AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential postgresql-server-dev-18 \
      python3.11-dev python3.11-venv \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY fdw/Makefile fdw/llmfdw.control fdw/llmfdw--*.sql ./fdw/
COPY fdw/src ./fdw/src
RUN make -C fdw PG_CONFIG=/usr/lib/postgresql/18/bin/pg_config \
 && make -C fdw PG_CONFIG=/usr/lib/postgresql/18/bin/pg_config install DESTDIR=/out
# The Python half the backends import: the llmfdw package and gRPC, in a venv of Debian's python3.11.
COPY setup.py pyproject.toml ./
COPY proto ./proto
COPY sidecar ./sidecar
COPY fdw/llm_tables ./fdw/llm_tables
COPY fdw/multicorn ./fdw/multicorn
RUN python3.11 -m venv /opt/llmfdw/venv \
 && /opt/llmfdw/venv/bin/pip install --no-cache-dir pip==26.3 \
 && /opt/llmfdw/venv/bin/pip install --no-cache-dir grpcio==1.85.1 grpcio-health-checking==1.85.1 \
      grpcio-tools==1.85.1 protobuf==7.36.2 PyYAML==6.0.4 setuptools==84.2.1 wheel==0.48.0 \
      jsonschema==4.26.0 jsonschema-specifications==2025.9.1 referencing==0.37.0 rpds-py==2026.9.1 attrs==26.1.0 \
 && /opt/llmfdw/venv/bin/pip install --no-cache-dir --no-deps --no-build-isolation .

FROM postgres:18.1-bookworm
RUN apt-get update \
 && apt-get install -y --no-install-recommends postgresql-18-pgvector libpython3.11 python3.11 \
      prometheus-postgres-exporter \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /out/ /
COPY --from=build /opt/llmfdw /opt/llmfdw
COPY sql/llm_schema.sql /usr/share/llmfdw/llm_schema.sql
# the exporter's login role, which the chart's DDL Job makes (postgres.exporter)
COPY sql/monitor_role.sql /usr/share/llmfdw/monitor_role.sql
# postgres_exporter's vectorizer queries (the chart's optional exporter container: postgres.exporter)
COPY dashboards/postgres_exporter_queries.yaml /usr/share/llmfdw/postgres_exporter_queries.yaml
RUN echo "llmfdw.python_path = '/opt/llmfdw/venv/lib/python3.11/site-packages'" \
      >> /usr/share/postgresql/postgresql.conf.sample
# The vectorizer's background worker (fdw/src/vectorizer.c) drains database llmfdw's queues.
RUN echo "shared_preload_libraries = 'llmfdw'" >> /usr/share/postgresql/postgresql.conf.sample
USER 999:999
# checkov:skip=CKV_DOCKER_2: Kubernetes probes it with pg_isready (helm/templates/postgres-statefulset.yaml)
