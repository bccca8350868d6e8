#!/usr/bin/env bash
# shellcheck disable=SC2317  # node_task, signal_ranks and forward_signal run via srun and trap
# Train on a SLURM cluster: one DeepSpeed launcher per node, started by srun, no SSH between nodes.
#
#   mkdir -p logs    # SLURM opens --output before this script runs, so the folder must exist
#   sbatch [sbatch options] launchers/slurm.sh configs/X.yaml [key.sub=value ...] [--resume auto|none|PATH]
#
# Submit from the repository root (or set IAIS_ROOT); the arguments go to launchers/train.py unchanged.
# Knobs (exported on the submitting shell): IAIS_ROOT, IAIS_ENV_SETUP (a file sourced first),
# IAIS_GPUS_PER_NODE, IAIS_CPU_RANKS_PER_NODE (CPU nodes; default 1), IAIS_MASTER_PORT, IAIS_DEEPSPEED,
# IAIS_NODE_TMP, IAIS_REQUEUE_HOLD=1 (requeue parked until `scontrol release`).
# How it runs, how USR1 becomes a checkpoint and a requeue, and why the node task ignores SIGTERM:
# docs/clusters.md ("SLURM" and "Preemption, requeue and resuming").
#
#SBATCH --job-name=iais
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --time=04:00:00
#SBATCH --output=logs/%x-%j.out
#SBATCH --open-mode=append
#SBATCH --requeue
#SBATCH --signal=B:USR1@180

set -euo pipefail

log() { echo "slurm.sh[$(date +%H:%M:%S)]: $*"; }
die() { echo "slurm.sh: error: $*" >&2; exit 2; }

