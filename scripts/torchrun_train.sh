#!/usr/bin/env bash
# Launch rwkv7-train on this node under torchrun. Run it on every node, each with its own NODE_RANK and the same
# RUN_DIR (on a filesystem all nodes share), overrides, NNODES, GPUS_PER_NODE, MASTER_ADDR and MASTER_PORT.
#
#   scripts/torchrun_train.sh RUN_DIR [hydra overrides...]
#
# Environment (defaults): NNODES (1), NODE_RANK (0), GPUS_PER_NODE (the GPUs nvidia-smi lists, or 1),
# MASTER_ADDR (127.0.0.1), MASTER_PORT (29500), PYTHON (python3), TORCH_EXTENSIONS_DIR (node-local, see below).
#
# The same command starts and resumes a run (resume_from=auto). SIGTERM or SIGUSR1 sent to this script reaches
# every training process of this node: they save a checkpoint and the script exits 75. Otherwise it exits 0 when
# the run finished, or with the status of the first rank that failed (1 if that rank was killed by a signal).
set -euo pipefail

usage="usage: scripts/torchrun_train.sh RUN_DIR [hydra overrides...]"
die() {
    echo "torchrun_train.sh: error: $*" >&2
    exit 2
}

if [[ $# -ge 1 && ( $1 == -h || $1 == --help ) ]]; then
    echo "$usage"
    exit 0
fi
if [[ $# -lt 1 || -z $1 ]]; then
    echo "$usage" >&2
    die "RUN_DIR is missing: give the run directory (on a filesystem every node sees) first"
fi
if [[ $1 == *=* ]]; then
    echo "$usage" >&2
    die "RUN_DIR is missing: '$1' is an override; put the run directory before it"
fi
run_dir=$1
shift

count_gpus() {
    local n=0
    if command -v nvidia-smi > /dev/null 2>&1; then
        n=$(nvidia-smi --list-gpus 2> /dev/null | grep -c '^GPU ' || true)
    fi
    echo $((n > 0 ? n : 1))
}

NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
GPUS_PER_NODE=${GPUS_PER_NODE:-$(count_gpus)}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
python=${PYTHON:-python3}
for var in NNODES NODE_RANK GPUS_PER_NODE MASTER_PORT; do
    [[ ${!var} =~ ^[0-9]+$ ]] || die "$var must be a whole number, got '${!var}'"
done
((NNODES >= 1 && GPUS_PER_NODE >= 1)) || die "NNODES and GPUS_PER_NODE must be at least 1"
((NODE_RANK < NNODES)) || die "NODE_RANK ($NODE_RANK) must be below NNODES ($NNODES)"

# DeepSpeed JIT-builds its ops here. A node-local directory: nodes sharing one home directory would race for the
# same build lock (and a process killed mid-build leaves a lock that hangs every later run on that directory).
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-${TMPDIR:-/tmp}/torch_extensions_$(id -u)}"

echo "torchrun_train.sh: node $NODE_RANK of $NNODES, $GPUS_PER_NODE processes, master $MASTER_ADDR:$MASTER_PORT," \
    "run dir $run_dir" >&2
# torchrun itself, with signals and exit statuses a job script can act on (rwkv7_train/torchrun.py).
exec "$python" -m rwkv7_train.torchrun \
    --nnodes="$NNODES" --node-rank="$NODE_RANK" --nproc-per-node="$GPUS_PER_NODE" \
    --master-addr="$MASTER_ADDR" --master-port="$MASTER_PORT" \
    -m rwkv7_train.train hydra.run.dir="$run_dir" resume_from=auto \
    trainer.devices="$GPUS_PER_NODE" trainer.num_nodes="$NNODES" "$@"
