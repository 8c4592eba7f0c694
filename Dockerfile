# keyprep: BIDS App for brain MRI registration.
#   docker build -t keyprep:0.1.0 .                                    # CPU torch (default)
#   docker build --build-arg TORCH_VARIANT=cu128 -t keyprep:0.1.0-cuda .  # a CUDA build of torch
#   docker run --rm -u $(id -u):$(id -g) -v /data/bids:/data:ro -v /data/out:/out \
#       -v /scratch/work:/work keyprep:0.1.0 /data /out participant -w /work
# GPU hosts: run the CUDA image with --gpus all (docker) or --nv (apptainer); the host driver
# is used, no driver is installed in the image. HPC use: docs/hpc.md.
#
# Everything is installed by scripts/install_keyprep.sh at the versions of requirements.lock,
# the same script that CI runs in a clean virtual environment (tests/test_install_script.py). The image holds keyprep, torch,
# the bundled template and the skull-stripping weights: nothing is downloaded at run time.
FROM python:3.11-slim-bookworm

# cpu, or a CUDA wheel index of PyTorch (cu126, cu128, ...: see pytorch.org for the
# variants built for the pinned torch version).
ARG TORCH_VARIANT=cpu
# empty: the torch pin of requirements.lock
ARG TORCH_SPEC=""
ARG VERSION=0.1.0
ARG BUILD_DATE
ARG VCS_REF

# The ANTs/ITK and BLAS thread pools are set per node by keyprep (--omp-nthreads).
ENV OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 NIPYPE_NO_ET=1 NO_ET=1 \
    MPLCONFIGDIR=/tmp/matplotlib KEYPREP_DOCKER_TAG=${VERSION} \
    PATH=/opt/keyprep/bin:${PATH}

# Dependencies first, in their own layer: it depends only on the install script and the
# lock (every package pinned), so a change to keyprep's code does not reinstall torch.
COPY requirements.lock /src/keyprep/requirements.lock
COPY scripts/install_keyprep.sh /src/keyprep/scripts/install_keyprep.sh
RUN PIP_NO_CACHE_DIR=1 PIP_ROOT_USER_ACTION=ignore KEYPREP_TORCH_SPEC="${TORCH_SPEC}" \
    bash /src/keyprep/scripts/install_keyprep.sh --venv /opt/keyprep \
      --torch-variant "${TORCH_VARIANT}" --with-system-packages --deps-only

# Then keyprep itself (the build context is filtered by .dockerignore: no .venv, work
# folders or benchmarks); its dependencies are already there at the locked versions.
COPY . /src/keyprep
RUN PIP_NO_CACHE_DIR=1 PIP_ROOT_USER_ACTION=ignore KEYPREP_TORCH_SPEC="${TORCH_SPEC}" \
    bash /src/keyprep/scripts/install_keyprep.sh --venv /opt/keyprep \
      --torch-variant "${TORCH_VARIANT}" \
 && keyprep --version > /version \
 && rm -rf /src/keyprep

# A non-root user with a HOME that any user id can write (docker run -u, Apptainer).
RUN useradd -m -s /bin/bash -G users keyprep && chmod -R go=u /home/keyprep
ENV HOME=/home/keyprep
USER keyprep
WORKDIR /tmp

LABEL org.label-schema.name="keyprep" \
      org.label-schema.description="BIDS App for brain MRI registration" \
      org.label-schema.version=$VERSION \
      org.label-schema.build-date=$BUILD_DATE \
      org.label-schema.vcs-ref=$VCS_REF \
      org.label-schema.schema-version="1.0"

ENTRYPOINT ["keyprep"]
