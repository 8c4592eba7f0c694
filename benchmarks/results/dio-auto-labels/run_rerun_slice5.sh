#!/bin/bash
# The two thick-slice T2->T1 cases of synthetic-1mm-slice5/ (0.51x and 0.52x antsSyN's time
# while run_more.sh ran on the other core) again, with both engines in one run, the same
# images, with only the DIO fine-tune (nice 10) on the other core, from the same copy.
set -e
OUT=${OUT:-/tmp/dioA}
cd /tmp/kp_benchA
export PYTHONPATH=/tmp/kp_benchA
PY=/work/main/.venv/bin/python
$PY benchmarks/run_intersubject_benchmark.py --pairs training_seg_14:training_seg_15 training_seg_16:training_seg_15 --contrasts t2-t1 --rotations 0 --threads 1 --label-maps /work/shared/data/synthseg/training_label_maps --skip-keypoints --resolution 1 --moving-slice-mm 5 --methods antsSyN dio --engine-params '{"dio": {"representations": ["diffeo"]}}' --out $OUT/synthetic-1mm-slice5-rerun --work-dir $OUT/work4 > $OUT/run9.log 2>&1
echo done > $OUT/DONE_RERUN2
