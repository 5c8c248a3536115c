# The project image: every RayJob stage, the RayService, the long-lived RayCluster and the Kubeflow
# components run in it. One Dockerfile, two builds (docs/deploy.md, "Build and push the images"):
#   docker build --build-arg TORCH_FLAVOR=cpu  -t registry.example.com/streamrec:0.1.0 .        # heads, CPU workers, serving
#   docker build --build-arg TORCH_FLAVOR=cuda -t registry.example.com/streamrec:0.1.0-cuda .   # GPU worker groups
# Both install the same pins (requirements.runtime.lock: requirements.lock without test and lint tools);
# only torch's build differs: the CPU wheel from PyTorch's CPU index, the CUDA wheel (with its CUDA
# runtime libraries as pip packages) from PyPI. Ray needs the same Ray and Python on every node: it has.
# The code is copied, not installed, so Ray workers import it from /app as `python -m ray_jobs.<stage>` does.
#
# The base image: Python 3.11's latest patch release (3.11.7 predates published CVE fixes), pinned by digest:
# a tag moves when Docker rebuilds it, a digest never does. The digest is the tag's multi-architecture index
# as several independent public repositories pin it; no registry is reachable where it was written, so check
# it once before the first build (docs/deploy.md, "Image digests"):
#   docker buildx imagetools inspect python:3.11.14-slim-bookworm --format '{{json .Manifest.Digest}}'
FROM python:3.11.14-slim-bookworm@sha256:65a93d69fa75478d554f4ad27c85c1e69fa184956261b4301ebaf6dbb0a3543d

# cpu or cuda (see above).
ARG TORCH_FLAVOR=cpu
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONPATH=/app \
    RAY_USAGE_STATS_ENABLED=0 \
    GX_ANALYTICS_ENABLED=False \
    HOME=/data \
    TMPDIR=/tmp

# KubeRay's probes run `wget` in the Ray container (serve workers: the proxy's /-/healthz on 8000); tini
# reaps Ray's many child processes. Versions follow the pinned Debian base (bookworm point releases drop
# superseded versions, so exact apt pins would break rebuilds).
# uid 1000 owns /data, its HOME: Ray, torch and Feast write caches under HOME and scratch files under
# TMPDIR. On Kubernetes both are emptyDir mounts, so the root filesystem can be read-only.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends wget tini \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --gid 1000 ray \
    && useradd --uid 1000 --gid 1000 --no-create-home --home-dir /data --shell /usr/sbin/nologin ray \
    && mkdir -p /data \
    && chown 1000:1000 /data

WORKDIR /app
# torch first, the build TORCH_FLAVOR selects; the runtime lock then pins everything else (as `make setup`
# does with the full lock). `torch==X` in the lock accepts the CPU wheel's `X+cpu`, so it stays.
COPY requirements.runtime.lock ./
RUN case "${TORCH_FLAVOR}" in \
        cpu) TORCH_INDEX=https://download.pytorch.org/whl/cpu ;; \
        cuda) TORCH_INDEX=https://pypi.org/simple ;; \
        *) echo "TORCH_FLAVOR must be cpu or cuda, not ${TORCH_FLAVOR}" >&2; exit 1 ;; \
    esac \
    && TORCH_VERSION="$(sed -n 's/^torch==//p' requirements.runtime.lock)" \
    && pip install --index-url "${TORCH_INDEX}" "torch==${TORCH_VERSION}" \
    && pip install -r requirements.runtime.lock

COPY --chown=1000:1000 config ./config
COPY --chown=1000:1000 storage ./storage
COPY --chown=1000:1000 ingestion ./ingestion
COPY --chown=1000:1000 features ./features
COPY --chown=1000:1000 models ./models
COPY --chown=1000:1000 training ./training
COPY --chown=1000:1000 serving ./serving
COPY --chown=1000:1000 ray_jobs ./ray_jobs
COPY --chown=1000:1000 pyproject.toml README.md ./

# The Data Docs' Jinja templates compiled once, here, as pip compiled the packages' bytecode: each run of the
# ingestion job would otherwise compile them again (~0.1 s of a core). The profiles point
# ingest.gx_template_cache at this folder; it is read-only at run time, which the cache allows.
RUN python -m ingestion.expectations --compile-templates /opt/streamrec/gx-templates \
    && chmod -R a+rX /opt/streamrec

# Numeric user: the restricted Pod Security Standard (runAsNonRoot) can verify it without /etc/passwd.
USER 1000:1000
ENTRYPOINT ["/usr/bin/tini", "--"]
CMD ["python", "-m", "ray_jobs.ingest", "--help"]
