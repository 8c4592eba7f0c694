#!/bin/bash
# usage: NAME=x [env...] run_thick.sh : the 2 thick-slice T2->T1 cases + the 2 seg15-target 1 mm T2->T1 cases, DIO only
# hook.py: ../../dio-image-prompt/explore/hook.py (env PC sets prompt_channels), copied to /tmp/exp.
cd /work/main/benchmarks; rm -rf /tmp/exp/$NAME; find /tmp/exp/thickwork /tmp/exp/synwork -type d -name 'dio*' -prune -exec rm -rf {} + 2>/dev/null
P=${DIOP:-'{"dio": {"representations": ["diffeo"]}}'}
A="--pairs training_seg_14:training_seg_15 training_seg_16:training_seg_15 --contrasts t2-t1 --rotations 0 --threads 1 --label-maps /work/shared/data/synthseg/training_label_maps --skip-keypoints --resolution 1 --methods dio"
SCRIPT=run_intersubject_benchmark.py ../.venv/bin/python /tmp/exp/hook.py $A --moving-slice-mm 5 --engine-params "$P" --out /tmp/exp/$NAME/thick --work-dir /tmp/exp/thickwork > /tmp/exp/$NAME.log 2>&1
SCRIPT=run_intersubject_benchmark.py ../.venv/bin/python /tmp/exp/hook.py $A --engine-params "$P" --out /tmp/exp/$NAME/iso --work-dir /tmp/exp/synwork >> /tmp/exp/$NAME.log 2>&1
grep -h "HOOK timings" /tmp/exp/$NAME.log | cut -c1-220
