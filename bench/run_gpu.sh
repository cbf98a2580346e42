#!/usr/bin/env bash
# The GPU benchmark on a lent device machine (bench/README.md, "GPU"): the device image has torch but
# not TRL, datasets or Liger, so their wheels travel in .whl/ (ignored by git; installed once per machine
# into /tmp/site: a changed wheel needs a fresh machine or `rm -rf /tmp/site`). Writes the table to
# $OUT/bench_gpu.txt and the log to $OUT/bench_log.txt; PROFILE=1 adds $OUT/profile_hafs.txt;
# LEVERS=a,b first times those levers in one process (bench_levers.py; ROWS=none: only that).
#   BUDGET=440 ROWS=hafs,trl,hafs-fit bench/run_gpu.sh
#   LEVERS=no_cudnn,lora ROWS=none bench/run_gpu.sh
#   TAG=cudnn STEPS=150 RUNSET=sdpa_cudnn=true ROWS=hafs bench/run_gpu.sh   # a lever, end to end
set -uo pipefail
cd "$(dirname "$0")/.."
export OUT=${OUT:-$PWD}
if compgen -G ".whl/*.whl" >/dev/null; then
  [ -d /tmp/site/trl ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 - <<'PY'
import importlib
for name in ("torch", "transformers", "peft", "accelerate", "trl", "datasets", "liger_kernel"):
    try:
        m = importlib.import_module(name)
        print(name, getattr(m, "__version__", "?"), end="; ")
    except Exception as exc:  # noqa: BLE001 - report and go on: the bench skips what is missing
        print(name, "MISSING", type(exc).__name__, exc, end="; ")
print()
PY
if [ -n "${LEVERS:-}" ]; then  # paired on/off timings in one process, e.g. LEVERS=no_cudnn,lora
  python3 bench/bench_levers.py --spec "gpu${SHAPE:+-$SHAPE}" --levers "$LEVERS" --rounds "${ROUNDS:-6}" \
    --cache /tmp/benchcache 2>&1 | tee "$OUT/levers_log.txt"
fi
[ "${ROWS:-}" = none ] && exit 0
sets=()  # RUNSET="sdpa_cudnn=true liger=false": RunSettings overrides for the hafs rows
for o in ${RUNSET:-}; do sets+=(--run-set "$o"); done
python3 bench/bench_train.py --gpu ${SHAPE:+--shape "$SHAPE"} --budget "${BUDGET:-440}" ${ROWS:+--rows "$ROWS"} \
  ${STEPS:+--steps "$STEPS"} ${sets[@]+"${sets[@]}"} --cache /tmp/benchcache 2>&1 | tee "$OUT/bench_log${TAG:+_$TAG}.txt"
if [ -n "${TAG:-}" ]; then
  for f in bench_gpu.txt bench_gpu.json; do mv -f "$OUT/$f" "$OUT/${f%.*}_$TAG.${f##*.}" 2>/dev/null; done
fi
if [ -n "${PROFILE:-}" ]; then
  mkdir -p /tmp/profile  # its own OUT: the short run would overwrite bench_gpu.txt
  OUT=/tmp/profile timeout "${PROFILE_S:-120}" python3 bench/bench_train.py --gpu ${SHAPE:+--shape "$SHAPE"} --rows hafs --steps 30 --profile \
    --cache /tmp/benchcache 2>&1 | tail -4
  cp /tmp/profile/profile_hafs.txt "$OUT/" 2>/dev/null
fi
