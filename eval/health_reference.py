"""Reference health curves: a healthy world run against deliberately broken ones, for docs/health.md.

    python -m eval.health_reference --out outputs/health        # runs what is missing, then plots
    python -m eval.health_reference --out outputs/health --plot-only

Runs (each an `sf-train` run dir under --out, reused when it finished): `sf` (experiment=world_sf as is),
`sf_critic_lr_x100` (the same with the critic's learning rate 100x too high) and, given latent shards of the
world's train videos (--latents, from `python -m eval.assets --latents-only`), `tf` and `df` (world_tf,
world_df). The figure overlays their `health/*` curves (sf.distill.health.PLOT_KEYS).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

RUNS = {
    "sf": ["experiment=world_sf"],
    "sf_critic_lr_x100": ["experiment=world_sf", "task.optim.critic.lr=1.0e-2"],
    "tf": ["experiment=world_tf"],
    "df": ["experiment=world_df"],
}


def finished(run_dir: Path) -> bool:
    from sf.checkpoint import latest_checkpoint

    return (run_dir / "metrics.jsonl").exists() and latest_checkpoint(run_dir) is not None and \
        latest_checkpoint(run_dir).name == "step_000120"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m eval.health_reference", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    parser.add_argument("--out", type=Path, default=Path("outputs/health"), help="where the run dirs go")
    parser.add_argument("--latents", type=Path, default=None, help="world latent shards: also run world_tf/df")
    parser.add_argument("--figure", type=Path, default=Path("docs/figures/health_reference.png"))
    parser.add_argument("--plot-only", action="store_true", help="plot the runs that are there, train nothing")
    args = parser.parse_args(argv)
    from sf.distill.health import PLOT_KEYS
    from sf.logging import plot_runs

    names = [n for n in RUNS if n.startswith("sf") or args.latents is not None or
             (args.plot_only and (args.out / n).is_dir())]
    for name in names:
        run_dir = args.out / name
        if args.plot_only or finished(run_dir):
            continue
        data = [f"data.shards={args.latents}"] if name in ("tf", "df") else []
        print(f"[health] training {name} into {run_dir}", flush=True)
        subprocess.run([sys.executable, "-m", "sf.train", *RUNS[name], *data, f"hydra.run.dir={run_dir}",
                        "logger.progress=false"], check=True)
    runs = {name: args.out / name / "metrics.jsonl" for name in names if (args.out / name / "metrics.jsonl").exists()}
    path = plot_runs(runs, PLOT_KEYS, args.figure, "health checks of world runs (every 20 steps, 4 val captions)")
    print(path)


if __name__ == "__main__":
    main()
