#!/usr/bin/env bash
# The GPU rows of the benchmark suite, one after the other, each bounded in time:
#   bench/gpu.sh OUT_DIR
# 1. bench/train_step.py: the paper config (R50, 800x1333, batch 4) training step per variant,
#    from fp32 eager with attention as matrices to bf16 + fused AdamW + torch.compile, and the
#    loss curves of fp32 and of the defaults from one initialization;
# 2. the same in alternating rounds (fp32, default, compile, fp32, default, compile): a GPU
#    machine's host drifts, and the step is bound by the host;
# 3. multi-scale batches (four padded sizes) with and without torch.compile;
# 4. bench/inference.py: R50 and R101 inference at 800x1066, batch 1, fp32 and bf16, against
#    the original formulation (the paper: 0.036 / 0.050 s per image on a V100);
# 5. train.py on the GPU with the defaults (the CPU demo's data and model): the whole pipeline,
#    precision auto and the fused optimizer as a user gets them; then the same run stopped by
#    a SIGTERM in the middle of epoch 1 and resumed, against the uninterrupted one;
# 6. when the host CPU has bf16 arithmetic (AMX / AVX512-BF16) and transformers is installed:
#    CPU inference against transformers' DETR, fp32 and bf16 (bench/inference_hf.py).
set -u
out=${1:?usage: bench/gpu.sh OUT_DIR}
mkdir -p "$out"
export PYTHONPATH="$PWD/src:$PWD/bench${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
quiet="available:|stopped:|LOCAL_RANK|val_dataloader|num_workers|USDT|warnings.warn|TensorFloat32"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
"$py" -c "import torch, pytorch_lightning as pl; print('torch', torch.__version__, 'lightning', pl.__version__, torch.cuda.get_device_name(0))"

echo "== 1. training step variants and loss curves"
timeout 400 "$py" bench/train_step.py --device cuda --budget 300 --profile default \
    --variants fp32-math fp32 tf32 bf16 bf16-math bf16-fused default compile \
    --trajectory-steps 120 --json "$out/train_step.json" 2>&1 | grep -v -E "$quiet"

echo "== 2. alternating rounds"
timeout 200 "$py" bench/train_step.py --device cuda --warmup 6 --steps 30 \
    --variants fp32 default compile fp32 default compile \
    --json "$out/train_step_rounds.json" 2>&1 | grep -v -E "$quiet"

echo "== 3. multi-scale batches, with and without compile"
timeout 300 "$py" bench/train_step.py --device cuda --warmup 8 --steps 24 \
    --variants multiscale compile-multiscale multiscale \
    --json "$out/train_step_multiscale.json" 2>&1 | grep -v -E "$quiet"

echo "== 4. inference"
timeout 150 "$py" bench/inference.py --device cuda --models R50 R101 --size 800 1066 \
    --batch-sizes 1 --precisions fp32 bf16 --channels-last off on --warmup 3 --iters 30 \
    --compare-official --json "$out/inference.json" 2>&1 | tail -20

echo "== 5. train.py on the GPU, defaults; then stopped by SIGTERM mid-epoch and resumed"
gpu_run="experiment=synthetic_cpu trainer.accelerator=gpu trainer.max_epochs=2 cpu_threads=null"
timeout 150 "$py" train.py $gpu_run run_dir="$out/train-run" 2>&1 \
    | grep -E "precision|optimizer|epoch 2/2|Error"
signal_once="+callbacks.sig._target_=helpers.pipeline.SignalOnce +callbacks.sig.step=180"
signal_once="$signal_once +callbacks.sig.marker=$out/train-stopped.signalled"
for attempt in stop resume; do  # the first stops after step 180 (exit 143), the second resumes
    PYTHONPATH="$PYTHONPATH:$PWD/tests" timeout 150 "$py" train.py $gpu_run \
        run_dir="$out/train-stopped" resume=auto $signal_once >"$out/train-$attempt.log" 2>&1
    echo "$attempt: exit $?"
done
"$py" - "$out/train-run" "$out/train-stopped" <<'PY'
import json, sys
runs = [json.load(open(f"{d}/metrics.json"))["history"] for d in sys.argv[1:]]
for name, history in zip(("uninterrupted", "stopped+resumed"), runs):
    print(name, [(h["epoch"], round(h["train_loss"], 6), h.get("map")) for h in history])
same = [(h["train_loss"], h.get("map")) for h in runs[0]] == [(h["train_loss"], h.get("map")) for h in runs[1]]
print("same epoch losses and mAP:", same)
PY

echo "== 6. CPU inference against transformers"
if grep -q -w -E "amx_bf16|avx512_bf16" /proc/cpuinfo && "$py" -c "import transformers, timm" 2>/dev/null; then
    CUDA_VISIBLE_DEVICES= timeout 300 "$py" bench/inference_hf.py --model R101 --warmup 3 --iters 15 \
        --precisions fp32 bf16 --json "$out/inference_hf_cpu.json" 2>&1 | grep -v -E "$quiet"
else
    echo "skipped: the CPU has no bf16 arithmetic, or transformers / timm are not installed"
fi
