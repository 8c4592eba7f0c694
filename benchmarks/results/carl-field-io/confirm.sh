# Confirmation on the two held-out pairs the settings were not chosen on (15 -> 14, 14 -> 16),
# T1 -> T1 and T2 -> T1, antsSyN in the same process, one thread per engine, the background
# training paused (SIGSTOP).
set -e
cd "$(git rev-parse --show-toplevel)"
OUT=benchmarks/results/carl-field-io
.venv/bin/python benchmarks/run_intersubject_benchmark.py \
  --pairs training_seg_15:training_seg_14 training_seg_14:training_seg_16 \
  --contrasts t1-t1 t2-t1 --rotations 0 --resolution 1 --skip-keypoints \
  --label-maps ../shared/data/synthseg/training_label_maps \
  --methods antsSyN carl --threads 1 --out $OUT/confirm-unused-pairs --work-dir /tmp/cf/work2
