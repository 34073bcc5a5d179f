"""Nothing lost, nothing confusing: every failure a user can meet ends in one line and a non-zero exit status
(or a warning and a fall-back), and leaves what was on disk intact. docs/troubleshooting.md lists them."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from launch import REPO, error_lines, job_env, kill_tree, read_metrics, run_and_kill, run_job, run_train, train_command
from sf.checkpoint import DAMAGED, MANIFEST, damage, list_checkpoints
from sf.config import compose_config, to_train_config

SMOKE = ["experiment=smoke"]
LOSSES = ("loss/critic", "loss/generator", "grad_norm/critic", "grad_norm/generator")


def same_losses(a: Path, b: Path) -> None:
    """Two runs logged the same steps with bit-identical losses and gradient norms."""
    rows_a, rows_b = {r["step"]: r for r in read_metrics(a)}, {r["step"]: r for r in read_metrics(b)}
    assert sorted(rows_a) == sorted(rows_b)
    for step, row in rows_a.items():
        for key in LOSSES:
            assert row.get(key) == rows_b[step].get(key), (key, step)


def tree(folder: Path) -> dict[str, bytes]:
    """Every file under a folder and its bytes (to prove nothing changed)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def one_error_line(result: subprocess.CompletedProcess, code: int, *fragments: str) -> str:
    assert result.returncode == code, (result.returncode, result.stderr[-3000:])
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    (line,) = error_lines(result)
    for fragment in fragments:
        assert fragment in line, line
    return line


# ------------------------------------------------------------------------------------------------ config mistakes


@pytest.mark.parametrize("override, key", [
    ("data.batch_size=0", "data.batch_size must be >= 1"),
    ("trainer.grad_accum_steps=0", "trainer.grad_accum_steps must be >= 1"),
    ("trainer.checkpoint_every=0", "trainer.checkpoint_every must be >= 1"),
    ("task.gen_update_every=0", "task.gen_update_every must be >= 1"),
    ("trainer.max_steps=-1", "trainer.max_steps must be >= 1"),
    ("task.optim.critic.lr=inf", "task.optim.critic.lr must be a finite number"),
    ("task.optim.critic.lr=1e39", "task.optim.critic.lr must be <= 3.4028234663852886e+38"),
    ("task.ema.decay=1.5", "task.ema.decay must be < 1.0"),
    ("trainer.precision=fp16", "trainer.precision must be one of auto, fp32, bf16"),
    ("task.rollout.num_frames=0", "task.rollout: num_frames must be >= 1"),
    ("+trainer.max_stepz=3", "unknown config key trainer.max_stepz"),
])
def test_values_out_of_range_fail_at_compose_time_naming_the_key(override, key):
    with pytest.raises(ValueError, match=re.escape(key)):
        to_train_config(compose_config([*SMOKE, override]))


@pytest.mark.slow
def test_a_config_mistake_on_the_command_line_is_one_line_before_anything_runs(tmp_path):
    for override in ("trainer.grad_accum_steps=0", "+trainer.max_stepz=3"):
        result = run_job(tmp_path / "run", [*SMOKE, override])
        one_error_line(result, 2, override.lstrip("+").split("=")[0])
        assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.slow
def test_an_unwritable_run_dir_is_one_line(tmp_path):
    (tmp_path / "a-file").write_text("")
    result = run_job(tmp_path / "a-file" / "run", SMOKE)
    one_error_line(result, 2, "cannot be created or written", "a-file")


# ------------------------------------------------------------------------------------------------ one job per run dir


