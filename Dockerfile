# keyprep: BIDS App for brain MRI registration (CPU image).
#   docker build -t keyprep:0.1.0 .
#   docker run --rm -v /data/bids:/data:ro -v /data/out:/out keyprep:0.1.0 /data /out participant
# GPU hosts: build with --build-arg TORCH_SPEC=torch==2.13.0 and the CUDA wheel index of
# PyTorch in PIP_EXTRA_INDEX_URL, then run with --gpus all (docker) or --nv (apptainer).
FROM python:3.11-slim-bookworm

ARG TORCH_SPEC="torch==2.13.0"
ARG PIP_EXTRA_INDEX_URL=""
ARG VERSION=0.1.0
ARG BUILD_DATE
ARG VCS_REF

# Debian: Colin27/AAL atlases (demo), Chromium (report checks in the test stage).
RUN apt-get update -qq \
 && apt-get install -y -qq --no-install-recommends mricron-data \
 && rm -rf /var/lib/apt/lists/*

# The ANTs/ITK and BLAS thread pools are set per node by keyprep (--omp-nthreads).
ENV OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 NIPYPE_NO_ET=1 NO_ET=1 \
    MPLCONFIGDIR=/tmp/matplotlib KEYPREP_DOCKER_TAG=${VERSION} \
    PIP_NO_CACHE_DIR=1 PIP_EXTRA_INDEX_URL=${PIP_EXTRA_INDEX_URL}

RUN pip install -q "${TORCH_SPEC}"
COPY . /src/keyprep
RUN pip install -q /src/keyprep \
 && python -c "import keyprep, ants, deepbet; from keyprep.pipeline.targets import template_file; template_file('MNI152NLin2009aSym')" \
 && keyprep --version > /version

# A non-root user whose home is readable when the image runs under Apptainer.
RUN useradd -m -s /bin/bash -G users keyprep && chmod -R go=u /home/keyprep
ENV HOME=/home/keyprep
WORKDIR /tmp

LABEL org.label-schema.name="keyprep" \
      org.label-schema.description="BIDS App for brain MRI registration" \
      org.label-schema.version=$VERSION \
      org.label-schema.build-date=$BUILD_DATE \
      org.label-schema.vcs-ref=$VCS_REF \
      org.label-schema.schema-version="1.0"

ENTRYPOINT ["keyprep"]
