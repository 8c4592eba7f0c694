#!/bin/bash
# The 'auto' weights on held-out pairs other than those they were chosen on (fixed seg16 and
# seg14 instead of seg15); Dice only: this ran while other jobs shared the machine.
set -e
OUT=${OUT:-/tmp/dioP}
cd /tmp/kp_bench   # the copy of f055878 made by run.sh
export PYTHONPATH=/tmp/kp_bench
PY=/work/main/.venv/bin/python
$PY benchmarks/run_intersubject_benchmark.py --pairs training_seg_15:training_seg_16 training_seg_16:training_seg_14 --contrasts t2-t1 --rotations 0 --threads 1 --label-maps /work/shared/data/synthseg/training_label_maps --skip-keypoints --resolution 1 --methods antsSyN dio --engine-params '{"dio": {"representations": ["diffeo"], "label_weight": 0}}' --out $OUT/res-1mm-other-pairs-unprompted --work-dir $OUT/work > $OUT/run4.log 2>&1
$PY benchmarks/run_intersubject_benchmark.py --pairs training_seg_15:training_seg_16 training_seg_16:training_seg_14 --contrasts t2-t1 --rotations 0 --threads 1 --label-maps /work/shared/data/synthseg/training_label_maps --skip-keypoints --resolution 1 --methods dio --engine-params '{"dio": {"representations": ["diffeo"]}}' --out $OUT/res-1mm-other-pairs-auto --work-dir $OUT/work > $OUT/run5.log 2>&1
echo done > $OUT/DONE2  # (the first part)
# then T1->T1 on the same pairs, antsSyN and prompted dioDiffeo in one run
cd /tmp/kp_bench
$PY benchmarks/run_intersubject_benchmark.py --pairs training_seg_15:training_seg_16 training_seg_16:training_seg_14 --contrasts t1-t1 --rotations 0 --threads 1 --label-maps /work/shared/data/synthseg/training_label_maps --skip-keypoints --resolution 1 --methods antsSyN dio --engine-params '{"dio": {"representations": ["diffeo"]}}' --out $OUT/res-1mm-other-pairs-t1-auto --work-dir $OUT/work > $OUT/run6.log 2>&1
echo done > $OUT/DONE3
