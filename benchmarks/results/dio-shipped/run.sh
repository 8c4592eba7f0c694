#!/bin/bash
cd /tmp/kp_bench
export PYTHONPATH=/tmp/kp_bench
PY=/work/main/.venv/bin/python
W=/tmp/dio_val/keyprep-dio.pt
COMMON="--pairs training_seg_14:training_seg_15 training_seg_16:training_seg_15 --contrasts t1-t1 t2-t1 --rotations 0 --threads 1 --label-maps /work/shared/data/synthseg/training_label_maps --skip-keypoints"
$PY benchmarks/run_intersubject_benchmark.py $COMMON --methods antsSyN dio --engine-params "{\"dio\": {\"weights\": \"$W\"}}" --out /tmp/dioS/res-2mm --work-dir /tmp/dioS/work2 > /tmp/dioS/run2.log 2>&1
$PY benchmarks/run_intersubject_benchmark.py $COMMON --resolution 1 --methods antsSyN dio --engine-params "{\"dio\": {\"weights\": \"$W\", \"representations\": [\"diffeo\"]}}" --out /tmp/dioS/res-1mm --work-dir /tmp/dio1mm/work > /tmp/dioS/run1.log 2>&1
$PY benchmarks/run_intersubject_benchmark.py $COMMON --resolution 1 --moving-slice-mm 5 --methods antsSyN dio --engine-params "{\"dio\": {\"weights\": \"$W\", \"representations\": [\"diffeo\"]}}" --out /tmp/dioS/res-1mm-slice5 --work-dir /tmp/dio1mm/work > /tmp/dioS/run1s.log 2>&1
echo done > /tmp/dioS/DONE
