#!/usr/bin/env bash
# The 0.1B config trained on one GPU under ZeRO-2 and ZeRO-3 on a corpus made by rwkv7-prep, then a ZeRO-2 run
# killed with SIGKILL and resumed; prints tokens/s, peak memory and the loss after the resume beside the
# uninterrupted run's. Usage: scripts/bench_strategies.sh OUT_DIR [STEPS [OVERRIDES...]]; OVERRIDES go last on
# every run's command line (python3 must import rwkv7_train). RUNS="zero2 zero3 killed" (the default) picks the
# runs, so that they can be split over several calls sharing OUT_DIR; the table covers the runs OUT_DIR holds.
set -euo pipefail
out="${1:?usage: scripts/bench_strategies.sh OUT_DIR [STEPS [OVERRIDES...]]}"
steps="${2:-200}"
extra=("${@:3}")
runs=" ${RUNS:-zero2 zero3 killed} "
py="${PYTHON:-python3}"
mkdir -p "$out"
export WANDB_MODE=disabled PYTHONUNBUFFERED=1

# The corpus: every .py file of this Python's standard library, one jsonl document each.
corpus="$out/corpus"
if [ ! -f "$corpus/manifest.json" ]; then
    "$py" - "$out/sources.jsonl" <<'EOF'
import json, sys, sysconfig
from pathlib import Path
root = Path(sysconfig.get_paths()["stdlib"])
files = sorted(p for p in root.rglob("*.py") if p.is_file() and "site-packages" not in p.parts)
with open(sys.argv[1], "w") as f:
    for p in files:
        f.write(json.dumps({"text": p.read_text(errors="replace")}) + "\n")
EOF
    "$py" -m rwkv7_data_prep.cli --val-every 200 --output "$corpus" "$out/sources.jsonl" > "$out/prep.log"
fi

common=(model=0.1b data=binidx "data.train_path=$corpus" "data.val_path=${corpus}_val" data.ctx_len=4096
        data.micro_bsz=8 data.val_windows=8 trainer.precision=bf16-mixed activation_checkpointing=true
        "trainer.max_steps=$steps" trainer.val_check_interval=100 trainer.log_every_n_steps=1 logger=none
        trainer.enable_progress_bar=false "optim.total_tokens=$((steps * 8 * 4096))")
run() {  # run NAME OVERRIDES...: one training job, its log in OUT/NAME.log
    local name=$1; shift
    "$py" -m rwkv7_train.train "${common[@]}" "hydra.run.dir=$out/$name" "$@" "${extra[@]}" > "$out/$name.log" 2>&1
}

case $runs in *" zero2 "*) run zero2 strategy=deepspeed_stage_2 checkpoint.every_n_steps=100 ;; esac
case $runs in *" zero3 "*) run zero3 strategy=deepspeed_stage_3 checkpoint.every_n_steps=100 ;; esac

# SIGKILL after the step-40 checkpoint exists, mid-step; then the same command resumes.
if [[ $runs == *" killed "* ]]; then
    run killed strategy=deepspeed_stage_2 checkpoint.every_n_steps=20 trainer.max_steps=60 resume_from=auto &
    pid=$!
    ckpt="$out/killed/checkpoints/step40.ckpt"   # a ZeRO directory is complete once COMPLETE.json is in it
    until [ -f "$ckpt/COMPLETE.json" ] || [ -f "$ckpt" ] || ! kill -0 "$pid" 2>/dev/null; do sleep 1; done
    sleep 3
    pkill -KILL -P "$pid" || true; kill -KILL "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true
    cp "$out/killed.log" "$out/killed_first.log"
    run killed strategy=deepspeed_stage_2 checkpoint.every_n_steps=20 trainer.max_steps=60 resume_from=auto
fi

"$py" - "$out" <<'EOF'
import csv, statistics, sys
from pathlib import Path
out = Path(sys.argv[1])

def rows(name):
    got = {}
    for f in [out / name / "metrics.csv"]:
        for r in csv.DictReader(open(f)):
            for k, v in r.items():
                if v:
                    got.setdefault(int(r["step"]), {})[k] = float(v)
    return got

# tokens/s and step ms are medians over the steps from 20 on
print("| run | steps | tokens/s | step ms | peak allocated GiB | reserved GiB | loss first / last |")
print("|---|---:|---:|---:|---:|---:|---|")
for name in ("zero2", "zero3"):
    r = rows(name)
    if not r:
        continue
    warm = min(20, len(r) // 2)   # the first steps compile the kernels
    tps = [v["train/tokens_per_s"] for s, v in r.items() if s >= warm and "train/tokens_per_s" in v]
    ms = [v["train/step_ms"] for s, v in r.items() if s >= warm and "train/step_ms" in v]
    loss = [r[s]["train/loss"] for s in sorted(r) if "train/loss" in r[s]]
    peak = max(v.get("gpu/peak_allocated_gib", 0) for v in r.values())
    res = max(v.get("gpu/reserved_gib", 0) for v in r.values())
    print(f"| {name} | {len(loss)} | {statistics.median(tps):.0f} | {statistics.median(ms):.1f} | {peak:.2f} | "
          f"{res:.2f} | {loss[0]:.3f} / {loss[-1]:.3f} |")
a, b = rows("zero2"), rows("killed")
print("\nstep | zero2 loss (uninterrupted) | killed after step 40, resumed (same schedule) | diff")
for s in range(35, 60):
    la, lb = a.get(s, {}).get("train/loss"), b.get(s, {}).get("train/loss")
    if la is not None and lb is not None:
        print(f"{s} | {la:.6f} | {lb:.6f} | {lb - la:+.2e}")
EOF
