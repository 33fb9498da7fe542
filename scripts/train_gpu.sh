#!/usr/bin/env bash
# Train the ePVS U-Net on one GPU: the device machine's CPU cores render the synthetic cases, its GPU trains.
# The recipe is the CPU recipe of v5/v6 (docs/models.md: the mixed generator, whose randomised half is version 2
# with WMH and lacunes by default since v6) with more cases and iterations, warm-started from v3; the model
# folder it writes records the device in model.json (training.device, and per validation in history).
#
# The device machine cannot reach PyPI and has no nibabel or pydot: download their wheels here first,
#   python -m pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl nibabel pydot
# and keep .whl/ untracked (echo /.whl/ >> .git/info/exclude) so that it travels with the working tree.
# Then, on the device machine, from the repository root:
#   bash scripts/train_gpu.sh                 # model into $OUT/<MODEL_ID> (the files that come back)
# Budget (environment): N_TRAIN (960 cases), ITERATIONS (8000), BATCH (24), MODEL_ID, CACHE_DIR.
# Sized for the 10-minute limit of one device command: rendering 984 cases on 16 cores, then training.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps .whl/*.whl
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
python3 -c "import torch, sys; ok = torch.cuda.is_available(); print('CUDA', ok, torch.__version__); sys.exit(0 if ok else 3)"
model="${OUT:-work/gpu}/${MODEL_ID:-epvs-unet25d-gpu}"
exec python3 -m epvsseg.train --out "$model" --device cuda --generator mixed --init epvs-unet25d-v3 \
  --context 2 --seed 20261207 --n-train "${N_TRAIN:-960}" --n-val 24 --iterations "${ITERATIONS:-8000}" \
  --batch "${BATCH:-24}" --patch 80 --lr 1e-3 --t2w-fraction 0.25 --val-every 2000 --threads 8 \
  --workers "$(nproc)" --cache-dir "${CACHE_DIR:-work/synth-cache-gpu}" \
  --anatomies icbm2009a,otsu_T1w,t1_mpr_tra_gk_v4,T1_head_ext2,py_synthsr_FLAIR,coreg_qa_highres_T1w_brain,studyforrest_T1w
