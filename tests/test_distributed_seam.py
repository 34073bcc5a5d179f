"""The engine seam (`sf.distributed`) in two in-process gloo ranks: collectives, a trained role's step, LR,
freezing, full weights, save/load and the EMA, under ZeRO-2 and ZeRO-3."""

import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from sf.distributed import free_port

WIDTH = 8


class TinyNet(torch.nn.Module):
    """Two linear layers: enough parameters for ZeRO to shard, small enough to check by hand."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(WIDTH, 16)
        self.b = torch.nn.Linear(16, 1)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


def batch_of(rank: int, micro: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's inputs and targets (different on every rank and micro-batch)."""
    g = torch.Generator().manual_seed(100 + 10 * rank + micro)
    return torch.randn(4, WIDTH, generator=g), torch.randn(4, 1, generator=g)


def loss_of(net, x, y) -> torch.Tensor:
    return (net(x) - y).square().mean()


def reference_grad_norm(initial: dict, world: int, accum: int) -> float:
    """The norm of what data parallelism with accumulation defines: the mean of every (rank, micro) gradient."""
    net = TinyNet()
    net.load_state_dict(initial)
    for rank in range(world):
        for micro in range(accum):
            (loss_of(net, *batch_of(rank, micro)) / (world * accum)).backward()
    return float(torch.sqrt(sum(p.grad.square().sum() for p in net.parameters())))


def _worker(rank: int, world: int, port: int, stage: int, out_dir: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), DS_ACCELERATOR="cpu")
    torch.set_num_threads(1)
    from sf import distributed as sd

    d = sd.init_distributed(timeout_minutes=2)
    try:
        # collectives
        assert sd.any_rank(rank == 1) and not sd.any_rank(False)
        assert sd.mean_across_ranks({"x": float(rank), "y": 2.0}) == {"x": 0.5, "y": 2.0}
        assert sd.broadcast_from_main(torch.tensor([rank + 7])).item() == 7
        assert sd.broadcast_object({"from": rank}) == {"from": 0}
        assert sd.all_gather_object(rank * 10) == [0, 10]

        # a trained role with 2 micro-batches per update
        torch.manual_seed(0)
        net = TinyNet()
        initial = {k: v.clone() for k, v in net.state_dict().items()}
        config = sd.engine_config(sd.DeepSpeedConfig(stage=stage), micro_batch=4, grad_accum=2, grad_clip=100.0,
                                  bf16=False)
        role = sd.build_trainable(net, sd.RoleSpec("net", sd.OptimizerConfig(lr=1e-2, betas=[0.9, 0.999])), config)
        full = role.full_state_dict(d.rank)
        if rank == 0:  # the gathered weights are the module's, also when ZeRO-3 shards them
            assert all(torch.equal(full[k], initial[k]) for k in initial)
        assert role.step(loss_of(role, *batch_of(rank, 0))) is None  # first micro-batch: no optimizer step yet
        norm = role.step(loss_of(role, *batch_of(rank, 1)))
        expected = reference_grad_norm(initial, world, accum=2)
        # the same sums in another order: a few fp32 ulps of relative error
        assert norm == pytest.approx(expected, rel=1e-5) and role.grad_norm == norm
        stepped = role.full_state_dict(d.rank)
        if rank == 0:
            assert not torch.equal(stepped["a.weight"], initial["a.weight"])

        # LR 0: the next update leaves the weights where they are
        role.set_lr(0.0)
        for micro in range(2):
            role.step(loss_of(role, *batch_of(rank, micro)))
        unchanged = role.full_state_dict(d.rank)
        if rank == 0:
            assert all(torch.equal(unchanged[k], stepped[k]) for k in stepped)
        role.set_lr(1e-2)

        # frozen inside another loss: no gradient flows into it, its flags come back
        with role.frozen() as module:
            assert not any(p.requires_grad for p in module.parameters())
            x = torch.randn(2, WIDTH, requires_grad=True)
            module(x).sum().backward()
            assert x.grad is not None
        assert all(p.requires_grad for p in role.module.parameters())

        # the EMA starts as a copy at the first update at or after start_step, then averages
        ema = sd.EMA(role, decay=0.5, start_step=3)
        ema.update(1)
        assert ema.started_at is None
        ema.update(4)
        assert ema.started_at == 4
        copy = ema.full_state_dict(d.rank)
        if rank == 0:
            assert all(torch.equal(copy[k], unchanged[k]) for k in copy)

        # save, train on, load: back to the saved weights
        checkpoint = Path(out_dir) / f"zero{stage}"
        if rank == 0:
            checkpoint.mkdir(parents=True, exist_ok=True)
        sd.barrier()
        role.save(checkpoint)
        for micro in range(2):
            role.step(loss_of(role, *batch_of(rank, micro)))
        moved = role.full_state_dict(d.rank)
        role.load(checkpoint)
        loaded = role.full_state_dict(d.rank)
        if rank == 0:
            assert not torch.equal(moved["a.weight"], unchanged["a.weight"])
            assert all(torch.equal(loaded[k], unchanged[k]) for k in loaded)
        # and the consolidated fp32 weights of the saved shards, without a process group
        if rank == 0:
            rebuilt = sd.consolidated_state_dict(checkpoint, "net")
            assert all(torch.equal(rebuilt[k], unchanged[k]) for k in rebuilt)
        sd.barrier()

        # bf16: the EMA copies the optimizer's fp32 masters (what the checkpoint saves), not the rounded bf16
        # weights the forward runs with
        torch.manual_seed(1)
        low_config = sd.engine_config(sd.DeepSpeedConfig(stage=stage), micro_batch=4, grad_accum=1, grad_clip=100.0,
                                      bf16=True)
        low = sd.build_trainable(TinyNet(), sd.RoleSpec("low", sd.OptimizerConfig(lr=1e-3)), low_config)
        assert low.low_precision
        low_ema = sd.EMA(low, decay=0.5, start_step=2)
        for step in range(3):
            x, y = batch_of(rank, step)
            low.step(loss_of(low, x.bfloat16(), y.bfloat16()).float())
            low_ema.update(step)
        assert low_ema.started_at == 2
        low_checkpoint = Path(out_dir) / f"bf16_zero{stage}"
        if rank == 0:
            low_checkpoint.mkdir(parents=True, exist_ok=True)
        sd.barrier()
        low.save(low_checkpoint)
        averaged, forward_weights = low_ema.full_state_dict(d.rank), low.full_state_dict(d.rank)
        if rank == 0:
            masters = sd.consolidated_state_dict(low_checkpoint, "low")
            assert all(torch.equal(averaged[k], masters[k]) for k in masters)
            assert not all(torch.equal(averaged[k], forward_weights[k]) for k in masters)  # bf16 is another thing
        sd.barrier()
    finally:
        sd.shutdown()


@pytest.mark.parametrize("stage", [2, 3])
def test_seam_on_two_gloo_ranks(tmp_path, stage):
    mp.spawn(_worker, args=(2, free_port(), stage, str(tmp_path)), nprocs=2, join=True)
