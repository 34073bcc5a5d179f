"""Run logging: metrics.jsonl always, wandb on rank 0 (online/offline/disabled), sample videos, a progress bar,
and status lines.

Every rank gets a logger with the same methods; only rank 0's does anything, so the training loop has no
`if rank == 0` or `if wandb` branches. metrics.jsonl is flushed line by line, and on resume it is cut back to
the resumed step, so a run killed after logging past its last checkpoint has no duplicated steps.

Messages go through Python `logging` ("sf"): on rank 0 to stdout as ``[sf] ...`` and, with the time, into
``<run dir>/train.log``. Every `logger.status_every_s` seconds a status line (step, losses, s/step, ETA, peak
memory) goes to train.log, and to stdout too when there is no progress bar (a job's log file, not a terminal).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import secrets
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

WANDB_RUN_ID_FILE = "wandb_run_id.txt"
LOG_FILE = "train.log"
log = logging.getLogger("sf")


@dataclass
class LoggerConfig:
    """Where metrics and samples go."""

    backend: str = field(default="jsonl", metadata={"choices": ("jsonl", "wandb")})  # metrics.jsonl either way
    project: str = "sf"
    entity: Optional[str] = None
    # online | offline | disabled; WANDB_MODE in the environment wins
    mode: str = field(default="offline", metadata={"choices": ("online", "offline", "disabled")})
    group: Optional[str] = None
    job_type: Optional[str] = None  # the role of the run; default: the task's name (distill, teacher, ode, vae)
    tags: list = field(default_factory=list)
    name: Optional[str] = None
    log_every: int = field(default=1, metadata={"min": 1})
    video_every: int = field(default=0, metadata={"min": 0})  # 0: never
    video_fps: int = field(default=8, metadata={"min": 1})
    progress: bool = True
    status_every_s: float = field(default=30.0, metadata={"min": 0})  # a status line this often (0: every step)


def wandb_login_problem(cfg: LoggerConfig) -> str | None:
    """Why an online wandb run would stop at `wandb.init` for want of credentials (found before any weights
    load, not after), or None: WANDB_API_KEY, or a netrc entry for the server (where `wandb login` writes)."""
    import netrc
    from urllib.parse import urlparse

    mode = os.environ.get("WANDB_MODE", cfg.mode)
    if cfg.backend != "wandb" or mode != "online" or os.environ.get("WANDB_API_KEY"):
        return None
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    file = Path(os.environ.get("NETRC", "~/.netrc")).expanduser()
    try:
        if netrc.netrc(str(file)).authenticators(host):
            return None
    except (OSError, netrc.NetrcParseError):
        pass
    return (f"logger: wandb is online but has no credentials for {host} (no WANDB_API_KEY, nothing in {file}): "
            f"run `wandb login`, or log offline with logger.mode=offline and `wandb sync` later")


class NullLogger:
    """The logger of ranks other than 0: every method does nothing."""

    def log(self, step: int, metrics: dict) -> None:
        pass

    def log_video(self, step: int, key: str, video, caption: str | None = None) -> Path | None:
        return None

    def summary(self, values: dict) -> None:
        pass

    def finish(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.finish()


class RunLogger(NullLogger):
    """Rank 0: metrics.jsonl, optional wandb, videos under run_dir/samples, a tqdm bar."""

    def __init__(self, cfg: LoggerConfig, run_dir: Path, config: dict, total_steps: int, start_step: int = 0):
        if cfg.backend not in ("jsonl", "wandb"):
            raise ValueError(f"logger.backend must be 'jsonl' or 'wandb', got {cfg.backend!r}")
        self.cfg, self.run_dir = cfg, Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.run_dir / "metrics.jsonl"
        truncate_metrics(self.metrics_path, start_step)
        self._file = self.metrics_path.open("a")
        self.wandb = self._init_wandb(config) if cfg.backend == "wandb" else None
        self.wandb_logged_through = 0
        if self.wandb is not None and start_step:
            self._catch_up_wandb(start_step)
        self.bar = None
        if cfg.progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", dynamic_ncols=True,
                            disable=None, mininterval=1.0)
        self.total_steps, self.start_step = total_steps, start_step
        self._started, self._last_status = time.monotonic(), None

    def _init_wandb(self, config: dict):
        import wandb

        id_file = self.run_dir / WANDB_RUN_ID_FILE
        run_id = id_file.read_text().strip() if id_file.exists() else secrets.token_hex(4)
        id_file.write_text(run_id)
        mode = os.environ.get("WANDB_MODE", self.cfg.mode)
        return wandb.init(
            project=self.cfg.project, entity=self.cfg.entity, mode=mode, dir=str(self.run_dir), config=config,
            group=self.cfg.group, job_type=self.cfg.job_type, tags=list(self.cfg.tags) or None, name=self.cfg.name,
            id=run_id, resume="allow",
        )

    def _catch_up_wandb(self, start_step: int) -> None:
        """Make the resumed wandb run hold every step exactly once.

        metrics.jsonl (flushed per line) is the record of what happened. Rows an earlier, killed process never
        got into wandb are sent now; steps wandb already has are not sent again, also after the checkpoint:
        the resumed run reproduces them exactly.
        """
        self.wandb_logged_through = self._previously_logged()
        for row in read_metrics(self.metrics_path):
            if self.wandb_logged_through < row["step"] <= start_step:
                self.wandb.log({k: v for k, v in row.items() if k != "step"}, step=int(row["step"]))

    def _previously_logged(self) -> int:
        """The last step in this run's earlier offline wandb files (online runs drop old steps themselves)."""
        run_id = self.wandb.id
        files = [f for f in self.run_dir.glob(f"wandb/offline-run-*-{run_id}/run-{run_id}.wandb")
                 if Path(self.wandb.dir).parent != f.parent]
        steps = [row.get("_step", 0) for f in files for row in read_wandb_history(f)]
        return int(max(steps, default=0))

    def log(self, step: int, metrics: dict) -> None:
        """One line of metrics.jsonl (and one wandb history row) for `step`."""
        row = {"step": int(step), **{k: _scalar(v) for k, v in metrics.items()}}
        if step % max(1, self.cfg.log_every) == 0:
            self._file.write(json.dumps(row) + "\n")
            self._file.flush()
            if self.wandb is not None and step > self.wandb_logged_through:
                self.wandb.log({k: v for k, v in row.items() if k != "step"}, step=int(step))
        if self.bar is not None:
            self.bar.update(int(step) - self.bar.n)
            shown = {k.split("/")[-1]: f"{v:.4g}" for k, v in row.items() if k.startswith("loss/")}
            self.bar.set_postfix(shown, refresh=False)
        now = time.monotonic()
        last = step == self.total_steps or step == self.start_step + 1
        if last or self._last_status is None or now - self._last_status >= self.cfg.status_every_s:
            self._last_status = now
            bar_shown = self.bar is not None and not self.bar.disable
            log.info(status_line(row, self.total_steps, (now - self._started) / (step - self.start_step)),
                     extra={"console": not bar_shown})

    def log_video(self, step: int, key: str, video, caption: str | None = None) -> Path:
        """Write run_dir/samples/{key}_{step}.mp4 and log it to wandb."""
        from sf.video import save_video

        path = save_video(video, self.run_dir / "samples" / f"{key}_{step:06d}.mp4", fps=self.cfg.video_fps)
        if self.wandb is not None and step > self.wandb_logged_through:
            import wandb

            self.wandb.log({key: wandb.Video(str(path), caption=caption, format="mp4")}, step=int(step))
        return path

    def summary(self, values: dict) -> None:
        if self.wandb is not None:
            for k, v in values.items():
                self.wandb.summary[k] = v

    def finish(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if not self._file.closed:
            self._file.close()
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None


def status_line(row: dict, total_steps: int, seconds_per_step: float) -> str:
    """'step 12/1000 | loss/critic 2.31 loss/generator 0.0123 | 0.45 s/step | ETA 7m24s | peak mem 1.21 GB'."""
    step = int(row["step"])
    losses = " ".join(f"{k} {v:.4g}" for k, v in sorted(row.items()) if k.startswith("loss/"))
    left = max(0, total_steps - step) * seconds_per_step
    eta = f"{int(left // 3600)}h{int(left % 3600 // 60):02d}m" if left >= 3600 else f"{int(left // 60)}m{int(left % 60):02d}s"
    return (f"step {step}/{total_steps} | {losses or 'no loss this step'} | {seconds_per_step:.3g} s/step | "
            f"ETA {eta} | peak mem {peak_memory_gb():.2f} GB")


def peak_memory_gb() -> float:
    """The process's peak memory: the CUDA allocator's on a GPU, the resident set size on a CPU."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kB on Linux


class _ConsoleFilter(logging.Filter):
    """Status lines reach the console only when no progress bar is shown."""

    def filter(self, record: logging.LogRecord) -> bool:
        return getattr(record, "console", True)


def setup_log(run_dir: Path | None, rank: int) -> None:
    """The "sf" logger of this process: rank 0 to stdout ([sf] ...) and to run_dir/train.log; other ranks warnings
    only, to stderr (idempotent: handlers are replaced)."""
    for handler in list(log.handlers):
        log.removeHandler(handler)
        handler.close()
    log.propagate = False
    console = logging.StreamHandler(sys.stdout if rank == 0 else sys.stderr)
    console.setFormatter(logging.Formatter("[sf] %(message)s" if rank == 0 else f"[sf rank {rank}] %(message)s"))
    console.addFilter(_ConsoleFilter())
    log.addHandler(console)
    log.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    if rank == 0 and run_dir is not None:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        file = logging.FileHandler(Path(run_dir) / LOG_FILE)
        file.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S"))
        log.addHandler(file)


def make_logger(cfg: LoggerConfig, run_dir: Path, rank: int, config: Any, total_steps: int, start_step: int = 0):
    """Rank 0's RunLogger, a NullLogger elsewhere."""
    if rank != 0:
        return NullLogger()
    if dataclasses.is_dataclass(config):
        config = json.loads(json.dumps(dataclasses.asdict(config), default=str))
    return RunLogger(cfg, Path(run_dir), config, total_steps, start_step)


def truncate_metrics(path: Path, last_step: int) -> None:
    """Keep the rows with step <= last_step (a resumed run rewrites what came after its checkpoint)."""
    if not path.exists():
        return
    kept = [row for row in read_metrics(path) if row["step"] <= last_step]
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(json.dumps(row) + "\n" for row in kept))
    tmp.replace(path)


