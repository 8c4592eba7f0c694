#!/bin/bash
# DIO at its defaults (image prompting weight 4, window 5; gradient smoothing 2 voxels; label prompting
# 'auto': none for one contrast, 16 across contrasts) next to antsSyN, in the same runs:
# held-out synthetic pairs at 1 mm, the real known-truth pairs (field, int060), the `field`
# pair at two more seeds (another pose and moving grid; the same real nonlinear field;
# not used to choose any setting), and the 5 mm thick-slice pairs.
# Runs from a copy of the repository so that editing the checkout does not change a run.
set -e
OUT=${OUT:-/tmp/dioA}
REV=${REV:-HEAD}
rm -rf /tmp/kp_benchA && mkdir -p /tmp/kp_benchA $OUT
git -C /work/main archive $REV | tar -x -C /tmp/kp_benchA
cd /tmp/kp_benchA
export PYTHONPATH=/tmp/kp_benchA
PY=/work/main/.venv/bin/python
COMMON="--pairs training_seg_14:training_seg_15 training_seg_16:training_seg_15 --contrasts t1-t1 t2-t1 --rotations 0 --threads 1 --label-maps /work/shared/data/synthseg/training_label_maps --skip-keypoints --resolution 1"
P='{"dio": {"representations": ["diffeo"]}}'
$PY benchmarks/run_intersubject_benchmark.py $COMMON --methods antsSyN dio --engine-params "$P" --out $OUT/synthetic-1mm --work-dir $OUT/work > $OUT/run1.log 2>&1
$PY benchmarks/run_registration_benchmark.py --resolution 1 --pairs field int060 --methods antsSyN dio --engine-params "$P" --threads 1 --out $OUT/real-known-truth --work-dir $OUT/regwork > $OUT/run2.log 2>&1
for SEED in 1 2; do
  $PY benchmarks/run_registration_benchmark.py --resolution 1 --pairs field --seed $SEED --methods antsSyN dio --engine-params "$P" --threads 1 --out $OUT/real-field-seed$SEED --work-dir $OUT/regwork > $OUT/run3-seed$SEED.log 2>&1
done
$PY benchmarks/run_intersubject_benchmark.py $COMMON --moving-slice-mm 5 --methods antsSyN dio --engine-params "$P" --out $OUT/synthetic-1mm-slice5 --work-dir $OUT/work > $OUT/run4.log 2>&1
echo done > $OUT/DONE
