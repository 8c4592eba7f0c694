#!/bin/bash
# The one case whose time was taken while the fresh-clone test suite ran on both cores
# (seg14 -> seg15, T2->T1 in synthetic-1mm/: antsSyN 175 s, dioDiffeo 114 s), again with
# both engines in one run, the same images (same seed), after run.sh, from the same copy.
set -e
OUT=${OUT:-/tmp/dioA}
cd /tmp/kp_benchA
export PYTHONPATH=/tmp/kp_benchA
PY=/work/main/.venv/bin/python
$PY benchmarks/run_intersubject_benchmark.py --pairs training_seg_14:training_seg_15 --contrasts t2-t1 --rotations 0 --threads 1 --label-maps /work/shared/data/synthseg/training_label_maps --skip-keypoints --resolution 1 --methods antsSyN dio --engine-params '{"dio": {"representations": ["diffeo"]}}' --out $OUT/synthetic-1mm-rerun --work-dir $OUT/work3 > $OUT/run8.log 2>&1
echo done > $OUT/DONE_RERUN
