#!/usr/bin/env bash
# End to end on this machine: the default job, a DeepSpeed ZeRO-2 job (CUDA only), export to the official
# layout, greedy generation. Prints wall times and the loss curve. Usage: scripts/smoke_train.sh [OUT_DIR]
set -euo pipefail
out="${1:-$(mktemp -d)}"
export WANDB_MODE="${WANDB_MODE:-disabled}"
py="${PYTHON:-python3}"

t0=$(date +%s)
"$py" -m rwkv7_train.train logger=none trainer.enable_progress_bar=false trainer.log_every_n_steps=10 \
    hydra.run.dir="$out/default" > "$out/default.log" 2>&1
echo "default job: $(( $(date +%s) - t0 )) s wall"
grep -E '^0,(9|49|99|149),' "$out"/default/csv/*/metrics.csv | cut -d, -f2,3,6 | sed 's/^/  step,train_loss,val_loss: /'
ckpt="$out/default/checkpoints/last.ckpt"

if "$py" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())'; then
    t0=$(date +%s)
    "$py" -m rwkv7_train.train strategy=deepspeed_stage_2 trainer.max_steps=20 trainer.val_check_interval=10 \
        checkpoint.every_n_steps=10 logger=none trainer.enable_progress_bar=false \
        hydra.run.dir="$out/zero2" > "$out/zero2.log" 2>&1
    echo "deepspeed_stage_2, 20 steps: $(( $(date +%s) - t0 )) s wall; checkpoints: $(ls "$out/zero2/checkpoints" | xargs)"
    ckpt="$out/zero2/checkpoints/last.ckpt"
fi

"$py" -m rwkv7_train.convert export "$ckpt" "$out/model.pth"
"$py" -m rwkv7_train.generate "$out/model.pth" --prompt "def " --max-tokens 20 --temperature 0
