# The stockstream image: the worker (default command), the producer and every `stockstream`
# command, through deploy/docker/entrypoint.sh. Stages:
#   build      installs the locked dependencies (hash-checked wheels only) and the project into a
#              virtualenv; nothing of it but that virtualenv reaches the runtime image
#   analytics-build, analytics
#              the official Airflow image plus the same virtualenv and dbt in one of its own, for
#              the compose profile `analytics` (dbt/, dags/ and deploy/airflow/ are mounted)
#   runtime    Python slim, the virtualenv, a non-root user, no compilers; the last stage, so
#              the one a plain `docker build .` makes
# Build: docker build -t stockstream .   (docker compose builds `runtime` and `analytics` itself)
# The bases are pinned by tag and digest (linux/amd64 is what deploy/docker/requirements.txt
# locks; README, "Docker"). Regenerate the locks with deploy/docker/lock.sh.

FROM python:3.11.14-slim-bookworm@sha256:65a93d69fa75478d554f4ad27c85c1e69fa184956261b4301ebaf6dbb0a3543d AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
# The virtualenv sits at the path it keeps in the runtime image: its scripts name their
# interpreter by absolute path.
RUN python -m venv /opt/stockstream/.venv
COPY deploy/docker/requirements.txt ./
# Dependencies first, from the lock alone, so a source change reuses this layer.
RUN /opt/stockstream/.venv/bin/pip install --no-deps --only-binary :all: --require-hashes \
        -r requirements.txt
COPY pyproject.toml README.md ./
COPY stockstream ./stockstream
# The project itself, without touching the locked dependencies (pip check proves none is missing).
RUN /opt/stockstream/.venv/bin/pip install --no-deps . \
    && /opt/stockstream/.venv/bin/pip check \
    && /opt/stockstream/.venv/bin/pip uninstall --yes pip setuptools


# The analytics image's virtualenvs, made by the Python that will run them (the Airflow image
# builds its own, under /usr/python): the project's, and dbt's apart (dbt-core pins versions the
# project's tools outgrew; scripts/bootstrap.sh does the same with .venv-dbt).
FROM apache/airflow:3.3.2-python3.11 AS analytics-build
# The Airflow image installs into the user's site-packages by default; a virtualenv has none.
ENV PIP_USER=false \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
USER 0
RUN install -d -o 50000 -g 0 -m 0775 /opt/stockstream /src
USER 50000:0
WORKDIR /src
COPY deploy/docker/requirements.txt deploy/docker/requirements-dbt.txt ./
RUN python -m venv /opt/stockstream/.venv \
    && /opt/stockstream/.venv/bin/pip install --no-deps --only-binary :all: --require-hashes \
        -r requirements.txt
RUN python -m venv /opt/stockstream/.venv-dbt \
    && /opt/stockstream/.venv-dbt/bin/pip install --no-deps --only-binary :all: --require-hashes \
        -r requirements-dbt.txt \
    && /opt/stockstream/.venv-dbt/bin/pip check \
    && /opt/stockstream/.venv-dbt/bin/pip uninstall --yes pip setuptools
COPY pyproject.toml README.md ./
COPY stockstream ./stockstream
RUN /opt/stockstream/.venv/bin/pip install --no-deps . \
    && /opt/stockstream/.venv/bin/pip check \
    && /opt/stockstream/.venv/bin/pip uninstall --yes pip setuptools


# Airflow 3.3.2 (its image runs as uid 50000, gid 0) with the two virtualenvs.
FROM apache/airflow:3.3.2-python3.11 AS analytics
COPY --from=analytics-build /opt/stockstream /opt/stockstream
COPY --chown=50000:0 config /opt/stockstream/config
# /opt/stockstream is laid out like the repository, so scripts/dbt.sh finds .venv-dbt and dbt/
# (mounted by the compose file) where it looks for them.
# The project's commands after Airflow's own: `stockstream` resolves, `python` stays Airflow's.
ENV PATH=$PATH:/opt/stockstream/.venv/bin \
    STOCKSTREAM_CONFIG_DIR=/opt/stockstream/config \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /opt/stockstream
USER 50000:0
HEALTHCHECK --interval=30s --timeout=10s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8080/api/v2/monitor/health', timeout=8).status != 200)"]
CMD ["standalone"]


FROM python:3.11.14-slim-bookworm@sha256:65a93d69fa75478d554f4ad27c85c1e69fa184956261b4301ebaf6dbb0a3543d AS runtime
LABEL org.opencontainers.image.title="stockstream" \
      org.opencontainers.image.description="Real-time stock analytics: Kafka + Faust worker, producer and CLI" \
      org.opencontainers.image.licenses="MIT"
# A fixed numeric uid, so volumes and Kubernetes' runAsNonRoot can rely on it. The warehouse
# and spool folders exist here so that a fresh named volume mounted on them takes their owner.
RUN groupadd --system --gid 10001 stockstream \
    && useradd --system --uid 10001 --gid stockstream --no-create-home \
        --home-dir /var/lib/stockstream --shell /usr/sbin/nologin stockstream \
    && install -d -o stockstream -g stockstream -m 0750 /var/lib/stockstream \
        /var/lib/stockstream/warehouse /var/lib/stockstream/spool
COPY --from=build /opt/stockstream/.venv /opt/stockstream/.venv
COPY config /opt/stockstream/config
COPY deploy/docker/entrypoint.sh deploy/docker/healthcheck.py /opt/stockstream/bin/
ENV PATH=/opt/stockstream/.venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    STOCKSTREAM_CONFIG_DIR=/opt/stockstream/config \
    STOCKSTREAM_DATA_DIR=/var/lib/stockstream
WORKDIR /var/lib/stockstream
USER 10001:10001
EXPOSE 6066
# Liveness of the worker; the compose file points the producer's check at its metrics port.
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "/opt/stockstream/bin/healthcheck.py"]
# Through sh, so the script needs no executable bit (a checkout may lose it); it execs the
# command, which becomes PID 1 and gets the stop signal.
ENTRYPOINT ["/bin/sh", "/opt/stockstream/bin/entrypoint.sh"]
CMD ["worker"]
