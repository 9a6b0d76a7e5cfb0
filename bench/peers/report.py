"""Turns the side-by-side runs (bench/vs_peers.py) into bench/results/vs_peers_h100.json and a PNG plot.

    python bench/peers/report.py RAW_DIR OUT.json [PLOT.png]
vs_peers.json follows ../shared/DESIGN.md: configs[].systems.{trl, unsloth, unsloth_tuned, ours_fast, ours_small}
each with step_s_median, peak_gb (nvidia-smi, GB = 1e9 bytes), startup_s (launch to the end of step 1) and knob;
plus the ratios the goals name and, for ours, the per-step breakdown.
"""
from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

PEERS = ("trl", "unsloth", "unsloth_tuned")
OURS = ("ours_fast", "ours_small", "ours_fast_eager", "ours_small_bnb")  # the last two: same-sitting A/B of a lever
ROLLOUT_GOAL_S = {"A": 0.8, "B": 2.4}  # issue 15: rollout phase with the shared nf4 base
CONFIGS = {"A": {"completions": 8, "completion_tokens": 256}, "B": {"completions": 64, "completion_tokens": 512}}
PHASES = ("kv", "rollout", "reward", "recompute", "train", "optimizer", "sync")


def collect_ours(rundir: Path, out: Path, system: str, knob: str) -> None:
    """Our run's metrics in the peers' result format: gaps between step ends, step 1's end, phase medians."""
    from trainer.metrics import read_metrics
    from trainer.plan import run_plan

    m = read_metrics(rundir) if (rundir / "metrics.jsonl").exists() else []
    ends = [x["unix_time"] for x in m]
    d = [b - a for a, b in zip(ends, ends[1:])]
    plan = run_plan(rundir) or {}
    engine = json.loads((rundir / "engine.json").read_text()) if (rundir / "engine.json").exists() else {}
    after = m[1:]
    res = dict(system=system, knob=knob, steps=len(m), step_s=[round(x, 3) for x in d],
               step_s_median=statistics.median(d) if d else None, first_step_end_unix=ends[0] if ends else None,
               breakdown_s_median={p: statistics.median(x.get(f"time_{p}_s", 0.0) for x in after) for p in PHASES}
               if after else {},
               logp_gap_mean=[x.get("logp_gap_mean") for x in m], completion_length=[x["completion_length_mean"] for x in m],
               sync_ms_median=statistics.median(x.get("sync_ms", 0.0) for x in after) if after else None,
               planned_peak_gb=plan.get("peak_bytes", 0) / 1e9, budget_gb=(plan.get("budget_bytes") or 0) / 1e9,
               plan={k: plan.get(k) for k in ("weight_format", "kv_release", "micro_batch_tokens", "gradient_checkpointing",
                                              "kv_cache_memory_bytes", "max_num_seqs", "cudagraph_capture_sizes")},
               engine_startup_s=engine.get("startup_s"), base_copies=engine.get("base_copies"))
    out.write_text(json.dumps(res, indent=1))


def _row(raw: Path, name: str) -> dict | None:
    res, smi = raw / f"{name}.result.json", raw / f"{name}.smi.json"
    if not res.exists() or not smi.exists():
        return None
    r, s = json.loads(res.read_text()), json.loads(smi.read_text())
    row = {"step_s_median": r.get("step_s_median"), "peak_gb": s["peak_gb"], "knob": r["knob"],
           "startup_s": r["first_step_end_unix"] - s["t0_unix"] if r.get("first_step_end_unix") else None,
           "steps": r["steps"], "step_s": r["step_s"], "rc": s["rc"]}
    for k in ("breakdown_s_median", "planned_peak_gb", "budget_gb", "plan", "engine_startup_s", "sync_ms_median",
              "logp_gap_mean", "load_s", "base_copies"):
        if k in r:
            row[k] = r[k]
    return row if row["step_s_median"] else None


