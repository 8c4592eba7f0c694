#!/bin/bash
# DIO with label prompting at its default ('auto': weight 1 within a contrast, 16 across) next
# to antsSyN, in the same runs; shipped weights (step 2250) and the step-4250 checkpoint.
# Runs from a copy of the repository so that editing the checkout does not change a run.
set -e
OUT=${OUT:-/tmp/dioP}
rm -rf /tmp/kp_bench && mkdir -p /tmp/kp_bench $OUT
git -C /work/main archive HEAD | tar -x -C /tmp/kp_bench
cd /tmp/kp_bench
export PYTHONPATH=/tmp/kp_bench
PY=/work/main/.venv/bin/python
W4250=/tmp/dioN/keyprep-dio.pt
COMMON="--pairs training_seg_14:training_seg_15 training_seg_16:training_seg_15 --contrasts t1-t1 t2-t1 --rotations 0 --threads 1 --label-maps /work/shared/data/synthseg/training_label_maps --skip-keypoints --resolution 1"
DIFFEO='"representations": ["diffeo"]'
$PY benchmarks/run_intersubject_benchmark.py $COMMON --methods antsSyN dio --engine-params "{\"dio\": {$DIFFEO}}" --out $OUT/res-1mm-auto --work-dir $OUT/work > $OUT/run1.log 2>&1
$PY benchmarks/run_intersubject_benchmark.py $COMMON --methods dio --engine-params "{\"dio\": {\"weights\": \"$W4250\", $DIFFEO}}" --out $OUT/res-1mm-auto-step4250 --work-dir $OUT/work > $OUT/run2.log 2>&1
$PY benchmarks/run_intersubject_benchmark.py $COMMON --moving-slice-mm 5 --methods antsSyN dio --engine-params "{\"dio\": {$DIFFEO}}" --out $OUT/res-1mm-slice5-auto --work-dir $OUT/work > $OUT/run3.log 2>&1
echo done > $OUT/DONE
