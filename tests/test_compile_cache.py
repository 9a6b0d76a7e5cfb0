"""trainer/compile_cache.py: where torch.compile's graphs and kernels are kept across runs."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import pytest

from trainer import compile_cache
from trainer.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def recipe(named=None):
    return SimpleNamespace(train=SimpleNamespace(compile_cache_dir=named))


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    monkeypatch.delenv(compile_cache.ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    return tmp_path


def test_the_default_outlives_tmp_and_the_environment_or_the_recipe_can_say_otherwise(clean_env, monkeypatch):
    tmp_path = clean_env
    got = compile_cache.use(recipe())  # nothing set: under the user's cache home, not /tmp
    assert got == tmp_path / "xdg" / "trainer" / "torch_compile" and got.is_dir()
    assert os.environ[compile_cache.ENV] == str(got.resolve())
    monkeypatch.setenv(compile_cache.ENV, str(tmp_path / "theirs"))  # the environment's choice is kept
    assert compile_cache.use(recipe()) == tmp_path / "theirs"
    assert os.environ[compile_cache.ENV] == str(tmp_path / "theirs")
    named = compile_cache.use(recipe(str(tmp_path / "mine")))  # the recipe's wins over both
    assert named == tmp_path / "mine" and os.environ[compile_cache.ENV] == str((tmp_path / "mine").resolve())
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.delenv(compile_cache.ENV)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert compile_cache.default_dir() == tmp_path / "home" / ".cache" / "trainer" / "torch_compile"


def test_a_directory_that_cannot_be_written(clean_env, monkeypatch, caplog):
    tmp_path = clean_env
    (tmp_path / "a_file").write_text("")
    with pytest.raises(UserError) as e:  # named by the recipe: the user's to fix
        compile_cache.use(recipe(str(tmp_path / "a_file" / "cache")))
    assert e.value.field == "train.compile_cache_dir" and "cannot write" in e.value.problem
    assert compile_cache.ENV not in os.environ
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "a_file"))  # the default: torch's own, and a warning
    with caplog.at_level("WARNING", logger=compile_cache.__name__):
        assert compile_cache.use(recipe()) is None
    assert compile_cache.ENV not in os.environ and "not cached across runs" in caplog.text


COMPILE = textwrap.dedent("""
    import json, sys
    from types import SimpleNamespace
    import bitsandbytes  # as a run imports it before it starts: inductor writes its /tmp default into the variable
    from trainer import compile_cache
    compile_cache.use(SimpleNamespace(train=SimpleNamespace(compile_cache_dir=None)))
    import torch
    from torch._dynamo.utils import counters
    f = torch.compile(lambda x: torch.nn.functional.silu(x) * x + 1.0)
    f(torch.randn(16, 8))
    print(json.dumps(dict(counters["inductor"])))
""")


def test_a_second_run_on_a_fresh_tmp_loads_what_the_first_compiled(tmp_path):
    # Two processes, each with a /tmp of its own (a new node, a Slurm job's private /tmp), the same shapes, the
    # default directory (under XDG_CACHE_HOME here): the second finds the first's graph there, where torch's default
    # would have been the empty /tmp
    cache = tmp_path / "xdg" / "trainer" / "torch_compile"
    hits = []
    for run in (1, 2):
        tmp = tmp_path / f"tmp{run}"
        tmp.mkdir()
        env = {k: v for k, v in os.environ.items() if k != compile_cache.ENV}
        env.update(TMPDIR=str(tmp), PYTHONPATH=ROOT, OMP_NUM_THREADS="1", XDG_CACHE_HOME=str(tmp_path / "xdg"))
        out = subprocess.run([sys.executable, "-c", COMPILE], env=env, capture_output=True, text=True,
                             timeout=600)
        assert out.returncode == 0, out.stderr[-3000:]
        c = json.loads(out.stdout.strip().splitlines()[-1])
        hits.append((c.get("fxgraph_cache_miss", 0), c.get("fxgraph_cache_hit", 0)))
        # its graphs and kernels in the chosen directory (the CPU's precompiled C++ headers stay in torch's /tmp one)
        assert {"fxgraph", "aotautograd"} <= {p.name for p in cache.iterdir()}, list(cache.iterdir())
    assert hits[0][0] >= 1 and hits[0][1] == 0, hits  # the first compiled
    assert hits[1][1] >= 1 and hits[1][0] == 0, hits  # the second loaded it


def test_torchs_own_default_in_the_variable_is_not_a_choice(clean_env, monkeypatch):
    # importing bitsandbytes asks inductor where its cache is, and inductor writes its /tmp default into the variable:
    # that is not the environment choosing, so the run's cache still goes where compile_cache puts it
    tmp_path = clean_env
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)  # gettempdir() reads TMPDIR again
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    cache_dir()
    assert os.environ[compile_cache.ENV].startswith(str(tmp_path / "tmp"))
    assert compile_cache.use(recipe()) == tmp_path / "xdg" / "trainer" / "torch_compile"
    assert os.environ[compile_cache.ENV] == str((tmp_path / "xdg" / "trainer" / "torch_compile").resolve())
