#!/usr/bin/env bash
# Continue the label network's CPU run (training/synthseg-cpu-2mm) on a lent GPU machine.
# See training/README.md, "GPU recipe (one device command, < 10 min)".
#
#   scripts/gpu_train.sh prepare [--rebuild] [...]   here: write .gpu_carry/ (label-map bundle,
#                                                     nibabel without tests, manifest)
#   scripts/gpu_train.sh device [--device cuda] [--max-minutes 8] [-- TRAINER OPTIONS]
#                                                     on the GPU machine: resume, results to $OUT
#   scripts/gpu_train.sh collect FILES_AT [--run-dir DIR]
#                                                     here, CPU run stopped: install the results
#
# Options of each verb: python -m keyprep.pipeline.synth.handoff VERB --help
set -euo pipefail
cd "$(dirname "$0")/.."
verb=${1:-}
[ -n "$verb" ] && shift
case "$verb" in
    prepare|collect)
        # here: the project's environment (nibabel, the atlases of the extra anatomies)
        py=${PYTHON:-.venv/bin/python}
        [ -x "$py" ] || py=python3
        exec nice -n "${NICE:-5}" "$py" -m keyprep.pipeline.synth.handoff "$verb" "$@"
        ;;
    device)
        # the GPU machine: its own python3 (torch with CUDA), the repository on PYTHONPATH
        export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
        exec "${PYTHON:-python3}" -m keyprep.pipeline.synth.handoff device "$@"
        ;;
    *)
        sed -n '2,12p' "$0" >&2
        exit 64
        ;;
esac
