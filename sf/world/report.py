"""The report `make demo` writes into its run dir: numbers, plots and side-by-side videos of the evaluated models.

    out_dir/report.json                  the report dict, as given
    out_dir/report.md                    a table of the models, the acceptance checks, links to what follows
    out_dir/plots/losses.png             training losses from metrics.jsonl
    out_dir/plots/metric_vs_step.png     evaluation metrics over training (`history`)
    out_dir/plots/drift_vs_horizon.png   oracle score of long rollouts per horizon (`drift`)
    out_dir/samples/side_by_side.{mp4,gif}  one row per prompt, one column per model

Each plot or video is skipped when its input is None or empty; report.md links only what was written.
`format_table` is the same table as plain text, for the terminal.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from sf.logging import plot_metrics, plot_runs, read_metrics
from sf.video import grid, save_video, side_by_side, to_uint8

MODELS = ("teacher", "ode_init", "student")  # the demo's models, in the order the report shows them
COMPONENT_COLUMNS = {  # component key -> short column name of the terminal table
    "prompt_adherence": "adherence",
    "motion_consistency": "motion",
    "temporal_stability": "stability",
    "fidelity": "fidelity",
}
ORACLE_DEFINITION = (
    "oracle_score = geometric mean of prompt_adherence (colour, shape, size, initial direction and background "
    "recovered from decoded pixels vs the caption), motion_consistency (share of frame-to-frame steps obeying "
    "constant velocity with wall bounces), temporal_stability (claimed objects present at a steady size, no extra "
    "objects) and fidelity = exp(-world-FVD / FVD_SCALE); each component in [0, 1], averaged over the videos.")
GIF_PIXEL_BUDGET = 4_000_000  # frames x height x width of the gif; about one byte each, so a few MB at most
GAP = 2  # black pixels between the tiles of the sample grid


def write_report(
    out_dir,
    report: dict,
    *,
    history: list[dict] | None = None,
    drift: dict[str, list[dict]] | None = None,
    samples: dict[str, np.ndarray] | None = None,
    captions: list[str] | None = None,
    metrics_path=None,
    fps: int = 16,
) -> Path:
    """Write report.json, report.md, the plots and the sample videos into out_dir; returns report.json's path.

    Inputs left as None (or empty) skip their plot or video. A metrics_path that is given must exist.
    """
    if samples and captions is not None:
        num_videos = {len(v) for v in samples.values()}
        if num_videos != {len(captions)}:
            raise ValueError(f"got {len(captions)} captions for samples of {sorted(num_videos)} videos per model")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    written = {}  # name -> path relative to out_dir, for the links of report.md
    if metrics_path is not None:
        from sf.distill.health import PLOT_KEYS

        written["losses"] = plot_metrics(metrics_path, out_dir / "plots" / "losses.png")
        if any(key.startswith("health/") for row in read_metrics(metrics_path) for key in row):  # checks were on
            written["health"] = plot_runs({"student": metrics_path}, PLOT_KEYS, out_dir / "plots" / "health.png",
                                          "the student's health during training (docs/health.md)")
    if history:
        written["metric_vs_step"] = plot_metric_vs_step(history, out_dir / "plots" / "metric_vs_step.png")
    if drift:
        written["drift_vs_horizon"] = plot_drift(drift, out_dir / "plots" / "drift_vs_horizon.png")
    if samples:
        frames = sample_grid(samples)  # (T, H, W, 3)
        written["mp4"] = save_video(frames, out_dir / "samples" / "side_by_side.mp4", fps=fps)
        # the gif keeps every stride-th frame, played slower by as much, so it lasts as long as the mp4
        stride = max(1, math.ceil(frames[..., 0].size / GIF_PIXEL_BUDGET))
        written["gif"] = save_video(frames[::stride], out_dir / "samples" / "side_by_side.gif", fps=fps / stride)
    written = {k: v.relative_to(out_dir).as_posix() for k, v in written.items() if v is not None}

    json_path = out_dir / "report.json"
    json_path.write_text(json.dumps(report, indent=2, default=_jsonable) + "\n")
    sample_models = list(samples) if samples else []
    (out_dir / "report.md").write_text(_markdown(report, written, sample_models, captions))
    return json_path


def format_table(report: dict) -> str:
    """Fixed-width plain-text table of the models, one row each, then the acceptance line if there is one."""
    header = ["model", "oracle", *COMPONENT_COLUMNS.values(), "FVD", "NFE/frame", "s/frame"]
    rows = []
    for name in _models(report):
        result = report[name]
        components = result.get("components", {})
        rows.append([
            name,
            _fmt(result.get("oracle_score"), ".3f", "-"),
            *(_fmt(components.get(key), ".3f", "-") for key in COMPONENT_COLUMNS),
            _fmt(result.get("fvd"), ".1f", "-"),
            _fmt(result.get("nfe_per_frame"), "g", "-"),
            _fmt(result.get("seconds_per_frame"), ".3g", "-"),
        ])
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    # the model name is left-aligned, numbers right-aligned so their digits line up
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
             for row in [header, *rows]]
    lines.insert(1, "-" * len(lines[0]))
    acceptance = report.get("acceptance")
    if acceptance:
        items = [text if ok is None else f"{text} {'ok' if ok else 'FAIL'}"
                 for ok, text in _acceptance_items(acceptance)]
        lines.append(f"acceptance: {_overall(acceptance)}" + "".join(f" | {item}" for item in items))
    return "\n".join(lines)


def sample_grid(samples: dict[str, np.ndarray]) -> np.ndarray:
    """One row per prompt, one column per model, each column labelled with its model; uint8 (T, H, W, 3).

    samples: model name -> uint8 (N, T, H, W, 3), the same N prompts in the same order for every model. Videos
    shorter than the longest hold their last frame.
    """
    if not samples:
        raise ValueError("sample_grid needs the samples of at least one model")
    num_prompts = {name: len(videos) for name, videos in samples.items()}
    if len(set(num_prompts.values())) != 1 or 0 in num_prompts.values():
        raise ValueError(f"every model needs samples of the same, non-zero number of prompts; got {num_prompts}")
    videos = {name: [to_uint8(v) for v in vs] for name, vs in samples.items()}  # each (T, H, W, 3)
    num_frames = max(v.shape[0] for vs in videos.values() for v in vs)
    columns = [grid([_hold_last(v, num_frames) for v in vs], num_cols=1, gap=GAP) for vs in videos.values()]
    return side_by_side(columns, labels=list(videos), gap=GAP)


def plot_metric_vs_step(history: list[dict], out_png: Path) -> Path | None:
    """Evaluation metrics against training step, one line each; scores in [0, 1] and others (FVD) on two panels
    (``step`` and ``num_videos``, how many videos a row scored, are not plotted)."""
    keys = list(dict.fromkeys(k for row in history for k, v in row.items()
                              if k not in ("step", "num_videos") and _finite(v)))
    if not keys:
        return None
    series = {k: [(row["step"], row[k]) for row in history if _finite(row.get(k))] for k in keys}
    scores = [k for k in keys if all(0.0 <= v <= 1.0 for _, v in series[k])]
    panels = [group for group in (scores, [k for k in keys if k not in scores]) if group]
    fig, axes = _figure(len(panels))
    for ax, group in zip(axes, panels):
        for key in group:
            steps, values = zip(*sorted(series[key]))
            ax.plot(steps, values, marker=".", lw=1.2 if key != "oracle_score" else 2.2, label=key)
        ax.set_ylabel("score" if group is scores else "value", fontsize=8)
        ax.legend(fontsize=7)
    axes[-1].set_xlabel("training step")
    return _save(fig, out_png)


def plot_drift(drift: dict[str, list[dict]], out_png: Path) -> Path | None:
    """The oracle's video_score of each window against rollout horizon (frames), one line per model; None if no
    model has a point."""
    curves = {
        name: sorted((p["horizon_frames"], p["video_score"]) for p in points if _finite(p.get("video_score")))
        for name, points in drift.items()
    }
    curves = {name: points for name, points in curves.items() if points}
    if not curves:
        return None
    fig, (ax,) = _figure(1)
    for name, points in curves.items():
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=name)
    ax.set_xlabel("horizon (frames generated so far)")
    ax.set_ylabel("video_score (per window)")
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=8)
    return _save(fig, out_png)


# ------------------------------------------------------------------------------------------------- markdown


def _markdown(report: dict, written: dict[str, str], sample_models: list[str], captions: list[str] | None) -> str:
    """report.md: what was compared, the table, the acceptance checks, how the score is defined, plots, videos."""
    models = _models(report)
    lines = [
        "# Self-forcing demo report",
        "",
        ("A video diffusion *teacher* was distilled into a causal few-step *student*: first by regression on the "
        "teacher's ODE trajectories (*ode_init*), then by self forcing. Each model generated videos from the same "
        "evaluation captions (the world's `val` split unless sf-eval was told another: scenes never trained "
        "on), scored below. All numbers are also in [report.json](report.json)."),
        "",
        "## Results",
        "",
    ]
    lines += _results_table(report, models) if models else ["No model results in this report."]
    lines += [
        "",
        ("Columns: oracle score and its components in [0, 1], higher is better; FVD (Fréchet video distance to "
        "real videos), lower is better; NFE/frame, network evaluations per generated frame; s/frame, wall-clock "
        "seconds per generated frame; videos, how many videos were scored."),
    ]
    acceptance = report.get("acceptance")
    if acceptance:
        mark = {"PASSED": " ✓", "FAILED": " ✗"}.get(_overall(acceptance), "")
        lines += ["", "## Acceptance", "", f"**Acceptance: {_overall(acceptance)}{mark}**", ""]
        lines += [f"- {text}" if ok is None else f"- {'✓' if ok else '✗'} {text}"
                  for ok, text in _acceptance_items(acceptance)]
    lines += ["", "## How the oracle score is defined", "", report.get("oracle_definition", ORACLE_DEFINITION)]

    plots = {"losses": "Training losses (light: raw; dark: smoothed)",
             "health": "The student's health checks during training",
             "metric_vs_step": "Evaluation metrics over training",
             "drift_vs_horizon": "Oracle score of long rollouts against horizon (drift)"}
    if any(key in written for key in plots):
        lines += ["", "## Plots"]
        for key, title in plots.items():
            if key in written:
                lines += ["", f"{title}: [{written[key]}]({written[key]})", "", f"![{key}]({written[key]})"]
    if "mp4" in written:
        lines += ["", "## Samples", "",
                  f"Columns, left to right: {', '.join(sample_models)}. Rows, top to bottom: one caption each.", "",
                  f"[{written['mp4']}]({written['mp4']}) · [{written['gif']}]({written['gif']})", "",
                  f"![side by side]({written['gif']})"]
        if captions:
            lines += [""] + [f"{i}. {caption}" for i, caption in enumerate(captions, start=1)]
    commands = report.get("commands")
    if commands:
        commands = [commands] if isinstance(commands, str) else list(commands)
        lines += ["", "## Reproduce", "", "```sh", *map(str, commands), "```"]
    return "\n".join(lines) + "\n"


def _results_table(report: dict, models: list[str]) -> list[str]:
    """Markdown table rows: one per model, a column per component found in any model."""
    components = list(dict.fromkeys(k for name in models for k in report[name].get("components", {})))
    header = ["model", "oracle score", *(c.replace("_", " ") for c in components),
              "FVD ↓", "NFE/frame", "s/frame", "videos"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name in models:
        result = report[name]
        cells = [
            f"`{name}`",
            f"**{_fmt(result.get('oracle_score'), '.3f')}**",
            *(_fmt(result.get("components", {}).get(c), ".3f") for c in components),
            _fmt(result.get("fvd"), ".1f"),
            _fmt(result.get("nfe_per_frame"), "g"),
            _fmt(result.get("seconds_per_frame"), ".3g"),
            _fmt(result.get("num_videos"), "d"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _acceptance_items(acceptance: dict) -> list[tuple[bool | None, str]]:
    """(passed or None for information, text) per acceptance entry; `passed` itself is `_overall`'s."""
    items = []
    ratio, target = acceptance.get("student_vs_teacher"), acceptance.get("target")
    if ratio is not None:
        text = f"student oracle score / teacher oracle score = {_fmt(ratio, '.3f')}"
        if target is not None:
            text = f"{text} (target ≥ {_fmt(target, '.3f')})"
        items.append((None if target is None else ratio >= target, text))
    for key, value in acceptance.items():
        if key in ("passed", "student_vs_teacher", "target"):
            continue
        if key == "nfe_reduction":
            items.append((None, f"NFE reduction (teacher NFE/frame ÷ student NFE/frame) = {_fmt(value, '.3g')}×"))
        elif key == "beats_ode_init":
            items.append((bool(value), "student scores above ode_init"))
        elif isinstance(value, bool):
            items.append((value, key.replace("_", " ")))
        else:
            items.append((None, f"{key.replace('_', ' ')} = {_fmt(value, '.3g')}"))
    return items


