"""`make assets`: build the embedded world's shipped weights from scratch with the project's own recipes.

    python -m eval.assets --out build/assets --install sf/assets/world      # the full recipe (make assets)
    python -m eval.assets --out /tmp/a --quick                              # a shortened run (the tests)

Steps, in dependency order; each writes into --out and is skipped when its output is already there, so an
interrupted build resumes (the training steps also resume from their own checkpoints):

    text_encoder   the open_clip text tower (`sf-tiny-clip`, seeded init) every network is conditioned on
    world          world videos (train split) as webdataset shards, and the train captions as a prompt file
    vae            sf-train experiment=world_vae        -> vae.safetensors (weights + latent mean/std)
    latents        the train videos encoded by that VAE into latent shards
    teacher        sf-train experiment=world_teacher    -> teacher.safetensors (the EMA weights)
    ode_init       sf-train experiment=world_ode        -> ode_init.safetensors (teacher pairs + regression)
    classifier     python -m sf.world.fvd train       -> classifier.safetensors (the world-FVD features)

`--install DIR` copies the results into DIR with, for each, ``<name>.json``: the command and resolved config of
the run that produced it and that run's final metrics. `make demo` starts from sf/assets/world.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import sf  # noqa: F401  (torchvision compatibility before open_clip / diffusers)

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ("text_encoder.safetensors", "vae.safetensors", "teacher.safetensors", "ode_init.safetensors",
           "classifier.safetensors", "train_prompts.txt")


@dataclass(frozen=True)
class Plan:
    """How much of each recipe to run (the full build, or the shortened one the tests run)."""

    num_videos: int = 512  # train videos: VAE pixels and teacher latents
    num_prompts: int = 2048  # train captions shipped for ODE pairs and distillation
    vae_steps: int | None = None  # None: the experiment's own schedule
    teacher_steps: int | None = None
    ode_steps: int | None = None
    ode_pairs: int | None = None
    ode_teacher_steps: int | None = None
    classifier_steps: int | None = None
    extra: tuple[str, ...] = ()  # overrides for every sf-train run
    recipe_extra: tuple[tuple[str, tuple[str, ...]], ...] = ()  # (run name, overrides of that run only)

    def overrides(self, name: str) -> list[str]:
        """The extra overrides of run `name`: the shared ones, then its own."""
        return [*self.extra, *dict(self.recipe_extra).get(name, ())]


QUICK = Plan(num_videos=6, num_prompts=16, vae_steps=2, teacher_steps=2, ode_steps=2, ode_pairs=4,
             ode_teacher_steps=3, classifier_steps=3,
             extra=("trainer.checkpoint_every=2", "data.batch_size=2"),
             recipe_extra=(("vae", ("task.stats_videos=2", "task.curriculum=[[1,1,2]]")), ("ode", ("task.batch_size=2",))))


def run(cmd: list[str], log: Path) -> None:
    """Run a step's command, its output to `log` (and a one-line error naming the log when it fails)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    print(f"[assets] $ {' '.join(cmd)}", flush=True)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(os.cpu_count() or 1))}
    with open(log, "a") as out:
        code = subprocess.call(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    if code != 0:
        tail = log.read_text().strip().splitlines()[-1:] or ["(no output)"]
        raise SystemExit(f"error: step failed (exit {code}), see {log}: {tail[0]}")


def train(name: str, experiment: str, out: Path, overrides: list[str], steps: int | None, plan: Plan) -> Path:
    """sf-train for one recipe in out/runs/<name>; returns its newest checkpoint's export folder."""
    from sf.checkpoint import latest_checkpoint

    run_dir = out / "runs" / name
    cmd = [sys.executable, "-m", "sf.train", f"experiment={experiment}", f"hydra.run.dir={run_dir}", *overrides,
           *plan.overrides(name)]
    if steps is not None:
        cmd.append(f"trainer.max_steps={steps}")
    (run_dir).mkdir(parents=True, exist_ok=True)
    (run_dir / "command.txt").write_text(" ".join(cmd[1:]) + "\n")
    run(cmd, run_dir / "train.log")
    return latest_checkpoint(run_dir) / "export"


def step_text_encoder(out: Path) -> Path:
    """The text tower every network reads: sf-tiny-clip from seed 0, stored in fp16 (what all recipes load)."""
    import open_clip
    import torch
    from safetensors.torch import save_file

    from sf.models.text import register_open_clip_configs

    path = out / "text_encoder.safetensors"
    if not path.exists():
        register_open_clip_configs()
        torch.manual_seed(0)
        model = open_clip.create_model("sf-tiny-clip", force_custom_text=True, pretrained_text=False)
        save_file({k: v.detach().half().contiguous() for k, v in model.state_dict().items()}, str(path),
                  metadata={"model_name": "sf-tiny-clip", "seed": "0"})
    return path


def step_world(out: Path, plan: Plan) -> tuple[Path, Path]:
    """Train-split videos as shards (npy) and the train captions as a prompt file."""
    from sf.world.scenes import caption, make_scene, write_world_shards

    shards = out / "world" / "train"
    if not (shards / "DONE").exists():
        shutil.rmtree(shards, ignore_errors=True)
        write_world_shards(str(shards), "train", plan.num_videos, seed=0, samples_per_shard=128)
        (shards / "DONE").write_text(f"{plan.num_videos}\n")
    prompts = out / "train_prompts.txt"
    if not prompts.exists():
        captions = [caption(make_scene(0, "train", i)) for i in range(plan.num_prompts)]
        prompts.write_text("\n".join(captions) + "\n")
    return shards, prompts


def step_latents(out: Path, vae: Path, shards: Path) -> Path:
    """The train videos encoded by the trained VAE (normalised latents, fp16) into latent shards."""
    from sf.data.latents import cache_latents
    from sf.models.vae import load_codec

    latents = out / "latents"
    if not (latents / "DONE").exists():
        shutil.rmtree(latents, ignore_errors=True)
        result = cache_latents(str(shards), load_codec(vae).eval(), str(latents), batch_size=4)
        (latents / "DONE").write_text(json.dumps(result._asdict()) + "\n")
    return latents


def world_latents(out: Path, vae: Path | None = None, num_videos: int = Plan.num_videos) -> Path:
    """The world's train videos encoded by `vae` (default: the shipped one) into latent shards, built once into
    out/latents: what world_teacher, world_tf and world_df read."""
    from sf.world import ASSETS

    vae = Path(vae or ASSETS / "vae.safetensors")
    made = out / "latents_made_from.json"  # what an earlier call built them from: rebuilt when it differs
    record = {"num_videos": num_videos, "vae": str(vae.resolve()), "vae_bytes": vae.stat().st_size}
    if not made.exists() or json.loads(made.read_text()) != record:
        shutil.rmtree(out / "world" / "train", ignore_errors=True)
        shutil.rmtree(out / "latents", ignore_errors=True)
    shards, _ = step_world(out, Plan(num_videos=num_videos))
    latents = step_latents(out, vae, shards)
    made.write_text(json.dumps(record) + "\n")
    return latents


def step_classifier(out: Path, plan: Plan) -> Path:
    path = out / "classifier.safetensors"
    if not path.exists():
        cmd = [sys.executable, "-m", "sf.world.fvd", "train", "--out", str(path)]
        if plan.classifier_steps is not None:
            cmd += ["--steps", str(plan.classifier_steps)]
        run(cmd, out / "runs" / "classifier" / "train.log")
    return path


def build(out: Path, plan: Plan) -> dict[str, Path]:
    """Every asset, in dependency order; returns name -> file."""
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}

    def timed(name, fn, *args):
        start = time.perf_counter()
        result = fn(*args)
        timings[name] = round(time.perf_counter() - start, 1)
        print(f"[assets] {name}: {timings[name]} s", flush=True)
        return result

    text = timed("text_encoder", step_text_encoder, out)
    shards, prompts = timed("world", step_world, out, plan)
    common = [f"text.pretrained={text}"]

    vae = out / "vae.safetensors"
    if not vae.exists():
        export = timed("vae", train, "vae", "world_vae", out, [f"data.shards={shards}"], plan.vae_steps, plan)
        shutil.copy(export / "vae.safetensors", vae)
    latents = timed("latents", step_latents, out, vae, shards)

    teacher = out / "teacher.safetensors"
    if not teacher.exists():
        export = timed("teacher", train, "teacher", "world_teacher", out,
                       [*common, f"data.shards={latents}", f"codec.checkpoint={vae}"], plan.teacher_steps, plan)
        shutil.copy(export / "teacher_ema.safetensors", teacher)

    ode_init = out / "ode_init.safetensors"
    if not ode_init.exists():
        overrides = [*common, f"data.shards={prompts}", f"codec.checkpoint={vae}", f"teacher.checkpoint={teacher}"]
        if plan.ode_pairs is not None:
            overrides.append(f"task.num_pairs={plan.ode_pairs}")
        if plan.ode_teacher_steps is not None:
            overrides.append(f"task.num_steps={plan.ode_teacher_steps}")
        export = timed("ode_init", train, "ode", "world_ode", out, overrides, plan.ode_steps, plan)
        shutil.copy(export / "generator_ema.safetensors", ode_init)

    classifier = timed("classifier", step_classifier, out, plan)
    (out / "timings.json").write_text(json.dumps(timings, indent=1) + "\n")
    return {"text_encoder": text, "train_prompts": prompts, "vae": vae, "teacher": teacher, "ode_init": ode_init,
            "classifier": classifier}


