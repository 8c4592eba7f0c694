#!/bin/bash
# After run.sh, from the same copy: (1) the two held-out pairs no DIO setting was ever chosen
# on (seg15 -> seg16, seg16 -> seg14), T1->T1 and T2->T1, next to antsSyN; (2) a real head
# through the whole pipeline (Colin27 turned by 20 deg to the ICBM 2009a template), where
# with label prompting off for T1->T1 the structure Dice is again independent of DIO's
# objective; (3) the representation switch (dio / dioDiffeo / dioAffine from one feature
# computation) on the seg15-target synthetic pairs.
set -e
# Run beside run.sh's later parts, each on its own core, with the training paused.
OUT=${OUT:-/tmp/dioA}
cd /tmp/kp_benchA
export PYTHONPATH=/tmp/kp_benchA
PY=/work/main/.venv/bin/python
OTHER="--pairs training_seg_15:training_seg_16 training_seg_16:training_seg_14 --contrasts t1-t1 t2-t1 --rotations 0 --threads 1 --label-maps /work/shared/data/synthseg/training_label_maps --skip-keypoints --resolution 1"
$PY benchmarks/run_intersubject_benchmark.py $OTHER --methods antsSyN dio --engine-params '{"dio": {"representations": ["diffeo"]}}' --out $OUT/synthetic-1mm-other-pairs --work-dir $OUT/work2 > $OUT/run5.log 2>&1
$PY -m keyprep.bids_app.demo --out $OUT/demo --nprocs 1 --rotations 20 --target MNI152NLin2009aSym --methods keymorphAffine antsSyN dio > $OUT/run6.log 2>&1
COMMON="--pairs training_seg_14:training_seg_15 training_seg_16:training_seg_15 --contrasts t1-t1 t2-t1 --rotations 0 --threads 1 --label-maps /work/shared/data/synthseg/training_label_maps --skip-keypoints --resolution 1"
$PY benchmarks/run_intersubject_benchmark.py $COMMON --methods dio --out $OUT/synthetic-1mm-representations --work-dir $OUT/workR > $OUT/run7.log 2>&1
echo done > $OUT/DONE_MORE
