"""The embedded world: procedural videos with known truth, the oracle that reads the truth back from pixels,
the world-FVD classifier, the evaluator behind `sf-eval`, and its report.

    scenes    scenes, captions, splits, rendering, shards (`sf-world`)
    oracle    prompt adherence, motion consistency, temporal stability, recovered from decoded pixels
    fvd       the world-FVD classifier: training, features, Frechet distance, its shipped weights
    evaluate  `sf-eval`: generate with exported models, score them (oracle, world-FVD, NFE, drift)
    report    report.json / report.md, plots and side-by-side videos

The shipped weights everything starts from (VAE, teacher, ODE init, text tower, classifier) are in `ASSETS`.
"""

from pathlib import Path

ASSETS = Path(__file__).resolve().parents[1] / "assets" / "world"
