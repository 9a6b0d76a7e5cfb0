"""Run a command while sampling nvidia-smi's used memory every 0.15 s; write the peak and timeline as JSON.

    python bench/smi.py OUT.json -- train bench/recipes/toy-digits-1.5b-vllm.yaml --output-dir runs/x
    SMI_GPUS=1 python bench/smi.py OUT.json -- ...      # watch GPU 1 only (nvidia-smi's index); default: all
The peak includes the CUDA context (what nvidia-smi shows), in GB (1e9 bytes), as bench/results/*.json report;
per-GPU peaks too. t0_unix is when the command was launched (benchmarks: startup = t0 to the first step's end).
While the command runs, OUT.partial.json holds the peak so far (rewritten every few seconds), so a run cut off with
the machine (a sitting past its device time) still has its peak.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path


PERIOD = 0.15  # seconds between samples' starts (the runs of 2026-11-26 slept 0.2 s after each query: ~0.23 s)


def used_mib() -> dict[int, int]:
    out = subprocess.run(["nvidia-smi", "--query-gpu=index,memory.used", "--format=csv,noheader,nounits"],
                         capture_output=True, text=True, timeout=10).stdout
    rows = [line.split(",") for line in out.strip().splitlines()]
    watch = {int(x) for x in os.environ["SMI_GPUS"].split(",")} if os.environ.get("SMI_GPUS") else None
    return {int(i): int(m) for i, m in rows if watch is None or int(i) in watch}


def partial_path(smi_json) -> Path:
    """Where main() keeps the peak so far while its command runs (OUT.json -> OUT.partial.json)."""
    return Path(str(smi_json).removesuffix(".json") + ".partial.json")


def start(smi_json: Path, log: Path, cmd: list[str], env: dict | None = None, cwd=None) -> subprocess.Popen:
    """Start `cmd` under this script (its peaks into smi_json), stdout and stderr into log."""
    with open(log, "w") as f:  # the child holds its own handle
        return subprocess.Popen([sys.executable, str(Path(__file__)), str(smi_json), "--", *cmd], stdout=f,
                                stderr=subprocess.STDOUT, env=env, cwd=cwd)


def watched(smi_json: Path, log: Path, cmd: list[str], env: dict | None = None) -> int:
    """Run `cmd` under this script (its peaks into smi_json), stdout and stderr into log; returns its exit code."""
    with start(smi_json, log, cmd, env) as p:  # as subprocess.call: the child is killed if the wait is interrupted
        try:
            return p.wait()
        except BaseException:
            p.kill()
            raise


def main() -> int:
    out, cmd = sys.argv[1], sys.argv[sys.argv.index("--") + 1:]
    samples: list[tuple[float, int]] = []
    per_gpu: dict[int, int] = {}
    per_gpu_samples: list[tuple[float, dict[int, int]]] = []  # to take a per-GPU peak over a window (e.g. training)
    stop = threading.Event()
    t0 = time.time()

    partial = partial_path(out)

    def poll():
        while not stop.is_set():
            if len(samples) % 20 == 19:  # ~3 s
                tmp = partial.with_suffix(".tmp")
                peak_now = max(s[1] for s in samples)
                tmp.write_text(json.dumps({"cmd": cmd, "t0_unix": t0, "wall_s": round(time.time() - t0, 1),
                                           "peak_mib": peak_now, "peak_gb": round(peak_now * 2**20 / 1e9, 3),
                                           "partial": True}))
                tmp.replace(partial)
            t = time.time()
            try:
                used = used_mib()
                samples.append((round(time.time() - t0, 2), max(used.values())))
                per_gpu_samples.append((samples[-1][0], used))
                for i, m in used.items():
                    per_gpu[i] = max(per_gpu.get(i, 0), m)
            except Exception:
                pass
            time.sleep(max(0.0, PERIOD - (time.time() - t)))  # the query itself takes 20-50 ms

    th = threading.Thread(target=poll, daemon=True)
    th.start()
    rc = subprocess.call(cmd)
    stop.set()
    th.join()
    peak = max((s[1] for s in samples), default=0)
    with open(out, "w") as f:
        json.dump({"cmd": cmd, "rc": rc, "t0_unix": t0, "wall_s": round(time.time() - t0, 1), "peak_mib": peak,
                   "peak_gb": round(peak * 2**20 / 1e9, 3),
                   "peak_gb_per_gpu": {i: round(m * 2**20 / 1e9, 3) for i, m in sorted(per_gpu.items())},
                   "samples": samples, "per_gpu_samples": per_gpu_samples}, f)
    print(f"smi peak {peak} MiB ({peak * 2**20 / 1e9:.2f} GB), rc {rc}, {time.time() - t0:.0f} s", flush=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
