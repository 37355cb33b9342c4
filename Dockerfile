# syntax=docker/dockerfile:1
# clado-supervisor container image (BuildKit, Docker's default builder since 23.0, for
# RUN --mount and COPY --chmod).
#   docker build -t clado-supervisor .
#   docker compose -f deploy/compose.yaml up -d          # the documented way to run it
# The base tag is pinned to a Python minor and a Debian release; pin its digest too
# (python:3.11-slim-bookworm@sha256:…) for byte-for-byte reproducible builds.

# --- Stage 1: build the wheel (the Alembic scripts ship inside it) --------------------
FROM python:3.11-slim-bookworm AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_ROOT_USER_ACTION=ignore
WORKDIR /src
# Only what the wheel is built from (.dockerignore keeps the rest out of the context).
COPY pyproject.toml README.md LICENSE ./
COPY supervisor ./supervisor
COPY migrations ./migrations
RUN pip wheel --no-cache-dir --no-deps -w /dist .

# --- Stage 2: the runtime: the wheel and its dependencies, nothing else ---------------
FROM python:3.11-slim-bookworm
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_ROOT_USER_ACTION=ignore \
    CLADO_SUPERVISOR_CONFIG=/etc/clado-supervisor/supervisor.toml

# The wheel is bind-mounted from stage 1 rather than copied, so it adds no layer; so are
# the pinned versions of every dependency (requirements/constraints.txt, the pins `make
# install` uses too), so the image resolves nothing at build time. [postgres] brings the
# PostgreSQL driver, for the replicas' compose file. uvloop, the event loop the daemon runs
# on (cheaper per poll than asyncio's own), is a core dependency: no extra needed.
# A fixed uid/gid (10001, above any host account) so volume and secret ownership can be
# set from the host; the state directory is created owned by it before VOLUME, and
# Docker copies that ownership into a new named volume.
RUN --mount=type=bind,from=build,source=/dist,target=/dist \
    --mount=type=bind,source=requirements/constraints.txt,target=/tmp/constraints.txt \
    pip install --no-cache-dir --constraint /tmp/constraints.txt "$(ls /dist/*.whl)[postgres]" \
    && groupadd --system --gid 10001 clado \
    && useradd --system --no-log-init --uid 10001 --gid 10001 \
        --home-dir /var/lib/clado-supervisor --no-create-home --shell /usr/sbin/nologin clado \
    && install -d -o 10001 -g 10001 -m 0700 /var/lib/clado-supervisor \
    && install -d -m 0755 /etc/clado-supervisor

# No secrets in here (the API key is a Docker secret at /run/secrets/clado_api_key).
COPY --chmod=0644 deploy/supervisor.container.toml /etc/clado-supervisor/supervisor.toml

# The SQLite database (and anything else the daemon keeps) lives in the volume.
WORKDIR /var/lib/clado-supervisor
VOLUME /var/lib/clado-supervisor

USER 10001:10001

# The admin API and /healthz ([http] listen = "0.0.0.0:8787").
EXPOSE 8787

# `clado-supervisor healthcheck` asks the running daemon's /healthz and exits 0 when it
# is healthy. start-period covers the schema migration that `run` does first.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["clado-supervisor", "healthcheck"]

# SIGTERM (Docker's default stop signal) stops the daemon gracefully; SIGHUP reloads the
# config. Logs are JSON lines on stderr ([logging] format = "json"); Docker collects
# stdout and stderr alike.
STOPSIGNAL SIGTERM
ENTRYPOINT ["clado-supervisor"]
CMD ["run"]
