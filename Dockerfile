# The project's image: Ray + this package, used by every pod of k8s/raycluster.yaml and
# k8s/rayjob-*.yaml (head, CPU and GPU workers, RayJob submitter).
#   docker build -t ghcr.io/OWNER/lstm-pipeline:0.1.0 . && docker push ghcr.io/OWNER/lstm-pipeline:0.1.0
# The base tag's Ray version must equal the one pinned in pyproject.toml (ray[...]==2.60.*)
# and the image tag the project version; tests/test_k8s.py checks both.
#
# The base is Ray's CPU image; GPU pods still work because torch from PyPI (installed
# below with the project's dependencies) bundles the CUDA runtime, cuDNN and NCCL: the
# node only needs the NVIDIA driver and device plugin. (rayproject/ray:2.60.0-py311-gpu
# would add a system CUDA toolkit the project does not use.)
FROM rayproject/ray:2.60.0-py311

ENV PIPELINE_CONF_DIR=/app/conf \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# The base image runs as user `ray` (uid 1000, group users); pip builds the package in
# place, so /app must be writable by that user.
USER root
RUN mkdir -p /app && chown ray:users /app
USER ray
WORKDIR /app

# pyproject.toml names README.md as the package's readme, so the build needs it.
COPY --chown=ray:users pyproject.toml README.md ./
COPY --chown=ray:users pipeline/ pipeline/
COPY --chown=ray:users conf/ conf/
RUN pip install --no-cache-dir /app && rm -rf /app/build /app/*.egg-info
