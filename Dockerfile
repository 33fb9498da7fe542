# syntax=docker/dockerfile:1
# epvs-bids container: docker run --rm -v /data:/data:ro -v /out:/out -v /scratch:/work epvs-bids /data /out participant
# Build: docker build -t epvs-bids .                        (CPU build of torch)
#        docker build -t epvs-bids:cuda --build-arg TORCH_VARIANT=cu126 .   (CUDA build; run with --gpus all)
# Step-by-step guide, Apptainer and read-only use: docs/containers.md.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---------------------------------------------------------------- build stage
FROM ${PYTHON_IMAGE} AS build
# cpu, or a CUDA tag of the PyTorch wheel index that has torch 2.13.0 (e.g. cu126, cu128)
ARG TORCH_VARIANT=cpu
# the package version (hatch-vcs cannot read git here: .git is not sent to the build)
ARG VERSION=0.1.0
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    SETUPTOOLS_SCM_PRETEND_VERSION=${VERSION} \
    VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:${PATH}
RUN python -m venv /opt/venv

# The README's install commands: torch 2.13.0 first (here from the PyTorch index of the chosen variant),
# then the package. The model weights and the template/atlas kit are package data, so they are in the wheel.
RUN pip install torch==2.13.0 --index-url "https://download.pytorch.org/whl/${TORCH_VARIANT}"
COPY pyproject.toml README.md /src/
COPY bids_app /src/bids_app
COPY epvsprep /src/epvsprep
COPY epvsseg /src/epvsseg
RUN pip install /src && python -c "import torch, bids_app, epvsseg.infer as i; assert i.available_models()"

# TemplateFlow images the template registration uses when present (read-only at run time).
ENV TEMPLATEFLOW_HOME=/opt/templateflow
RUN python - <<'EOF'
from templateflow import api
for res in (1, 2):
    for suffix, desc in (("T1w", None), ("T2w", None), ("mask", "brain")):
        found = api.get("MNI152NLin2009aSym", resolution=res, suffix=suffix, desc=desc, extension=".nii.gz")
        assert found, (res, suffix, desc)
EOF

# -------------------------------------------------------------- runtime stage
FROM ${PYTHON_IMAGE}
ARG VERSION=0.1.0
ARG TORCH_VARIANT=cpu
COPY --from=build /opt/venv /opt/venv
COPY --from=build /opt/templateflow /opt/templateflow
# a non-root user; its home is not needed (caches go to the work directory when HOME is not writable)
RUN useradd --uid 1000 --user-group --no-create-home --home-dir /home/epvs --shell /usr/sbin/nologin epvs \
    && mkdir -p /work /out && chown epvs:epvs /work /out \
    && chmod -R a+rX /opt/templateflow
ENV PATH=/opt/venv/bin:${PATH} \
    HOME=/home/epvs \
    TEMPLATEFLOW_HOME=/opt/templateflow TEMPLATEFLOW_AUTOUPDATE=0 \
    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS=1 \
    NIPYPE_NO_ET=1 NO_ET=1 PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    EPVS_BIDS_CONTAINER=docker EPVS_BIDS_CONTAINER_TAG=${VERSION}-${TORCH_VARIANT}
LABEL org.opencontainers.image.title="epvs-bids" \
      org.opencontainers.image.description="BIDS-App: enlarged perivascular spaces on brain MRI" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0"
USER epvs
WORKDIR /work
ENTRYPOINT ["epvs-bids"]
CMD ["--help"]