def read_metrics(path: Path) -> list[dict]:
    """All complete rows of a metrics.jsonl (a half-written last line is ignored)."""
    rows = []
    for line in Path(path).read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def plot_metrics(path: Path, out_png: Path, keys: list[str] | None = None) -> Path | None:
    """PNG of metrics of a metrics.jsonl against step (default: every loss/*), raw and smoothed, one panel each,
    log-scaled where all values are positive; None when there is nothing to plot."""
    from matplotlib.figure import Figure  # no pyplot: leaves the process's plotting backend alone

    rows = read_metrics(path)
    keys = keys or sorted({k for row in rows for k in row if k.startswith("loss/")})
    if not keys:
        return None
    fig = Figure(figsize=(6.4, 2.6 * len(keys)), dpi=110)
    for ax, key in zip(fig.subplots(len(keys), 1, squeeze=False)[:, 0], keys):
        points = [(row["step"], row[key]) for row in rows if isinstance(row.get(key), (int, float))
                  and math.isfinite(row[key])]
        steps, values = [p[0] for p in points], [float(p[1]) for p in points]
        ax.plot(steps, values, lw=0.8, alpha=0.35, color="C0")
        ax.plot(steps, smooth(values), lw=1.5, color="C0", label=f"{key} (smoothed)")
        if values and min(values) > 0:
            ax.set_yscale("log")
        ax.set_ylabel(key, fontsize=8)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.axes[-1].set_xlabel("step")
    fig.tight_layout()
    Path(out_png).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png)
    return Path(out_png)


