#!/bin/bash
# usage: eval.sh STEP  (exports training/dio-cpu-2mm-real/checkpoint.pt as it is now)
set -e
cd "$(dirname "$0")/../../.."
source .venv/bin/activate
S=$1
D=/tmp/dioeval/s$S
mkdir -p $D
python -c "from keyprep.pipeline.dio.train import export_weights; import json; print(json.dumps(export_weights('training/dio-cpu-2mm-real/checkpoint.pt', '$D/keyprep-dio.pt')))" > $D/export.json
cat $D/export.json
W=$D/keyprep-dio.pt
P="{\"dio\": {\"weights\": \"$W\", \"representations\": [\"diffeo\"]}}"
python benchmarks/run_registration_benchmark.py --resolution 1 --pairs field int060 \
  --methods dio --engine-params "$P" --threads 1 --out $D/real-known-truth --work-dir /tmp/dioeval/regwork > $D/real.log 2>&1
python benchmarks/run_intersubject_benchmark.py --pairs training_seg_14:training_seg_15 \
  training_seg_16:training_seg_15 --contrasts t1-t1 t2-t1 --rotations 0 --threads 1 \
  --label-maps /work/shared/data/synthseg/training_label_maps --skip-keypoints --resolution 1 \
  --methods dio --engine-params "$P" --out $D/synthetic-1mm --work-dir /tmp/dioeval/synwork > $D/syn.log 2>&1
