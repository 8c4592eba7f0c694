#!/bin/bash
cd /work/main/benchmarks; rm -rf /tmp/exp/$NAME; find /tmp/exp/synwork -type d -name 'dio*' -prune -exec rm -rf {} + 2>/dev/null
P=${DIOP:-'{"dio": {"representations": ["diffeo"]}}'}
SCRIPT=run_intersubject_benchmark.py ../.venv/bin/python /tmp/exp/hook.py --pairs ${SPAIRS:-training_seg_14:training_seg_15 training_seg_16:training_seg_15} --contrasts ${CONTR:-t1-t1 t2-t1} --rotations 0 --threads 1 --label-maps /work/shared/data/synthseg/training_label_maps --skip-keypoints --resolution 1 --methods ${METHODS:-dio} --engine-params "$P" --out /tmp/exp/$NAME --work-dir /tmp/exp/synwork > /tmp/exp/$NAME.log 2>&1
grep -h "HOOK timings" /tmp/exp/$NAME.log | cut -c1-200