@pytest.mark.slow
def test_a_second_job_on_a_run_dir_in_use_says_who_holds_it_and_leaves(tmp_path):
    run_dir = tmp_path / "run"
    first = subprocess.Popen(train_command(run_dir, [*SMOKE, "trainer.max_steps=400", "trainer.checkpoint_every=50"],
                                           nproc=1), cwd=REPO, env=job_env(), stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 120
        while not read_metrics(run_dir):
            assert first.poll() is None and time.time() < deadline
            time.sleep(0.1)
        second = run_job(run_dir, [*SMOKE, "trainer.max_steps=400"])
        one_error_line(second, 1, f"run dir {run_dir} is in use by another job (pid {first.pid} on host")
        assert first.poll() is None  # the first job trains on, undisturbed
    finally:
        kill_tree(first.pid)
        first.wait()
    steps = [r["step"] for r in read_metrics(run_dir)]
    assert steps == list(range(1, len(steps) + 1))  # one job wrote: no step twice
    # the kernel released the lock of the killed job: the same command resumes
    out = run_train(run_dir, [*SMOKE, "trainer.max_steps=400", "trainer.checkpoint_every=50"], nproc=1)
    assert "resumed from" in out.stdout or not list_checkpoints(run_dir)[:-1]


@pytest.mark.slow
def test_workers_stop_with_their_launcher_when_it_is_killed(tmp_path):
    """kill -9 of torchrun alone (torch elastic puts its workers in sessions of their own): the workers get SIGHUP,
    save a checkpoint at the end of their step and exit; the rerun resumes from it."""
    run_dir = tmp_path / "run"
    launcher = subprocess.Popen(train_command(run_dir, [*SMOKE, "trainer.max_steps=2000"], nproc=2), cwd=REPO,
                                env=job_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
    import psutil

    try:
        deadline = time.time() + 120
        while not any(r["step"] >= 3 for r in read_metrics(run_dir)):
            assert launcher.poll() is None and time.time() < deadline
            time.sleep(0.1)
        workers = psutil.Process(launcher.pid).children()
        assert len(workers) == 2
        launcher.send_signal(signal.SIGKILL)
        launcher.wait()
        _, alive = psutil.wait_procs(workers, timeout=120)
        assert not alive, "workers outlived their launcher"
    finally:
        kill_tree(launcher.pid)
    stopped_at = list_checkpoints(run_dir)[-1]
    assert not (run_dir / "PREEMPTED").exists()  # not a preemption: nothing to requeue
    out = run_train(run_dir, [*SMOKE, f"trainer.max_steps={int(stopped_at.name[5:]) + 2}"], nproc=2)
    assert f"resumed from {stopped_at}" in out.stdout


# ------------------------------------------------------------------------------------------------ weights and losses


@pytest.mark.slow
def test_non_finite_weights_are_never_checkpointed_and_the_message_says_what_was_updated(tmp_path):
    run_dir = tmp_path / "run"
    # the weight decay step leaves -1.5e38, the Adam step -3e38 more: beyond the largest float32, -inf
    result = run_job(run_dir, [*SMOKE, "task.optim.critic.lr=3e38", "task.optim.critic.weight_decay=1",
                               "trainer.checkpoint_every=1"])
    one_error_line(result, 1, "non-finite weights in critic after the updates of step 1",
                   "(updated: generator, critic)", "nothing of this step is saved", "starts from step 0")
    assert not list_checkpoints(run_dir)


@pytest.mark.slow
def test_a_non_finite_loss_names_the_step_counted_from_one_and_what_was_not_updated(tmp_path):
    from sf.models import VideoDiT, dit_config
    from sf.models.convert import save_dit

    torch.manual_seed(0)
    teacher = VideoDiT(dit_config("debug", text_dim=64))
    with torch.no_grad():
        teacher.head.proj.bias.fill_(float("nan"))
    save_dit(teacher, tmp_path / "nan_teacher.safetensors")
    run_dir = tmp_path / "run"
    result = run_job(run_dir, [*SMOKE, f"teacher.checkpoint={tmp_path / 'nan_teacher.safetensors'}",
                               "critic.init_from_teacher=false", "+critic.overrides.text_dim=64"])
    one_error_line(result, 1, "non-finite generator loss at step 1 (on some rank): generator not updated",
                   "nothing of this step is saved")
    assert not list_checkpoints(run_dir)


# ------------------------------------------------------------------------------------------------ damaged checkpoints


DAMAGES = {
    "truncated DeepSpeed state": lambda c: _truncate(next((c / "generator").glob("*model_states.pt"))),
    "missing model-states file": lambda c: next((c / "critic").glob("*model_states.pt")).unlink(),
    "damaged RNG file (same size)": lambda c: _flip_byte(c / "trainer" / "rank_00000.safetensors"),
    "missing trainer state": lambda c: (c / "trainer" / "state.json").unlink(),
    "truncated EMA": lambda c: _truncate(c / "ema" / "rank_00000.safetensors"),
    "damaged optimizer state": lambda c: _flip_byte(next((c / "generator").glob("*optim_states.pt"))),
}


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    """An uninterrupted 6-step run (checkpoints at 2, 4, 6): what every resumed run must reproduce."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    run_train(run_dir, [*SMOKE, "trainer.max_steps=6", "trainer.checkpoint_every=2", "trainer.keep_last=0"], nproc=1)
    return run_dir


@pytest.mark.slow
@pytest.mark.parametrize("how", sorted(DAMAGES))
def test_a_damaged_newest_checkpoint_is_set_aside_and_the_previous_one_resumes_exactly(tmp_path, reference_run,
                                                                                        how):
    run_dir = tmp_path / "run"
    run_train(run_dir, [*SMOKE, "trainer.max_steps=4", "trainer.checkpoint_every=2", "trainer.keep_last=0"], nproc=1)
    newest = run_dir / "checkpoints" / "step_000004"
    DAMAGES[how](newest)
    damaged = tree(newest)
    out = run_train(run_dir, [*SMOKE, "trainer.max_steps=6", "trainer.checkpoint_every=2", "trainer.keep_last=0"],
                    nproc=1)
    warnings = [line for line in out.stdout.splitlines() if "is damaged" in line]
    assert len(warnings) == 1 and "step_000004" in warnings[0] and "resuming from step_000002" in warnings[0], warnings
    assert f"resumed from {run_dir / 'checkpoints' / 'step_000002'} at step 2" in out.stdout
    aside = run_dir / "checkpoints" / ("step_000004" + DAMAGED)
    assert tree(aside) == damaged  # kept exactly as found, for inspection
    same_losses(run_dir, reference_run)


def test_verification_names_the_first_problem(tmp_path):
    from sf.checkpoint import write_manifest

    folder = tmp_path / "step_000002"
    (folder / "generator").mkdir(parents=True)
    (folder / "generator" / "weights.pt").write_bytes(b"x" * 100)
    (folder / "config.yaml").write_text("a: 1\n")
    write_manifest(folder, rank=0)
    assert json.loads((folder / MANIFEST).read_text())["generator/weights.pt"][0] == 100
    assert damage(folder, rank=0) is None
    _flip_byte(folder / "generator" / "weights.pt")
    assert damage(folder, rank=0) == "generator/weights.pt differs from what was written (hash)"
    _truncate(folder / "generator" / "weights.pt")
    assert damage(folder, rank=0) == "generator/weights.pt has 50 bytes, 100 were written"
    (folder / "config.yaml").unlink()
    assert damage(folder, rank=0) == "config.yaml missing"


@pytest.mark.slow
def test_kill_while_a_checkpoint_is_written_at_two_ranks_resumes_exactly(tmp_path):
    """The soak's hard case: SIGKILL of every process while a step_N.tmp folder is being filled."""
    overrides = [*SMOKE, "deepspeed=zero2", "trainer.max_steps=8", "trainer.checkpoint_every=2"]
    reference = tmp_path / "reference"
    run_train(reference, overrides, nproc=2)
    run_dir = tmp_path / "run"
    writing = lambda: any((run_dir / "checkpoints").glob("step_*.tmp"))  # noqa: E731
    run_and_kill(run_dir, overrides, kill_after_step=3, nproc=2, when=writing)
    assert any((run_dir / "checkpoints").glob("step_*.tmp"))  # it really died mid-checkpoint
    run_train(run_dir, overrides, nproc=2)
    assert [r["step"] for r in read_metrics(run_dir)] == list(range(1, 9))
    same_losses(run_dir, reference)
    assert not any((run_dir / "checkpoints").glob("step_*.tmp"))  # the unfinished one is cleaned up


# ------------------------------------------------------------------------------------------------ resuming elsewhere


@pytest.mark.slow
def test_resuming_with_other_networks_is_one_line_naming_the_difference(tmp_path):
    run_dir = tmp_path / "run"
    run_train(run_dir, [*SMOKE, "trainer.max_steps=2"], nproc=1)
    result = run_job(run_dir, [*SMOKE, "trainer.max_steps=4", "+model.overrides.ffn_dim=64",
                               "+teacher.overrides.ffn_dim=64"])
    one_error_line(result, 1, "holds a critic with ffn_dim=96, this job's has ffn_dim=64",
                   "resume with the config that wrote it")


@pytest.mark.slow
def test_a_full_disk_while_checkpointing_is_one_line_and_the_previous_checkpoint_stays(tmp_path):
    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=10m", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        run_dir = mount / "run"
        overrides = [*SMOKE, "trainer.max_steps=40", "trainer.checkpoint_every=2", "trainer.keep_last=0"]
        result = run_job(run_dir, overrides)
        line = one_error_line(result, 1, "could not write checkpoint step_", "free space")
        kept = list_checkpoints(run_dir)
        assert kept, "the disk (room for two smoke checkpoints) should fill up at the third"
        assert kept[-1].name in line and damage(kept[-1], rank=0) is None  # named, and intact
    finally:
        subprocess.run(["umount", str(mount)], capture_output=True)


# ------------------------------------------------------------------------------------------------ prompt files


@pytest.mark.slow
def test_an_empty_then_fixed_prompt_file_trains_and_an_edited_one_is_refused(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n  \n")
    run_dir = tmp_path / "run"
    common = [*SMOKE, f"data.shards={prompts}", "trainer.max_steps=2"]
    one_error_line(run_job(run_dir, common), 1, f"data.shards: prompt file {prompts} holds no prompt")
    assert not (run_dir / "data" / "prompts" / "DONE").exists()  # no conversion of nothing marked done
    prompts.write_text("a red circle moves left on a grey background\na blue square moves up on a black background\n")
    run_train(run_dir, common, nproc=1)
    record = json.loads((run_dir / "data" / "prompts" / "DONE").read_text())
    assert record["prompts"] == 2 and record["path"] == str(prompts.resolve())
    prompts.write_text("something else entirely\n")
    one_error_line(run_job(run_dir, [*SMOKE, f"data.shards={prompts}", "trainer.max_steps=4"]), 1,
                   f"data.shards: {prompts} changed since this run made its prompt shards from it")


def test_a_prompt_file_edited_before_any_checkpoint_is_converted_again(tmp_path):
    from sf.tasks.distill import prepare_prompt_shards

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("one\ntwo\n")
    out = Path(prepare_prompt_shards(str(prompts), tmp_path / "run", rank=0))
    first = json.loads((out / "DONE").read_text())
    prompts.write_text("one\ntwo\nthree\n")
    prepare_prompt_shards(str(prompts), tmp_path / "run", rank=0)
    again = json.loads((out / "DONE").read_text())
    assert (first["prompts"], again["prompts"]) == (2, 3) and first["sha256"] != again["sha256"]


def test_invalid_utf8_in_a_prompt_file_names_the_file_and_the_line(tmp_path):
    from sf.data.prompts import read_prompt_file

    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes(b"fine\n\xff\xfe broken\n")
    with pytest.raises(ValueError, match=rf"prompt file {prompts}, line 2: not UTF-8"):
        read_prompt_file(prompts)


# ------------------------------------------------------------------------------------------------ interrupts


def _start(run_dir: Path, overrides: list[str], nproc: int = 1, command: list[str] | None = None):
    proc = subprocess.Popen(command or train_command(run_dir, overrides, nproc), cwd=REPO,
                            env=job_env(NPROC_PER_NODE=nproc, PY=sys.executable, MASTER_PORT=_port()),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 180
    while not any(r["step"] >= 3 for r in read_metrics(run_dir)):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.05)
    return proc


def _port() -> int:
    from sf.distributed import free_port

    return free_port()


@pytest.mark.slow
def test_ctrl_c_saves_a_checkpoint_at_the_end_of_the_step_and_exits_cleanly(tmp_path):
    run_dir = tmp_path / "run"
    proc = _start(run_dir, [*SMOKE, "trainer.max_steps=5000", "trainer.checkpoint_every=1000"])
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0 and "Traceback" not in err, err[-3000:]
    saved = list_checkpoints(run_dir)[-1]
    assert f"stopped: checkpoint saved at step {int(saved.name[5:])}" in out
    assert not (run_dir / "PREEMPTED").exists()  # an interrupt is not a preemption: nothing requeues it


@pytest.mark.slow
def test_a_second_ctrl_c_exits_at_once(tmp_path):
    run_dir = tmp_path / "run"
    proc = _start(run_dir, [*SMOKE, "trainer.max_steps=5000", "trainer.checkpoint_every=1000",
                            "task.rollout.num_frames=30"])  # longer steps: the second signal lands mid-step
    proc.send_signal(signal.SIGINT)
    time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "interrupted again: exiting now" in err, err[-3000:]


@pytest.mark.slow
def test_ctrl_c_to_the_torchrun_script_ends_cleanly_with_a_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    command = [str(REPO / "launch" / "torchrun.sh"), *SMOKE, "trainer.max_steps=5000", "trainer.checkpoint_every=1000",
               f"hydra.run.dir={run_dir}"]
    proc = _start(run_dir, [], nproc=2, command=command)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, err[-3000:]
    assert "Traceback" not in out + err
    saved = list_checkpoints(run_dir)[-1]
    assert f"stopped: checkpoint saved at step {int(saved.name[5:])}" in out


# ------------------------------------------------------------------------------------------------ logs


@pytest.mark.slow
def test_a_non_interactive_job_prints_status_lines_and_writes_train_log(tmp_path):
    run_dir = tmp_path / "run"
    out = run_train(run_dir, [*SMOKE, "trainer.max_steps=6", "logger.status_every_s=0", "logger=wandb"], nproc=1)
    lines = [line for line in out.stdout.splitlines() if line.startswith("[sf] step ")]
    assert [line.split()[2] for line in lines] == [f"{s}/6" for s in range(1, 7)]  # stdout is not a terminal
    assert all("s/step" in line and "ETA" in line and "peak mem" in line for line in lines)
    assert "loss/critic" in lines[0]
    log = (run_dir / "train.log").read_text()
    assert log.count(" step ") >= 6 and "step 6/6" in log
    assert _wandb_job_type(run_dir) == "distill"  # the task's name, also for other tasks


def _wandb_job_type(run_dir: Path) -> str:
    """The job_type in the run record of the offline wandb run file."""
    from sf.logging import read_wandb_records

    (run_file,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    runs = [record.run for record in read_wandb_records(run_file) if record.WhichOneof("record_type") == "run"]
    return runs[0].job_type


# ------------------------------------------------------------------------------------------------ other commands


def _fails(main, argv, capsys, *fragments: str) -> None:
    """A command's main given `argv` ends with exit status 1 and one `error:` line holding the fragments."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 1
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, lines
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A causal student's export and a file of another kind (a VAE codec)."""
    from sf.models import VideoDiT, dit_config
    from sf.models.convert import save_dit
    from sf.models.vae import WanVAE, save_codec

    root = tmp_path_factory.mktemp("weights")
    torch.manual_seed(0)
    save_dit(VideoDiT(dit_config("debug", text_dim=64)), root / "student.safetensors")
    save_codec(WanVAE.from_flavor("world"), root / "vae.safetensors")
    return root


def test_sf_generate_checks_its_inputs_and_output_first(tmp_path, weights, capsys):
    from sf.cli import generate_main

    (tmp_path / "a-file").write_text("")
    out = str(tmp_path / "o.mp4")
    _fails(generate_main, [str(tmp_path / "missing.safetensors"), "--prompt", "x", "--out", out],
           capsys, "missing.safetensors does not exist")
    _fails(generate_main, [str(weights / "vae.safetensors"), "--prompt", "x", "--out", out],
           capsys, "vae.safetensors: a video codec (wan VAE) file, not DiT weights")
    _fails(generate_main, [str(weights / "student.safetensors"), "--prompt", "x", "--out",
                           str(tmp_path / "a-file" / "o.mp4")], capsys, "--out", "not a writable folder")
    _fails(generate_main, [str(weights / "student.safetensors"), "--prompt", "x", "--out", str(tmp_path / "o.avi")],
           capsys, "--out must name an .mp4 file")
    _fails(generate_main, [str(weights / "student.safetensors"), "--out", out], capsys, "--prompt")
    assert not (tmp_path / "o.mp4").exists()


def test_sf_eval_checks_out_and_weights_before_evaluating(tmp_path, weights, capsys):
    from sf.world.evaluate import main as eval_main

    (tmp_path / "a-file").write_text("")
    started = time.perf_counter()
    _fails(eval_main, ["--student", str(weights / "student.safetensors"), "--out", str(tmp_path / "a-file")], capsys,
           "--out", "not a writable folder")
    _fails(eval_main, ["--student", str(tmp_path / "nope.safetensors"), "--out", str(tmp_path / "o")], capsys,
           "--student", "does not exist")
    _fails(eval_main, ["--teacher", str(weights / "vae.safetensors"), "--out", str(tmp_path / "o")], capsys,
           "a video codec (wan VAE) file, not DiT weights")
    _fails(eval_main, ["--student", str(weights / "student.safetensors"), "--assets", str(tmp_path),
                       "--out", str(tmp_path / "o")], capsys, "--assets", "lacks")
    assert time.perf_counter() - started < 30  # before any video is generated


def test_sf_export_of_a_path_without_checkpoints_is_one_line(tmp_path, capsys):
    from sf.cli import export_main

    _fails(export_main, [str(tmp_path)], capsys, f"{tmp_path} is neither a complete checkpoint nor a run dir")


def test_a_broken_config_json_is_named(tmp_path):
    from safetensors.torch import save_file

    from sf.models import VideoDiT, dit_config
    from sf.models.convert import CheckpointError, convert_state_dict, load_dit

    folder = tmp_path / "diffusers"  # a diffusers transformer folder: the architecture is in config.json only
    folder.mkdir()
    state = convert_state_dict(VideoDiT(dit_config("debug")).state_dict(), "sf", "diffusers")
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "diffusion_pytorch_model.safetensors"))
    (folder / "config.json").write_text("{ not json")
    with pytest.raises(CheckpointError, match=rf"{folder / 'config.json'}: not a readable JSON config"):
        load_dit(folder)


def test_the_run_dir_lock_names_its_holder_and_dies_with_it(tmp_path):
    from sf.rundir import RunDirBusy, RunDirLock

    with RunDirLock(tmp_path / "run"):
        with pytest.raises(RunDirBusy, match=rf"run dir {tmp_path / 'run'} is in use by another job \(pid "):
            RunDirLock(tmp_path / "run").acquire()
    RunDirLock(tmp_path / "run").acquire()  # released: free again
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from sf.rundir import RunDirLock; "
                               f"RunDirLock({str(tmp_path / 'other')!r}).acquire(); print('held', flush=True); "
                               "time.sleep(60)"], cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(RunDirBusy, match=f"pid {holder.pid} on host"):
        RunDirLock(tmp_path / "other").acquire()
    holder.kill()
    holder.wait()
    RunDirLock(tmp_path / "other").acquire()  # the kernel released the dead holder's lock


@pytest.mark.slow
def test_the_soak_tool_runs_its_trials(tmp_path):
    """`python -m eval.soak` shortened: one kill between steps, one mid-checkpoint, both exact."""
    result = subprocess.run([sys.executable, "-m", "eval.soak", "--trials", "2", "--steps", "8",
                             "--checkpoint-every", "2", "--out", str(tmp_path)], cwd=REPO, env=job_env(),
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    summary = json.loads((tmp_path / "soak.json").read_text())
    assert summary["exact"] == 2 and summary["results"][1]["killed"].startswith("while writing step_")
