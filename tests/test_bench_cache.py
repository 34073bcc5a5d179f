"""The cache benchmark runs end to end and writes its figures (its timing targets live in docs/benchmarks.md)."""

import json

from eval.bench_cache import main


def test_bench_cache_writes_json_and_plot(tmp_path):
    summary = main(["--flavor", "debug", "--chunks", "5", "--recompute-chunks", "4", "--repeats", "1",
                    "--latent-hw", "4", "4", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "bench_cache_debug.json").read_text())
    assert saved["ms_per_chunk"]["kv"] and len(saved["ms_per_chunk"]["rolling"]) == 5
    assert len(saved["ms_per_chunk"]["recompute"]) == 4
    assert summary["recompute_over_kv_at_chunk4"] > 0
    assert (tmp_path / "bench_cache_debug.png").stat().st_size > 1000
