"""The world's part of a distill run's health check: fixed `val` captions and the exact oracle's terms of the
decoded rollouts (`sf.distill.health` has the model-agnostic part)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from sf.world.evaluate import EvalConfig
from sf.world.oracle import drift_vs_horizon, score_videos
from sf.world.scenes import caption, make_scene

DRIFT_WINDOW = EvalConfig.drift_window  # video frames per window of the long rollout, as sf-eval's drift


def health_captions(count: int, split: str = EvalConfig.split, seed: int = EvalConfig.seed) -> list[str]:
    """sf-eval's first `count` evaluation captions of `split` (scenes the run never trained on)."""
    return [caption(make_scene(seed, split, i)) for i in range(count)]


def oracle_terms(videos: np.ndarray, captions: Sequence[str], train_video_frames: int) -> dict[str, float]:
    """uint8 videos (K, T, H, W, 3), each rolled out past the training length (`train_video_frames` frames):
    the oracle's per-video score (its three components' geometric mean; sf-eval's `oracle_score` also has the
    set's fidelity) and components on the training length, and the score of the first and the last whole window."""
    head = score_videos([v[:train_video_frames] for v in videos], list(captions))
    curves = drift_vs_horizon(list(videos), list(captions), window=DRIFT_WINDOW)
    return {"video_score": head["video_score"],
            **{name: head[name] for name in ("prompt_adherence", "motion_consistency", "temporal_stability")},
            "video_score_early": float(curves["video_score"][0]),
            "video_score_late": float(curves["video_score"][-1])}
