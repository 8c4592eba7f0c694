set -e
cd /work/main
P='{"carl": {"weights": "/tmp/chk575/carl.pt"}}'
.venv/bin/python benchmarks/run_intersubject_benchmark.py --pairs training_seg_14:training_seg_15 \
  training_seg_16:training_seg_15 training_seg_15:training_seg_16 training_seg_16:training_seg_14 \
  --contrasts t1-t1 t2-t1 --rotations 0 --resolution 1 --skip-keypoints \
  --label-maps ../shared/data/synthseg/training_label_maps --engine-params "$P" \
  --methods carl --threads 1 --out /tmp/s575/synthetic-1mm --work-dir /tmp/cx/sr/work
.venv/bin/python benchmarks/run_registration_benchmark.py --resolution 1 --pairs field int060 \
  --methods carl --engine-params "$P" --threads 1 --out /tmp/s575/real-known-truth --work-dir /tmp/cx/sr/regwork
touch /tmp/s575/DONE
