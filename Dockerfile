# syntax=docker/dockerfile:1
# The MMATS image: the `mmats` command (CLI, workers, migrations) on Python 3.12.
# In docker-compose.yml it runs the one-shot `migrate` service; any other command is
# `docker compose run --rm migrate ...` or `docker run mmats <args>`.

FROM python:3.12-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY . .
# a wheel of the project alone; its dependencies are resolved in the final stage
RUN pip wheel --no-deps --wheel-dir /wheels .

FROM python:3.12-slim
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    TZ=UTC
RUN groupadd --system --gid 10001 mmats \
    && useradd --system --uid 10001 --gid mmats --create-home --home-dir /home/mmats \
       --shell /usr/sbin/nologin mmats
COPY --from=build /wheels /wheels
RUN pip install /wheels/*.whl && rm -rf /wheels
USER mmats
WORKDIR /home/mmats
# MMATS_DATABASE_URL names the server (compose sets it); the embedded server is for
# development, not containers
ENV MMATS_HOME=/home/mmats/.mmats
ENTRYPOINT ["mmats"]
CMD ["--help"]
