#!/usr/bin/env bash
# GPU check (the paper preset under --device cuda). Run from the repository root on a CUDA machine whose
# python3 has torch; pydantic & co. may be carried as wheels in .whl/ (installed to $SITE, default .gpu-site, when present).
# Writes JSON under $OUT (default gpu-check): train-step tokens/s fp32 vs bf16 at the paper shape, the fine-tuning
# step, and a short paper-preset pretrain -> finetune -> evaluate through the CLI.
set -uo pipefail
OUT=${OUT:-gpu-check}; mkdir -p "$OUT"; SITE=${SITE:-$PWD/.gpu-site}
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target $SITE .whl/*.whl \
        || exit 1
    export PYTHONPATH=$SITE:$PWD/src
else
    export PYTHONPATH=$PWD/src
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(0))"
for p in fp32 bf16; do
    python3 -m wrapperlab.bench.train ours --shape paper --steps 40 --warmup 5 --precision $p --device cuda
done | tee "$OUT/train_cuda.jsonl"
python3 -m wrapperlab.bench.train ours --shape paper --kind finetune --steps 40 --warmup 5 --device cuda \
    | tee -a "$OUT/train_cuda.jsonl"
STEPS=${STEPS:-1000}
/usr/bin/time -f "pretrain wall %e s" python3 -m wrapperlab.cli pretrain --preset paper steps=$STEPS eval.every=500 \
    --device cuda --out $OUT/pt-run --no-progress --json > "$OUT/pretrain.json" || echo "pretrain failed"
/usr/bin/time -f "finetune wall %e s" python3 -m wrapperlab.cli finetune --preset paper parent=$OUT/pt-run steps=300 \
    eval.every=150 c_train=1 lr=L --device cuda --out $OUT/ft-run --no-progress --json > "$OUT/finetune.json" \
    || echo "finetune failed"
python3 -m wrapperlab.cli evaluate $OUT/ft-run --json > "$OUT/evaluate.json" || echo "evaluate failed"
tail -c 1500 "$OUT/pretrain.json"; echo; tail -c 1500 "$OUT/finetune.json"
