"""vLLM's first look at a model class on a machine, both ways, alternated in one process: its own child Python
(registry._run_in_subprocess, as shipped) against trainer.rollout.vllm_internals.inspect_models_in_process, each
with an empty $VLLM_CACHE_ROOT/modelinfos, as on a new machine or a job with a home of its own.

    python bench/vllm_inspect.py OUT [ROUNDS]     # -> OUT/vllm_inspect.json (bench/results/vllm_inspect.json)
"""
from __future__ import annotations

import json
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ARCHS = (("vllm.model_executor.models.qwen2", "Qwen2ForCausalLM"),
         ("vllm.model_executor.models.llama", "LlamaForCausalLM"))


def main(out: Path, rounds: int = 2) -> dict:
    import torch
    import vllm
    from vllm.model_executor.models import registry

    from trainer.rollout import vllm_internals as vi

    vi.inspect_models_in_process()
    # in_process first: its first round imports the model modules (the child imports them each time), which a
    # real start pays anyway a moment later, to load the model
    arms = {"in_process": vi._in_process, "subprocess": registry._vllm_run_in_subprocess}
    cache = Path(tempfile.mkdtemp(prefix="vllm_inspect_"))
    registry._LazyRegisteredModel._get_cache_dir = staticmethod(lambda: cache / "modelinfos")
    seconds: dict[str, list[float]] = {a: [] for a in arms}
    answers: dict[str, dict] = {}
    for _ in range(rounds):
        for arm, run in arms.items():
            registry._run_in_subprocess = run
            for module, cls in ARCHS:
                shutil.rmtree(cache / "modelinfos", ignore_errors=True)  # a machine's first start
                t = time.perf_counter()
                mi = registry._LazyRegisteredModel(module, cls).inspect_model_cls()
                seconds[arm].append(round(time.perf_counter() - t, 3))
                answers.setdefault(cls, {})[arm] = asdict(mi)
    same = all(len({json.dumps(a, sort_keys=True, default=list) for a in v.values()}) == 1 for v in answers.values())
    result = {
        "command": "python bench/vllm_inspect.py OUT " + str(rounds),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "vllm": vllm.__version__, "archs": [c for _, c in ARCHS],
        "seconds": seconds, "median_s": {a: statistics.median(s) for a, s in seconds.items()},
        "same_answer": same,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "vllm_inspect.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result))
    shutil.rmtree(cache, ignore_errors=True)
    return result


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    main(Path(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 2)
