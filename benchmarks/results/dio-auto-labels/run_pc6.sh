#!/bin/bash
# After commit cc2a393 (6 principal components with the label channels instead of 12): the
# cross-contrast cases again, next to antsSyN in the same runs (T1->T1 and the real pairs
# use no label channels, so they are unchanged). Two streams on the two cores, the DIO
# fine-tune paused: stream A the two thick-slice T2->T1 pairs and the seg15-target 1 mm
# T2->T1 pairs, stream B the two other 1 mm T2->T1 pairs.
OUT=${OUT:-/tmp/dioB}
rm -rf /tmp/kp_benchB && mkdir -p /tmp/kp_benchB $OUT
git -C /work/main archive ${REV:-HEAD} | tar -x -C /tmp/kp_benchB
cd /tmp/kp_benchB
export PYTHONPATH=/tmp/kp_benchB
PY=/work/main/.venv/bin/python
C="--contrasts t2-t1 --rotations 0 --threads 1 --label-maps /work/shared/data/synthseg/training_label_maps --skip-keypoints --resolution 1 --methods antsSyN dio"
P='{"dio": {"representations": ["diffeo"]}}'
S15="--pairs training_seg_14:training_seg_15 training_seg_16:training_seg_15"
( $PY benchmarks/run_intersubject_benchmark.py $S15 $C --moving-slice-mm 5 --engine-params "$P" --out $OUT/synthetic-1mm-slice5-t2 --work-dir $OUT/workA > $OUT/runA1.log 2>&1
  $PY benchmarks/run_intersubject_benchmark.py $S15 $C --engine-params "$P" --out $OUT/synthetic-1mm-t2 --work-dir $OUT/workA > $OUT/runA2.log 2>&1 ) &
$PY benchmarks/run_intersubject_benchmark.py --pairs training_seg_15:training_seg_16 training_seg_16:training_seg_14 $C --engine-params "$P" --out $OUT/synthetic-1mm-other-pairs-t2 --work-dir $OUT/workB > $OUT/runB.log 2>&1
wait
echo done > $OUT/DONE
