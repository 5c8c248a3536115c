# The project image: every RayJob stage, the RayService and the Kubeflow components run in it.
#   docker build -t registry.example.com/streamrec:0.1.0 .                          # CUDA torch (GPU workers)
#   docker build --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cpu -t ...:0.1.0-cpu .
# Dependencies come only from requirements.lock (the pins CI tests); the code is copied, not installed,
# so Ray workers import it from /app exactly as `python -m ray_jobs.<stage>` does in the repository.
FROM python:3.11.7-slim-bookworm

ARG TORCH_INDEX=https://pypi.org/simple
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONPATH=/app \
    RAY_USAGE_STATS_ENABLED=0 \
    GX_ANALYTICS_ENABLED=False \
    HOME=/home/ray

# Ray's dashboard and KubeRay's probes use wget; tini reaps Ray's many child processes.
# Versions follow the pinned Debian base (bookworm point releases drop superseded versions, so exact
# apt pins would break rebuilds).
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends wget tini \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --gid 1000 ray \
    && useradd --uid 1000 --gid 1000 --create-home --home-dir /home/ray ray

WORKDIR /app
# torch first, from the index for the image's flavour; the lock then pins everything else (as `make setup`).
COPY requirements.lock ./
RUN TORCH_VERSION="$(sed -n 's/^torch==//p' requirements.lock)" \
    && pip install --index-url "${TORCH_INDEX}" "torch==${TORCH_VERSION}" \
    && pip install -r requirements.lock

COPY --chown=1000:1000 config ./config
COPY --chown=1000:1000 ingestion ./ingestion
COPY --chown=1000:1000 features ./features
COPY --chown=1000:1000 models ./models
COPY --chown=1000:1000 training ./training
COPY --chown=1000:1000 serving ./serving
COPY --chown=1000:1000 ray_jobs ./ray_jobs
COPY --chown=1000:1000 pyproject.toml README.md ./

# Numeric user: the restricted Pod Security Standard (runAsNonRoot) can verify it without /etc/passwd.
USER 1000:1000
ENTRYPOINT ["/usr/bin/tini", "--"]
CMD ["python", "-m", "ray_jobs.ingest", "--help"]
