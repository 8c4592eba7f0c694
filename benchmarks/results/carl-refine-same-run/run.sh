# antsSyN and carl (refine-only IO) in one process per benchmark, one thread per engine,
# the background training paused (SIGSTOP) for the whole run so nothing else ran.
set -e
cd "$(git rev-parse --show-toplevel)"
P='{"carl": {"io_train": "refine"}}'
OUT=benchmarks/results/carl-refine-same-run
python=.venv/bin/python
$python benchmarks/run_intersubject_benchmark.py --pairs training_seg_14:training_seg_15 \
  training_seg_16:training_seg_15 training_seg_15:training_seg_16 training_seg_16:training_seg_14 \
  --contrasts t1-t1 t2-t1 --rotations 0 --resolution 1 --skip-keypoints \
  --label-maps ../shared/data/synthseg/training_label_maps --engine-params "$P" \
  --methods antsSyN carl --threads 1 --out $OUT/synthetic-1mm --work-dir /tmp/rs/work
$python benchmarks/run_registration_benchmark.py --resolution 1 --pairs field int060 \
  --methods antsSyN carl --engine-params "$P" --threads 1 --out $OUT/real-known-truth --work-dir /tmp/rs/regwork
