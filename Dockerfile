# keysvc in a container:
#
#     docker build -t keysvc .
#     docker run -p 8080:8080 -v keysvc:/data keysvc
#
# The first start on an empty volume prints a root key with every permission, once (`docker logs`).
# Settings: KEYSVC_<SECTION>__<SETTING> environment variables (see keysvc.example.yaml), e.g.
# `-e KEYSVC_METRICS__HOST=0.0.0.0 -p 9464:9464` to scrape /metrics from outside the container.
#
# No Docker engine runs where keysvc is developed, so this file is not built there. Its steps are
# therefore the README's own: the install is the README's first command, character for character
# (tests/test_dockerfile.py holds them equal), and .ci/run builds the same extension with the same
# pip from a clean checkout on every change; the ENTRYPOINT and HEALTHCHECK commands are run by that
# test too, against a data dir standing in for /data.

FROM python:3.11-slim-bookworm AS build
# A C compiler for the Cython core.
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /opt/keysvc
COPY . .
RUN python3 -m venv .venv && .venv/bin/pip install .

FROM python:3.11-slim-bookworm
RUN useradd --system --uid 10001 --home-dir /data --shell /usr/sbin/nologin keysvc \
    && mkdir -p /data && chown keysvc:keysvc /data && chmod 700 /data
# The venv only, at the path it was built at (its scripts name their interpreter by absolute path).
COPY --from=build /opt/keysvc/.venv /opt/keysvc/.venv
USER keysvc
VOLUME /data
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s \
    CMD ["/opt/keysvc/.venv/bin/python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8080/v2/liveness', timeout=2).status != 200)"]
ENTRYPOINT ["/opt/keysvc/.venv/bin/keysvc", "serve", "--host", "0.0.0.0", "--port", "8080", "--data-dir", "/data"]
