# keysvc in a container: docker build -t keysvc . && docker run -p 8080:8080 -v keysvc:/data keysvc
#
# No Docker engine runs where keysvc is developed, so this file cannot be built there. Its install
# step is therefore the README's own command (python3 -m venv <dir> && <dir>/bin/pip install .),
# which .ci/run exercises on every change: keep the two identical.

FROM python:3.11-slim-bookworm AS build
# A C compiler for the Cython core.
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN python3 -m venv /opt/keysvc && /opt/keysvc/bin/pip install --no-cache-dir .

FROM python:3.11-slim-bookworm
RUN useradd --system --uid 10001 --home-dir /data --shell /usr/sbin/nologin keysvc \
    && mkdir -p /data && chown keysvc:keysvc /data && chmod 700 /data
COPY --from=build /opt/keysvc /opt/keysvc
USER keysvc
VOLUME /data
EXPOSE 8080
# The first start of an empty /data prints the bootstrap root key once: see `docker logs`.
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s \
    CMD ["/opt/keysvc/bin/python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8080/v2/liveness', timeout=2).status != 200)"]
ENTRYPOINT ["/opt/keysvc/bin/keysvc", "serve", "--host", "0.0.0.0", "--port", "8080", "--data-dir", "/data"]