[[ -n ${SLURM_JOB_ID:-} ]] || die "run me with sbatch: sbatch launchers/slurm.sh configs/X.yaml [overrides...]"
(( $# >= 1 )) || die "usage: sbatch launchers/slurm.sh configs/X.yaml [key.sub=value ...]"
cd "${IAIS_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}"
[[ -f launchers/train.py ]] || die "$PWD has no launchers/train.py: submit from the repository root or set IAIS_ROOT"
[[ -f $1 ]] || die "config $1 not found (relative to $PWD)"
if [[ -n ${IAIS_ENV_SETUP:-} ]]; then
    # shellcheck disable=SC1090
    source "$IAIS_ENV_SETUP"
fi
IAIS_DEEPSPEED=${IAIS_DEEPSPEED:-deepspeed}
command -v "$IAIS_DEEPSPEED" >/dev/null || die "'$IAIS_DEEPSPEED' not on PATH (activate the environment, or set IAIS_ENV_SETUP)"

# ------------------------------------------------------------------ resolved settings
mapfile -t NODES < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
NNODES=${SLURM_JOB_NUM_NODES:-${#NODES[@]}}
(( NNODES == ${#NODES[@]} )) || die "SLURM_JOB_NUM_NODES=$NNODES but the node list has ${#NODES[@]} names"
MASTER_ADDR=${NODES[0]}
MASTER_PORT=${IAIS_MASTER_PORT:-$(( 20000 + SLURM_JOB_ID % 20000 ))}

gpus=${IAIS_GPUS_PER_NODE:-${SLURM_GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-0}}}
gpus=${gpus##*:}                      # --gpus-per-node=a100:8 -> 8
[[ $gpus =~ ^[0-9]+$ ]] || die "cannot read a GPU count from '$gpus' (set IAIS_GPUS_PER_NODE)"
if (( gpus > 0 )); then
    RANKS_PER_NODE=$gpus; DEVICE=gpu
else
    RANKS_PER_NODE=${IAIS_CPU_RANKS_PER_NODE:-1}; DEVICE=cpu
fi
# srun (22.05+) does not inherit --cpus-per-task from sbatch: give the node task the node's whole
# CPU allocation (the smallest over nodes), or the ranks would all be bound to one core.
if [[ -n ${SLURM_CPUS_PER_TASK:-} ]]; then
    CPUS_PER_TASK=$SLURM_CPUS_PER_TASK
else
    CPUS_PER_TASK=$(tr ',' '\n' <<<"${SLURM_JOB_CPUS_PER_NODE:-1}" | sed 's/(.*//' | sort -n | head -n1)
fi
IAIS_NODE_TMP=${IAIS_NODE_TMP:-${TMPDIR:-/tmp}}
RANKS_PER_NODE_DEVICE=$DEVICE
export MASTER_ADDR MASTER_PORT NNODES RANKS_PER_NODE RANKS_PER_NODE_DEVICE IAIS_DEEPSPEED IAIS_NODE_TMP
export IAIS_NODES="${NODES[*]}"

log "job $SLURM_JOB_ID (${SLURM_JOB_NAME:-}) restart ${SLURM_RESTART_COUNT:-0}, in $PWD"
log "nodes ($NNODES): ${NODES[*]}"
log "rendezvous $MASTER_ADDR:$MASTER_PORT; $RANKS_PER_NODE $DEVICE rank(s) per node, world size $(( NNODES * RANKS_PER_NODE )); $CPUS_PER_TASK CPUs per node task"
log "launcher $(command -v "$IAIS_DEEPSPEED"), python $(command -v python3 || true)"
log "train.py arguments: --config $*"

# ------------------------------------------------------------------ per-node pieces (run under srun)
node_task() {
    # One per node: write the hostfile, start DeepSpeed's launcher for this node's ranks, wait.
    set -u
    trap '' USR1   # only the ranks act on USR1 (see signal_ranks)
    trap 'echo "slurm.sh[node $SLURM_NODEID]: SIGTERM: waiting for the ranks to save and stop"' TERM
    local base="$IAIS_NODE_TMP/iais-slurm-$SLURM_JOB_ID.node$SLURM_NODEID"
    mkdir -p "$IAIS_NODE_TMP"
    local host
    : >"$base.hostfile"
    for host in $IAIS_NODES; do echo "$host slots=$RANKS_PER_NODE" >>"$base.hostfile"; done
    echo "slurm.sh[node $SLURM_NODEID $(hostname -s)]: starting $RANKS_PER_NODE rank(s)"
    if [[ -n ${CUDA_VISIBLE_DEVICES:-} && $RANKS_PER_NODE_DEVICE == gpu ]]; then
        local expect
        expect=$(seq -s, 0 $(( RANKS_PER_NODE - 1 )))
        [[ $CUDA_VISIBLE_DEVICES == "$expect" ]] || echo "slurm.sh[node $SLURM_NODEID]: warning:" \
            "SLURM set CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES but DeepSpeed's launcher will use GPUs $expect" \
            "(ask for whole nodes, or have ConstrainDevices=yes in the cluster's cgroup.conf)"
    fi
    # USR1/TERM ignored in the runner (and in its launcher for USR1): they must survive the
    # signals meant for the ranks; the ranks install their own handlers.
    (
        trap '' USR1 TERM
        exec "$IAIS_DEEPSPEED" --hostfile "$base.hostfile" --no_ssh --node_rank "$SLURM_NODEID" \
            --num_nodes "$NNODES" --num_gpus "$RANKS_PER_NODE" \
            --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
            launchers/train.py --config "$@"
    ) &
    local pid=$! rc
    echo "$pid" >"$base.pid"
    while kill -0 "$pid" 2>/dev/null; do wait "$pid" || true; done
    wait "$pid"; rc=$?
    rm -f "$base.pid" "$base.hostfile"
    echo "slurm.sh[node $SLURM_NODEID]: ranks exited with $rc"
    return "$rc"
}

signal_ranks() {
    # One per node: send signal $1 to the training ranks that this job's node task started here.
    local sig=$1 runner ranks
    runner=$(cat "$IAIS_NODE_TMP/iais-slurm-$SLURM_JOB_ID.node$SLURM_NODEID.pid" 2>/dev/null) || {
        echo "slurm.sh[node $SLURM_NODEID]: no training running here, SIG$sig not forwarded"; return 0; }
    # ranks = children of a deepspeed.launcher.launch process that descends from our runner
    ranks=$(ps -eo pid=,ppid=,args= | awk -v root="$runner" '
        { pid = $1; parent[pid] = $2; $1 = ""; $2 = ""; args[pid] = $0 }
        END {
            for (p in parent) {
                if (args[parent[p]] !~ /deepspeed\.launcher\.launch/) continue
                q = parent[p]
                while ((q in parent) && q != root && q > 1) q = parent[q]
                if (q == root) print p
            }
        }')
    if [[ -z $ranks ]]; then
        echo "slurm.sh[node $SLURM_NODEID]: no ranks found under pid $runner, SIG$sig not forwarded"; return 0
    fi
    echo "slurm.sh[node $SLURM_NODEID]: SIG$sig -> ranks ${ranks//$'\n'/ }"
    # shellcheck disable=SC2086
    kill -s "$sig" $ranks
}

forward_signal() {
    local sig=$1
    log "got SIG$sig: forwarding it to the training ranks on all $NNODES node(s)"
    timeout 120 srun --overlap --nodes="$NNODES" --ntasks="$NNODES" --ntasks-per-node=1 --cpus-per-task=1 \
        --kill-on-bad-exit=0 bash -c "$(declare -f signal_ranks); signal_ranks $sig" \
        || log "forwarding SIG$sig failed (rc $?)"
}

# ------------------------------------------------------------------ run
srun --nodes="$NNODES" --ntasks="$NNODES" --ntasks-per-node=1 --cpus-per-task="$CPUS_PER_TASK" \
    --kill-on-bad-exit=1 bash -c "$(declare -f node_task); node_task \"\$@\"" node_task "$@" &
SRUN_PID=$!
trap 'forward_signal USR1' USR1
# SLURM's SIGTERM (scancel, time limit) reaches every process itself: keep waiting for srun.
trap 'log "SIGTERM: the job is being stopped; waiting for the ranks"' TERM
while kill -0 "$SRUN_PID" 2>/dev/null; do wait "$SRUN_PID" || true; done
set +e
wait "$SRUN_PID"; rc=$?
set -e
log "training exited with $rc"
exit "$rc"