def provenance(out: Path, name: str) -> dict:
    """The command, resolved config and final metrics of the run that produced asset `name`."""
    from sf.checkpoint import latest_checkpoint
    from sf.logging import read_metrics

    run_name = {"vae": "vae", "teacher": "teacher", "ode_init": "ode"}.get(name)
    if run_name is None:
        log = out / "runs" / name / "train.log"
        return {"log_tail": log.read_text().strip().splitlines()[-3:] if log.exists() else []}
    run_dir = out / "runs" / run_name
    checkpoint = latest_checkpoint(run_dir)
    metrics = read_metrics(run_dir / "metrics.jsonl")
    per_step = {m.get("step"): m for m in metrics}  # a resumed run logs the steps after its checkpoint twice
    return {
        "command": "sf-train " + (run_dir / "command.txt").read_text().strip().split(" ", 2)[-1],
        "steps": metrics[-1].get("step") if metrics else None,
        # the run's time in training steps, summed over the invocations of a resumed run (a build's own wall time,
        # build/.../timings.json, covers only what that invocation did)
        "step_seconds": round(sum(m.get("time/step_s", 0.0) for m in per_step.values()), 1),
        "final_metrics": metrics[-1] if metrics else {},
        "config_yaml": (checkpoint / "config.yaml").read_text() if checkpoint else None,
    }


