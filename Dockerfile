# syntax=docker/dockerfile:1
# The enrollment-service image. The build stage installs the hash-pinned dependencies and the
# package into a virtualenv; the runtime stage copies only that virtualenv onto a slim Python and
# runs the server as an unprivileged user, as PID 1, so SIGTERM reaches it.
#
#   docker build -t enrollment-service .
#   docker run --rm -e DATABASE_URL=postgresql://... enrollment-service enrollment-service migrate
#   docker run --rm -p 8000:8000 -e DATABASE_URL=postgresql://... enrollment-service
#
# docker-compose.yml wires it to PostgreSQL; docs/operations.md explains every setting.

# The lock (requirements/prod.lock) is compiled for Python 3.11: keep the two in step.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
# Dependencies first, each checked against its hash: this layer is rebuilt only when the lock is.
COPY requirements/prod.lock requirements/build.lock requirements/
RUN pip install --require-hashes --no-deps -r requirements/prod.lock
# The build backend, hash-pinned, in a virtualenv of its own (it does not ship in the image):
# pip's build isolation would fetch whatever hatchling is newest, unchecked.
RUN python -m venv /opt/build \
 && /opt/build/bin/pip install --require-hashes --no-deps -r requirements/build.lock
COPY pyproject.toml README.md ./
COPY enrollment_service enrollment_service
COPY sql sql
COPY migrations migrations
# The package itself (its sql/ and migrations/ go inside it); pip check proves the lock held
# everything it needs.
RUN /opt/build/bin/pip wheel --no-deps --no-build-isolation --wheel-dir /tmp/wheel . \
 && pip install --no-deps /tmp/wheel/*.whl \
 && pip check

FROM ${PYTHON_IMAGE} AS runtime
RUN groupadd --system --gid 10001 enrollment \
 && useradd --system --uid 10001 --gid enrollment --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin enrollment
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOST=0.0.0.0 \
    PORT=8000
USER 10001:10001
EXPOSE 8000
# Liveness only (never the database), with the Python the image already has: no curl needed.
HEALTHCHECK --interval=10s --timeout=3s --start-period=15s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('PORT', '8000') + '/health/live', timeout=2)"]
# Exec form: the server is PID 1 and receives SIGTERM itself (readiness 503, drain, exit 0).
CMD ["enrollment-service", "serve"]