def _ratios(systems: dict) -> dict:
    peers = {k: v for k, v in systems.items() if k in PEERS}
    if not peers:
        return {}
    fastest = min(peers, key=lambda k: peers[k]["step_s_median"])
    lowest = min(peers, key=lambda k: peers[k]["peak_gb"])
    out = {"fastest_peer": fastest, "lowest_peak_peer": lowest}
    f, s, u = systems.get("ours_fast"), systems.get("ours_small"), systems.get("unsloth")
    if f:
        out["fast_step_over_fastest_peer"] = f["step_s_median"] / peers[fastest]["step_s_median"]
        out["fast_peak_over_lowest_peer_peak"] = f["peak_gb"] / peers[lowest]["peak_gb"]
        out["goal_fast"] = out["fast_step_over_fastest_peer"] <= 0.6 and out["fast_peak_over_lowest_peer_peak"] <= 1.0
    if s:
        out["small_peak_over_lowest_peer_peak"] = s["peak_gb"] / peers[lowest]["peak_gb"]
        out["small_step_over_fastest_peer"] = s["step_s_median"] / peers[fastest]["step_s_median"]
        out["goal_small"] = out["small_peak_over_lowest_peer_peak"] <= 0.5 and out["small_step_over_fastest_peer"] <= 1.0
    if u and u.get("startup_s"):
        for k in ("ours_fast", "ours_small"):
            if systems.get(k) and systems[k].get("startup_s"):
                out[f"{k}_startup_over_unsloth"] = systems[k]["startup_s"] / u["startup_s"]
        out["goal_startup"] = all(out.get(f"{k}_startup_over_unsloth", 9) <= 0.5 for k in ("ours_fast", "ours_small"))
    for ab, base in (("ours_fast_eager", "ours_fast"), ("ours_small_bnb", "ours_small")):
        if systems.get(ab) and systems.get(base):
            out[f"{base}_step_over_{ab}"] = systems[base]["step_s_median"] / systems[ab]["step_s_median"]
    nf4 = [k for k in ("ours_small", "ours_small_bnb", "ours_fast")
           if systems.get(k) and (systems[k].get("plan") or {}).get("weight_format") == "shared_nf4"
           and systems[k].get("breakdown_s_median")]
    if nf4:
        out["rollout_shared_nf4_s"] = {k: systems[k]["breakdown_s_median"]["rollout"] for k in nf4}
    return out


def build(raw: Path, out: Path, command: str = "python bench/vs_peers.py OUT_DIR") -> dict:
    meta = json.loads((raw / "meta.json").read_text())
    configs = []
    for cfg, c in CONFIGS.items():
        systems = {}
        for sysname in (*PEERS, *OURS):
            row = _row(raw, f"{sysname}_{cfg}")
            if row:
                row["cold_start"] = f"{sysname}_{cfg}" in meta.get("cold_runs", [])
                systems[sysname] = row
        ratios = _ratios(systems)
        if "rollout_shared_nf4_s" in ratios:
            ratios["goal_rollout_shared_nf4"] = min(ratios["rollout_shared_nf4_s"].values()) <= ROLLOUT_GOAL_S[cfg]
        configs.append({"name": cfg, **c, "systems": systems, "ratios": ratios})
    res = {"device": meta.get("device"), "command": command, "steps_per_run": meta.get("steps"),
           "fast_budget_gb": meta.get("fast_budget_gb"), "small_budget_gb": meta.get("small_budget_gb"),
           "cold_runs": meta.get("cold_runs"), "configs": configs}
    out.write_text(json.dumps(res, indent=1))
    return res


