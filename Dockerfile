# syntax=docker/dockerfile:1
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    SAGABUS_METRICS_PORT=9464

# Unprivileged runtime user.
RUN groupadd --system --gid 10001 sagabus \
 && useradd --system --uid 10001 --gid sagabus --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin sagabus

# Install the project (and its dependencies) into the system site-packages.
# The source tree is copied to /src, installed, then removed so the runtime
# user only sees the installed package.
WORKDIR /src
COPY . /src
RUN pip install --no-cache-dir . \
 && rm -rf /src

WORKDIR /app
USER sagabus:sagabus

# Prometheus metrics (SAGABUS_METRICS_PORT); not published by compose.
EXPOSE 9464

ENTRYPOINT ["sagabus"]
CMD ["run", "all"]
