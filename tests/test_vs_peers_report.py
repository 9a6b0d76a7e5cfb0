"""The side-by-side report (bench/peers/report.py): rows from each run's result and nvidia-smi files, startup from
launch to the first step's end, and the goals' ratios against the fastest and the lowest-peak peer."""
from __future__ import annotations

import json

from bench.peers import report


def _run(raw, name, step, peak, t0=1000.0, first_end=1060.0, knob="k"):
    (raw / f"{name}.result.json").write_text(json.dumps(
        {"knob": knob, "steps": 7, "step_s": [step] * 6, "step_s_median": step, "first_step_end_unix": first_end}))
    (raw / f"{name}.smi.json").write_text(json.dumps({"peak_gb": peak, "t0_unix": t0, "rc": 0}))


def test_ratios_and_goals(tmp_path):
    (tmp_path / "meta.json").write_text(json.dumps({"device": "X", "steps": 7, "gpus": ["0"]}))
    _run(tmp_path, "trl_A", 3.6, 11.4, first_end=1085)
    _run(tmp_path, "unsloth_A", 2.0, 10.0, first_end=1150)
    _run(tmp_path, "unsloth_tuned_A", 2.2, 7.0, first_end=1140)
    _run(tmp_path, "ours_fast_A", 1.1, 6.5, first_end=1050)
    _run(tmp_path, "ours_small_A", 2.0, 3.4, first_end=1070)
    res = report.build(tmp_path, tmp_path / "vs.json")
    a = res["configs"][0]
    assert set(a["systems"]) == {"trl", "unsloth", "unsloth_tuned", "ours_fast", "ours_small"}
    assert a["systems"]["unsloth"]["startup_s"] == 150.0
    r = a["ratios"]
    assert r["fastest_peer"] == "unsloth" and r["lowest_peak_peer"] == "unsloth_tuned"
    assert abs(r["fast_step_over_fastest_peer"] - 0.55) < 1e-9 and r["goal_fast"]
    assert abs(r["small_peak_over_lowest_peer_peak"] - 3.4 / 7.0) < 1e-9 and r["goal_small"]
    assert abs(r["ours_small_startup_over_unsloth"] - 70 / 150) < 1e-9 and r["goal_startup"]
    _run(tmp_path, "ours_small_A", 2.1, 3.4)  # slower than the fastest peer: the small goal fails
    assert not report.build(tmp_path, tmp_path / "vs.json")["configs"][0]["ratios"]["goal_small"]
    assert res["configs"][1]["systems"] == {}  # config B did not run: no rows, no ratios


def test_the_results_file_is_named_for_the_card_it_ran_on():
    # issue 26 asks for bench/results/vs_peers_h200.json; the H100 sitting's file keeps its name
    from bench.vs_peers import card_slug

    assert card_slug("NVIDIA H200") == "h200" and card_slug("NVIDIA H100 80GB HBM3") == "h100"
    assert card_slug("Tesla T4") == "t4" and card_slug("NVIDIA A100-SXM4-80GB") == "a100"


def test_the_cold_start_clears_our_compile_cache(monkeypatch, tmp_path):
    # issue 26's cold start is a machine's first run: the caches are cleared before each system's first run, and
    # since 2026-12-06 ours keeps its compiled layers in a home directory (trainer/compile_cache.py), not /tmp
    from pathlib import Path

    from bench import vs_peers
    from trainer import compile_cache

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    ours = compile_cache.default_dir()
    cleared = [Path(c).expanduser() for c in vs_peers.CACHES]
    assert any(ours == c or c in ours.parents for c in cleared), (ours, cleared)