def plot(res: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(res["configs"]), figsize=(6 * len(res["configs"]), 4.5))
    colors = {"trl": "tab:blue", "unsloth": "tab:orange", "unsloth_tuned": "tab:red", "ours_fast": "tab:green",
              "ours_small": "tab:olive", "ours_fast_eager": "tab:gray", "ours_small_bnb": "tab:gray"}
    for ax, c in zip(axes, res["configs"]):
        for name, s in c["systems"].items():
            ax.scatter(s["peak_gb"], s["step_s_median"], s=70, color=colors.get(name, "k"), zorder=3)
            knob = s["knob"].split("=")[-1]
            knob = f"budget {knob} GB" if name.startswith("ours") else f"util {knob}"
            ax.annotate(f"{name}\n{knob}", (s["peak_gb"], s["step_s_median"]), fontsize=8,
                        xytext=(6, -4), textcoords="offset points", va="top")
        ax.set_title(f"config {c['name']}: {c['completions']} completions x {c['completion_tokens']} tokens")
        ax.set_xlabel("peak GPU memory, GB (nvidia-smi)")
        ax.set_ylabel("median step, s")
        top = max(s["step_s_median"] for s in c["systems"].values()) if c["systems"] else 1
        right = max(s["peak_gb"] for s in c["systems"].values()) if c["systems"] else 1
        ax.set_xlim(0, right * 1.25)
        ax.set_ylim(0, top * 1.15)
        ax.grid(alpha=0.3)
    fig.suptitle(f"GRPO step time vs peak memory, Qwen2.5-1.5B shape, nf4 + LoRA r16 ({res.get('device')})", fontsize=10)
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def table(res: dict) -> str:
    """The README's table (markdown) from a vs_peers JSON: fastest peer, our fast and small points with their ratios,
    the same-sitting A/Bs, and cold startups against Unsloth's."""
    rows = ["| config | fastest peer (lowest peer peak) | ours, fast: budget = lowest peer peak | ours, small: budget = "
            "half of it | same-sitting A/B | startup vs Unsloth (cold) |", "|---|---|---|---|---|---|"]
    for c in res["configs"]:
        s, r = c["systems"], c["ratios"]
        if not s or "fastest_peer" not in r:
            continue
        fp, lp = s[r["fastest_peer"]], s[r["lowest_peak_peer"]]
        cell = lambda k: (f"{s[k]['step_s_median']:.2f} s ({s[k]['step_s_median'] / fp['step_s_median']:.2f}x), "  # noqa: E731
                          f"{s[k]['peak_gb']:.2f} GB ({s[k]['peak_gb'] / lp['peak_gb']:.2f}x)") if k in s else "-"
        ab = []
        if "ours_fast_eager" in s:
            ab.append(f"compiled layers {s['ours_fast']['step_s_median']:.2f} s vs eager "
                      f"{s['ours_fast_eager']['step_s_median']:.2f} s")
        if "ours_small_bnb" in s and (s["ours_small"].get("plan") or {}).get("weight_format") == "shared_nf4":
            ab.append(f"fused nf4 GEMM rollout {s['ours_small']['breakdown_s_median']['rollout']:.2f} s vs bitsandbytes "
                      f"{s['ours_small_bnb']['breakdown_s_median']['rollout']:.2f} s")
        cold = [f"{k} {s[k]['startup_s']:.0f} s / {s['unsloth']['startup_s']:.0f} s = {s[k]['startup_s'] / s['unsloth']['startup_s']:.3f}x" for k in ("ours_fast", "ours_small")
                if k in s and "unsloth" in s and s[k].get("cold_start") and s["unsloth"].get("cold_start")]
        rows.append(f"| {c['name']}: {c['completions']} x {c['completion_tokens']} tokens | {r['fastest_peer']} "
                    f"{fp['step_s_median']:.2f} s, {fp['peak_gb']:.2f} GB ({r['lowest_peak_peer']} {lp['peak_gb']:.2f} GB)"
                    f" | {cell('ours_fast')} | {cell('ours_small')} | {'; '.join(ab) or '-'} | "
                    f"{', '.join(cold) or 'warm runs only'} |")
    return "\n".join(rows)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    if sys.argv[1] == "--table":  # python bench/peers/report.py --table bench/results/vs_peers_h100.json
        print(table(json.loads(Path(sys.argv[2]).read_text())))
        sys.exit(0)
    result = build(Path(sys.argv[1]), Path(sys.argv[2]))
    if len(sys.argv) > 3:
        plot(result, Path(sys.argv[3]))
