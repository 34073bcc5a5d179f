#!/usr/bin/env bash
# Launch sf-train with torchrun, on one node or several.
#
#   launch/torchrun.sh [hydra overrides...]                      # one node, every GPU (or 2 CPU processes)
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 launch/torchrun.sh experiment=...   # on node 0
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=node0 launch/torchrun.sh experiment=...   # on node 1
#
# Every node must pass the same overrides, including the same hydra.run.dir on a shared filesystem.
#
# Stopping: Ctrl-C (SIGINT), SIGTERM or SIGUSR1 to this script reach the training processes themselves, which
# save a checkpoint at the end of their step and exit cleanly, and so does torchrun (a signal to torchrun itself
# ends in its traceback). A second Ctrl-C stops them at once. torchrun runs in its own process group, so the
# terminal's Ctrl-C reaches this script only.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
if [ -z "${NPROC_PER_NODE:-}" ]; then
    NPROC_PER_NODE=$("$PY" -c "import torch; print(torch.cuda.device_count() or 2)")
fi
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    export DS_ACCELERATOR=cpu   # DeepSpeed's CPU accelerator, gloo process group
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

set -m  # job control: the background launcher gets a process group of its own
"$PY" -m torch.distributed.run \
    --nnodes="${NNODES:-1}" --node_rank="${NODE_RANK:-0}" --nproc_per_node="$NPROC_PER_NODE" \
    --master_addr="${MASTER_ADDR:-127.0.0.1}" --master_port="${MASTER_PORT:-29500}" \
    -m sf.train "$@" &
launcher=$!
forward() { pkill "-$1" -P "$launcher" 2>/dev/null || true; }  # the workers are torchrun's children
trap 'forward INT' INT
trap 'forward TERM' TERM
trap 'forward USR1' USR1
while true; do
    set +e
    wait "$launcher"
    status=$?
    set -e
    kill -0 "$launcher" 2>/dev/null || exit "$status"  # wait returns early when a trapped signal arrives
done