def install(out: Path, assets: dict[str, Path], target: Path) -> None:
    """Copy the assets into `target` with a <name>.json provenance record each."""
    target.mkdir(parents=True, exist_ok=True)
    for name, path in assets.items():
        shutil.copy(path, target / path.name)
        if name != "train_prompts":
            record = {"file": path.name, "bytes": path.stat().st_size, **provenance(out, name)}
            (target / f"{name}.json").write_text(json.dumps(record, indent=1) + "\n")
    print(f"[assets] installed {len(assets)} assets into {target}", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m eval.assets", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    parser.add_argument("--out", type=Path, default=ROOT / "build" / "assets", help="work dir (resumable)")
    parser.add_argument("--install", type=Path, default=None, help="copy the results here (e.g. sf/assets/world)")
    parser.add_argument("--quick", action="store_true", help="a shortened run of every recipe (minutes; tests)")
    parser.add_argument("--latents-only", action="store_true",
                        help="only the train videos' latent shards, encoded by the shipped VAE, into --out/latents "
                             "(the data of experiment=world_tf / world_df)")
    parser.add_argument("--num-videos", type=int, default=Plan.num_videos, help="train videos (--latents-only)")
    args = parser.parse_args(argv)
    if args.latents_only:
        print(world_latents(args.out, num_videos=args.num_videos))
        return
    assets = build(args.out, QUICK if args.quick else Plan())
    if args.install is not None:
        install(args.out, assets, args.install)
    for name, path in assets.items():
        print(f"{name:14s} {path}")


if __name__ == "__main__":
    main()