def plot_runs(runs: dict[str, Path], keys: list[str], out_png: Path, title: str | None = None) -> Path | None:
    """PNG of `keys` from several runs' metrics.jsonl against step: one panel per key, one line per run (the
    health curves of a run, or of runs side by side); keys no run logged are left out, None when none is left."""
    from matplotlib.figure import Figure

    rows = {label: read_metrics(path) for label, path in runs.items()}
    series = {key: {label: [(r["step"], float(r[key])) for r in run if isinstance(r.get(key), (int, float))
                            and math.isfinite(r[key])] for label, run in rows.items()} for key in keys}
    keys = [key for key in keys if any(series[key].values())]
    if not keys:
        return None
    columns = 2 if len(keys) > 3 else 1
    panel_rows = math.ceil(len(keys) / columns)
    fig = Figure(figsize=(5.2 * columns, 2.3 * panel_rows), dpi=110)
    axes = fig.subplots(panel_rows, columns, squeeze=False).flatten()
    for ax, key in zip(axes, keys):
        for i, (label, points) in enumerate(series[key].items()):
            if points:
                ax.plot(*zip(*points), marker=".", lw=1.4, color=f"C{i}", label=label)
        ax.set_title(key, fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in axes[len(keys):]:
        ax.set_visible(False)
    axes[0].legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    Path(out_png).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png)
    return Path(out_png)


