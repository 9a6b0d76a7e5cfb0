"""Run a command while sampling nvidia-smi's used memory every 0.2 s; write the peak and timeline as JSON.

    python bench/smi.py OUT.json -- train bench/recipes/toy-digits-1.5b-vllm.yaml --output-dir runs/x
The peak includes the CUDA context (what nvidia-smi shows), in GB (1e9 bytes), as bench/results/*.json report.
"""
from __future__ import annotations

import json
import subprocess
import sys
import threading
import time


def used_mib() -> int:
    out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                         capture_output=True, text=True, timeout=10).stdout
    return max(int(x) for x in out.split())


def main() -> int:
    out, cmd = sys.argv[1], sys.argv[sys.argv.index("--") + 1:]
    samples: list[tuple[float, int]] = []
    stop = threading.Event()
    t0 = time.time()

    def poll():
        while not stop.is_set():
            try:
                samples.append((round(time.time() - t0, 2), used_mib()))
            except Exception:
                pass
            time.sleep(0.2)

    th = threading.Thread(target=poll, daemon=True)
    th.start()
    rc = subprocess.call(cmd)
    stop.set()
    th.join()
    peak = max((s[1] for s in samples), default=0)
    with open(out, "w") as f:
        json.dump({"cmd": cmd, "rc": rc, "wall_s": round(time.time() - t0, 1), "peak_mib": peak,
                   "peak_gb": round(peak * 2**20 / 1e9, 3), "samples": samples}, f)
    print(f"smi peak {peak} MiB ({peak * 2**20 / 1e9:.2f} GB), rc {rc}, {time.time() - t0:.0f} s", flush=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
