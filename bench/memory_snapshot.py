"""What held the GPU's memory when an allocation failed: a text summary of a TRAINER_MEMORY_HISTORY snapshot.

    python bench/memory_snapshot.py RUN_DIR/memory_snapshot.pickle[.gz] [--top N]

The snapshot is torch's (torch.cuda.memory._dump_snapshot, trainer/oom.py); https://pytorch.org/memory_viz draws it,
this prints it where there is no browser (a device sitting's tar). It replays the allocation trace up to the first
OOM (or its end) and prints, in GB (1e9 bytes):
- the memory live at that moment by owner: the innermost frame in trainer/, vllm/, transformers/, peft/ or
  bitsandbytes code (file:line function), largest first;
- the same by memory pool (torch's default, CUDA-graph pools, vLLM's cumem pools);
- the largest allocations of the last RECENT events before it (what grew just before the failure), with their owner;
- what each pool had reserved and allocated when the snapshot was written (cached memory another pool cannot use).
"""
from __future__ import annotations

import argparse
import gzip
import pickle
from collections import defaultdict, deque
from pathlib import Path

OWNERS = ("/trainer/", "/vllm/", "/transformers/", "/peft/", "/bitsandbytes/", "/flashinfer/", "/bench/")
RECENT = 400  # events before the OOM that count as "just before"


def load(path: Path) -> dict:
    data = path.read_bytes()
    return pickle.loads(gzip.decompress(data) if path.suffix == ".gz" else data)


def owner(frames: list[dict]) -> str:
    """The innermost frame in library or project code; else the innermost Python frame; else '?'."""
    for f in frames:
        name = f.get("filename", "")
        if any(o in name for o in OWNERS):
            short = name[max(name.rfind(o) for o in OWNERS if o in name) + 1:]
            return f"{short}:{f.get('line')} {f.get('name')}"
    py = next((f for f in frames if f.get("filename", "").endswith(".py")), None)
    return f"{py['filename']}:{py.get('line')} {py.get('name')}" if py else "?"


def replay(trace: list[dict]) -> dict:
    """Live allocations (addr -> event) at the first OOM (or the trace's end), the OOM event, and the recent allocs."""
    live: dict[int, dict] = {}
    oom, recent = None, deque(maxlen=RECENT)
    for e in trace:
        action = e.get("action")
        if action == "alloc":
            live[e["addr"]] = e
            recent.append(e)
        elif action in ("free_requested", "free_completed"):
            live.pop(e["addr"], None)
        elif action == "oom":
            oom = e
            break
    return {"live": live, "oom": oom, "recent": list(recent)}


def summary(snapshot: dict, top: int = 15) -> str:
    traces = [t for t in snapshot.get("device_traces", []) if t]
    if not traces:
        return "no allocation trace in this snapshot (was TRAINER_MEMORY_HISTORY set before the run started?)"
    lines = []
    for device, trace in enumerate(traces):
        got = replay(trace)
        by_owner: dict[str, int] = defaultdict(int)
        for e in got["live"].values():
            by_owner[owner(e.get("frames", []))] += e["size"]
        total = sum(by_owner.values())
        oom = got["oom"]
        head = (f"OOM: {oom.get('size', 0) / 1e9:.3f} GB requested, {oom.get('device_free', 0) / 1e9:.2f} GB free on "
                f"the device" if oom else "no OOM in the trace: state at its end")
        lines += [f"device {device}: {head}; {total / 1e9:.2f} GB live in {len(got['live'])} allocations", "live by owner:"]
        for name, size in sorted(by_owner.items(), key=lambda kv: -kv[1])[:top]:
            lines.append(f"  {size / 1e9:8.3f} GB  {name}")
        by_pool: dict[str, int] = defaultdict(int)
        for e in got["live"].values():
            by_pool[str(tuple(e.get("pool_id") or (0, 0)))] += e["size"]
        lines.append("live by memory pool (0, 0): torch's default; others: CUDA-graph or vLLM's cumem pools): "
                     + ", ".join(f"{k} {v / 1e9:.3f} GB" for k, v in sorted(by_pool.items(), key=lambda kv: -kv[1])))
        lines.append(f"largest of the last {len(got['recent'])} allocations before it:")
        for e in sorted(got["recent"], key=lambda e: -e["size"])[:top]:
            alive = "live" if e["addr"] in got["live"] else "freed"
            lines.append(f"  {e['size'] / 1e9:8.3f} GB  {alive:5s}  {owner(e.get('frames', []))}")
    pools: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for seg in snapshot.get("segments", []):
        key = str(tuple(seg.get("segment_pool_id") or (0, 0)))
        pools[key][0] += seg["total_size"]
        pools[key][1] += seg["allocated_size"]
    if pools:
        lines.append("reserved when the snapshot was written (after the OOM unwound), by pool: reserved / allocated GB")
        for k, (reserved, allocated) in sorted(pools.items(), key=lambda kv: -kv[1][0]):
            lines.append(f"  {k}: {reserved / 1e9:.3f} / {allocated / 1e9:.3f}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("path", type=Path)
    ap.add_argument("--top", type=int, default=15)
    a = ap.parse_args()
    print(summary(load(a.path), a.top))


if __name__ == "__main__":
    main()
