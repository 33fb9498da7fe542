# epvs-bids container (docs/containers.md). Run as yourself, with the input read-only:
#   docker run --rm --user "$(id -u):$(id -g)" -v /data:/data:ro -v /out:/out -v /scratch:/work \
#       epvs-bids /data /out participant -w /work
# Build: docker build -t epvs-bids .                                        (CPU build of torch)
#        docker build -t epvs-bids:cuda --build-arg TORCH_VARIANT=cu126 .   (CUDA build; run with --gpus all)
# Build arguments (none of them reaches the final image: they exist in the build stage only):
#   BASE_IMAGE         a Debian bookworm image with python3.11 and its venv module (python:3.11-slim-bookworm,
#                      or one made locally with debootstrap: scripts/container_check.sh)
#   TORCH_VARIANT      cpu, or a CUDA tag of the PyTorch wheel index (cu126, cu128...); checked after install
#   TORCH_INDEX_URL    where torch 2.13.0 comes from (default: the PyTorch index of TORCH_VARIANT)
#   PIP_INDEX_URL, PIP_EXTRA_INDEX_URL, PIP_FIND_LINKS, PIP_TRUSTED_HOST, PIP_CERT
#                      pip's own settings, for a mirror or a TLS proxy (PIP_CERT is a path inside the build:
#                      provide the file with a bind mount, e.g. podman build -v host.pem:/run/pip-cert.pem:ro)
#   TEMPLATEFLOW_FETCH 1 (default): put the TemplateFlow MNI152NLin2009aSym images into /opt/templateflow;
#                      0: no fetch (no network to TemplateFlow's server); T2w templates are then synthesised,
#                      and each report and provenance record says so
#   VERSION            the package version (hatch-vcs cannot read git here: .git is not sent to the build)
# No "syntax" directive and no heredoc: both need a recent builder (BuildKit pulls an image for the first;
# podman/buildah before 4.9/1.33 mis-handle the second).

ARG BASE_IMAGE=python:3.11-slim-bookworm

# ---------------------------------------------------------------- build stage
FROM ${BASE_IMAGE} AS build
ARG TORCH_VARIANT=cpu
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/${TORCH_VARIANT}
ARG PIP_INDEX_URL=https://pypi.org/simple
ARG PIP_EXTRA_INDEX_URL=
ARG PIP_FIND_LINKS=
ARG PIP_TRUSTED_HOST=
ARG PIP_CERT=
ARG TEMPLATEFLOW_FETCH=1
ARG VERSION=0.1.0
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    SETUPTOOLS_SCM_PRETEND_VERSION=${VERSION} \
    VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:${PATH}
RUN python3 -m venv /opt/venv

# The README's install order: torch 2.13.0 first, then the package; the variant is checked right away
# (a PyPI-only index silently serves the CUDA build) and again after the package's dependencies.
COPY bids_app/environment.py /opt/build/environment.py
RUN pip install "torch==2.13.0" --index-url "${TORCH_INDEX_URL}" \
    && python /opt/build/environment.py --check-torch "${TORCH_VARIANT}"
COPY pyproject.toml README.md /src/
COPY bids_app /src/bids_app
COPY epvsprep /src/epvsprep
COPY epvsseg /src/epvsseg
RUN pip install /src \
    && python /opt/build/environment.py --check-torch "${TORCH_VARIANT}" \
    && python -c "import torch, bids_app, epvsseg.infer as i; assert i.available_models()"

# TemplateFlow images the template registration uses when present (read-only at run time).
ENV TEMPLATEFLOW_HOME=/opt/templateflow
RUN mkdir -p /opt/templateflow \
    && if [ "${TEMPLATEFLOW_FETCH}" = 1 ]; then python -c "from templateflow import api; \
[api.get('MNI152NLin2009aSym', resolution=r, suffix=s, desc=d, extension='.nii.gz') \
 or exit(f'TemplateFlow: MNI152NLin2009aSym res-{r} {s} {d} could not be fetched') \
 for r in (1, 2) for s, d in (('T1w', None), ('T2w', None), ('mask', 'brain'))]"; \
    else echo "TEMPLATEFLOW_FETCH=${TEMPLATEFLOW_FETCH}: no TemplateFlow images (T2w templates are synthesised)"; fi

# What the runtime does not need: the installers, dependencies' test suites, C/C++ headers and static
# libraries (docs/containers.md, "Image size", lists what this removes).
RUN pip uninstall -y -q pip setuptools wheel 2>/dev/null; \
    site=$(python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])") \
    && echo "site-packages before clean-up (MB):" && du -sm "$site" && du -sm "$site"/* | sort -rn | head -12 \
    && find "$site" -type d -name tests -prune -exec rm -rf {} + \
    && rm -rf "$site"/torch/include "$site"/torch/share/cmake \
    && find "$site" -name "*.a" -delete \
    && echo "site-packages after clean-up (MB):" && du -sm "$site" \
    && chmod -R a+rX /opt/venv /opt/templateflow \
    && python -c "import torch, scipy.ndimage, pandas, nibabel, ants, bids, nipype, skimage, nilearn, \
matplotlib, statsmodels, bids_app.cli.run, epvsseg.infer"

# -------------------------------------------------------------- runtime stage
FROM ${BASE_IMAGE}
ARG VERSION=0.1.0
ARG TORCH_VARIANT=cpu
COPY --from=build /opt/venv /opt/venv
COPY --from=build /opt/templateflow /opt/templateflow
# a non-root user without a home folder: caches go to the work folder when HOME is not writable
RUN useradd --uid 1000 --user-group --no-create-home --home-dir /home/epvs --shell /usr/sbin/nologin epvs \
    && mkdir -p /work /out && chown epvs:epvs /work /out
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
