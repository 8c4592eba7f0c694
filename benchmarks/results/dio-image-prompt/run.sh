#!/bin/bash
# DIO with image prompting at its default (weight 4, window 5; labels 'auto') next to antsSyN,
# in the same runs: held-out synthetic pairs at 1 mm, the real known-truth pairs, the 5 mm
# thick-slice pairs, and DIO without the image term (weight 0) on the synthetic pairs.
# Runs from a copy of the repository so that editing the checkout does not change a run.
set -e
OUT=${OUT:-/tmp/dioI}
rm -rf /tmp/kp_benchI && mkdir -p /tmp/kp_benchI $OUT
git -C /work/main archive HEAD | tar -x -C /tmp/kp_benchI
cd /tmp/kp_benchI
export PYTHONPATH=/tmp/kp_benchI
PY=/work/main/.venv/bin/python
COMMON="--pairs training_seg_14:training_seg_15 training_seg_16:training_seg_15 --contrasts t1-t1 t2-t1 --rotations 0 --threads 1 --label-maps /work/shared/data/synthseg/training_label_maps --skip-keypoints --resolution 1"
DIFFEO='"representations": ["diffeo"]'
$PY benchmarks/run_intersubject_benchmark.py $COMMON --methods antsSyN dio --engine-params "{\"dio\": {$DIFFEO}}" --out $OUT/synthetic-1mm --work-dir $OUT/work > $OUT/run1.log 2>&1
$PY benchmarks/run_registration_benchmark.py --resolution 1 --pairs field int060 --methods antsSyN dio --engine-params "{\"dio\": {$DIFFEO}}" --threads 1 --out $OUT/real-known-truth --work-dir $OUT/regwork > $OUT/run2.log 2>&1
$PY benchmarks/run_intersubject_benchmark.py $COMMON --moving-slice-mm 5 --methods antsSyN dio --engine-params "{\"dio\": {$DIFFEO}}" --out $OUT/synthetic-1mm-slice5 --work-dir $OUT/work > $OUT/run3.log 2>&1
$PY benchmarks/run_intersubject_benchmark.py $COMMON --methods dio --engine-params "{\"dio\": {$DIFFEO, \"image_weight\": 0}}" --out $OUT/synthetic-1mm-weight0 --work-dir $OUT/work0 > $OUT/run4.log 2>&1
echo done > $OUT/DONE