def smooth(values):
    """Trailing moving average over ~5% of the points (partial windows at the start)."""
    import numpy as np

    values = np.asarray(values, dtype=float)
    window = max(1, len(values) // 20)
    sums = np.concatenate([[0.0], np.cumsum(values)])
    starts = np.maximum(np.arange(1, len(values) + 1) - window, 0)
    return (sums[1:] - sums[starts]) / (np.arange(1, len(values) + 1) - starts)


def _scalar(value) -> float:
    return float(value.item() if hasattr(value, "item") else value)


def read_wandb_records(run_file: Path):
    """The protobuf `Record`s of an offline wandb run file (`run-<id>.wandb`), for tests and offline inspection.

    The file is wandb's header (":W&B", magic, version: 7 bytes) followed by LevelDB-log framing (32 KiB blocks;
    each fragment has a 7-byte header: crc32c, little-endian length, type FULL/FIRST/MIDDLE/LAST) around
    protobuf records. A damaged tail (a killed writer) ends the records; what came before it is returned.
    """
    from wandb.proto import wandb_internal_pb2

    data = Path(run_file).read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{run_file}: not a wandb run file")
    block, pos, pending, records = 32768, 7, b"", []
    while pos + 7 <= len(data):
        room = block - pos % block
        if room < 7:  # block trailer padding
            pos += room
            continue
        length = int.from_bytes(data[pos + 4:pos + 6], "little")
        kind = data[pos + 6]
        fragment = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if len(fragment) < length:  # the tail of a file whose writer was killed mid-record
            break
        if kind == 0 and length == 0:
            continue
        pending = fragment if kind in (1, 2) else pending + fragment
        if kind not in (1, 4):  # FIRST or MIDDLE: the record continues
            continue
        record = wandb_internal_pb2.Record()
        try:
            record.ParseFromString(pending)
        except Exception:  # a damaged record (killed writer): what came before it is still good
            break
        records.append(record)
    return records


def read_wandb_history(run_file: Path) -> list[dict]:
    """History rows of an offline wandb run file: history keys to their decoded JSON values (step under `_step`)."""
    return [{"/".join(item.nested_key) or item.key: json.loads(item.value_json) for item in record.history.item}
            for record in read_wandb_records(run_file) if record.WhichOneof("record_type") == "history"]
