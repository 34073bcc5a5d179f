#!/usr/bin/env bash
# Launch sf-train with the `deepspeed` launcher.
#
#   launch/deepspeed.sh experiment=... hydra.run.dir=runs/a                       # this node, every GPU
#   HOSTFILE=launch/hostfile launch/deepspeed.sh experiment=... hydra.run.dir=/shared/runs/a   # several nodes
#
# --no_local_rank: the launcher would append --local_rank=N, which Hydra rejects; workers read LOCAL_RANK.
# OMP_NUM_THREADS is exported to every worker (the deepspeed launcher does not set it; 4x slower without).
# Multi-node runs need passwordless ssh between the hosts of the hostfile (see launch/hostfile.example).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    export DS_ACCELERATOR=cpu
fi
if [ -n "${HOSTFILE:-}" ]; then
    where=(--hostfile "$HOSTFILE")
else
    where=(--num_nodes 1 --num_gpus "${NPROC_PER_NODE:-$("$PY" -c "import torch; print(torch.cuda.device_count() or 2)")}")
fi
exec "$PY" -m deepspeed.launcher.runner "${where[@]}" --no_local_rank --master_port "${MASTER_PORT:-29500}" \
    --module sf.train "$@"