def _overall(acceptance: dict) -> str:
    """PASSED, FAILED, or "not decided" when the acceptance dict has no `passed`."""
    if "passed" not in acceptance:
        return "not decided"
    return "PASSED" if acceptance["passed"] else "FAILED"


# ---------------------------------------------------------------------------------------------------- helpers


def _models(report: dict) -> list[str]:
    """The demo's models present in the report, then any other entry that holds an oracle score."""
    extra = [k for k, v in report.items() if k not in MODELS and isinstance(v, dict) and "oracle_score" in v]
    return [m for m in MODELS if isinstance(report.get(m), dict)] + extra


def _fmt(value, spec: str, missing: str = "–") -> str:
    """A number formatted by `spec`; `missing` for None, the value as text for what is not a number."""
    if value is None:
        return missing
    if isinstance(value, (bool, str)):
        return str(value)
    try:
        return format(int(value) if spec == "d" else float(value), spec)
    except (TypeError, ValueError):
        return str(value)


def _finite(value) -> bool:
    return isinstance(value, (int, float, np.number)) and not isinstance(value, bool) and math.isfinite(value)


def _hold_last(video: np.ndarray, num_frames: int) -> np.ndarray:
    """Pad (T, H, W, 3) to num_frames by repeating its last frame."""
    missing = num_frames - video.shape[0]
    return np.concatenate([video, np.repeat(video[-1:], missing, axis=0)]) if missing else video


def _figure(num_panels: int):
    # no pyplot: leaves the process's plotting backend alone
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 2.6 * num_panels), dpi=110)
    axes = fig.subplots(num_panels, 1, squeeze=False)[:, 0]
    for ax in axes:
        ax.grid(alpha=0.3)
    return fig, axes


def _save(fig, out_png: Path) -> Path:
    fig.tight_layout()
    Path(out_png).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png)
    return Path(out_png)


def _jsonable(value):
    """json.dumps fallback: numpy scalars and arrays, paths."""
    if isinstance(value, (np.generic, np.ndarray)):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"report values must be JSON-able; got {type(value).__name__}")
