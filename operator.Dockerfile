# The kubetune operator image: the `operator` extra only (kopf, kubernetes, prometheus-client; no torch).
#
#   DOCKER_BUILDKIT=0 docker build -f operator.Dockerfile -t kubetune/operator:0.1.0 \
#       --build-arg BASE_IMAGE=python:3.11-slim-bookworm .
#
# Build args: BASE_IMAGE (any Debian/Ubuntu image with python3 >= 3.10 and its venv module),
# PIP_FIND_LINKS (a wheel directory/URL: install offline from it), CA_BUNDLE_URL (a CA bundle fetched in the
# same step that uses it, for TLS-intercepting proxies; no layer keeps it). The build context is the
# repository root (see .dockerignore): only pyproject.toml, README.md and operator/ are copied.
ARG BASE_IMAGE=kubetune/debian-python:bookworm
FROM ${BASE_IMAGE}
ARG PIP_FIND_LINKS=
ARG CA_BUNDLE_URL=
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PATH=/opt/venv/bin:$PATH
COPY pyproject.toml README.md /src/
COPY operator/ /src/operator/
RUN set -eu; python3 -m venv /opt/venv; \
    if [ -n "$PIP_FIND_LINKS" ]; then \
      pip install --no-cache-dir --no-compile --no-index --find-links "$PIP_FIND_LINKS" "/src[operator]"; \
    elif [ -n "$CA_BUNDLE_URL" ]; then \
      python3 -c "import urllib.request,sys; urllib.request.urlretrieve(sys.argv[1], '/tmp/ca.pem')" "$CA_BUNDLE_URL"; \
      pip install --no-cache-dir --no-compile --cert /tmp/ca.pem "/src[operator]"; rm -f /tmp/ca.pem; \
    else \
      pip install --no-cache-dir --no-compile "/src[operator]"; \
    fi; \
    pip uninstall -y pip setuptools wheel >/dev/null 2>&1 || true; \
    rm -rf /src /root/.cache; \
    python3 -m compileall -q /opt/venv/lib; \
    echo "kubetune:x:10001:10001:kubetune operator:/nonexistent:/usr/sbin/nologin" >> /etc/passwd; \
    echo "kubetune:x:10001:" >> /etc/group; \
    python3 -c "import kubetune.operator.__main__, kopf, prometheus_client; import importlib.util as u; assert u.find_spec('torch') is None"
USER 10001:10001
EXPOSE 8080 8081
ENTRYPOINT ["python", "-m", "kubetune.operator"]
