# antsSyN and carl/carlIO at keyprep's defaults (carlIO: field-space instance optimisation,
# 20 steps) in one process per benchmark, one thread per engine; the background training
# paused (SIGSTOP) for the whole run so nothing else ran on the machine.
set -e
cd "$(git rev-parse --show-toplevel)"
OUT=benchmarks/results/carl-field-io
python=.venv/bin/python
$python benchmarks/run_intersubject_benchmark.py --pairs training_seg_14:training_seg_15 \
  training_seg_16:training_seg_15 training_seg_15:training_seg_16 training_seg_16:training_seg_14 \
  --contrasts t1-t1 t2-t1 --rotations 0 --resolution 1 --skip-keypoints \
  --label-maps ../shared/data/synthseg/training_label_maps \
  --methods antsSyN carl --threads 1 --out $OUT/synthetic-1mm --work-dir /tmp/cf/work
$python benchmarks/run_registration_benchmark.py --resolution 1 --pairs field int060 \
  --methods antsSyN carl --threads 1 --out $OUT/real-known-truth --work-dir /tmp/cf/regwork
