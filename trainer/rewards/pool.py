"""Reward functions (and a multi-turn rollout's tools) in worker processes, each call under a timeout: a worker that
overruns is killed and replaced.

A recipe's reward with `num_workers` (or `timeout_s`) runs here instead of in the training process: its
completions are cut into calls (`chunk_size` completions each; default an equal share per worker), the calls of
every such reward go out to that reward's workers at once, and the training process waits on all of them together,
so several functions score concurrently. A call that passes its `timeout_s` has its worker (and the worker's process
group: whatever the reward started, e.g. a program under test) killed; the call's completions score per `on_error`.
`concurrent.futures.ProcessPoolExecutor` cannot cancel a running call, hence one `multiprocessing.Process` per
worker with its own pipe. Workers start from a forkserver (spawn where there is none), never by forking the
training process, which may hold CUDA or vLLM state; they import the function by its reference (module:function or
file.py:function), as the training process did. Workers are daemons, so a reward cannot start
`multiprocessing` children of its own (subprocesses are fine).

This module never decides what a failure scores: it reports each call's values, error or timeout to `score`.
"""
from __future__ import annotations

import atexit
import multiprocessing
import os
import signal
import time
import traceback
import weakref
from dataclasses import dataclass
from multiprocessing.connection import wait

from trainer.errors import UserError

STARTUP_S = 120.0  # a worker must import its function within this (the training process already imported it once)
_POOLS: weakref.WeakSet = weakref.WeakSet()


def _context():
    methods = multiprocessing.get_all_start_methods()
    if "forkserver" in methods:
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(["trainer.rewards.pool"])
        return ctx
    return multiprocessing.get_context("spawn")


@dataclass
class Outcome:
    """One call's result: the function's values, or the error it raised, or a timeout (its worker was killed)."""
    rows: range  # the completions of the batch this call scored
    values: list | None = None
    error: str | None = None
    timed_out: bool = False


def _serve(conn, ref: str, base_dir: str, field: str) -> None:
    """Worker: import the function, then answer calls until the pipe closes."""
    try:
        os.setpgid(0, 0)  # its own process group: a kill on timeout also reaches what the reward started
    except (AttributeError, OSError):
        pass
    from pathlib import Path

    from trainer.rewards import load_callable

    try:
        fn = load_callable(ref, Path(base_dir), field)
    except UserError as e:
        conn.send(("load_error", e.problem))
        return
    conn.send(("ready", None))
    while True:
        try:
            kwargs = conn.recv()
        except (EOFError, OSError):
            return
        try:
            values = fn(**kwargs)
            values = list(values) if isinstance(values, (list, tuple)) else values
            conn.send(("ok", values))
        except BaseException as e:  # noqa: BLE001 - reported to the parent, which applies on_error
            text = f"{e.__class__.__name__}: {e}"
            try:
                conn.send(("error", text))
            except Exception:  # e.g. a return value that cannot be pickled
                conn.send(("error", text + "\n" + traceback.format_exc(limit=2)))


class _Worker:
    def __init__(self, ctx, pool: "WorkerPool"):
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_serve, args=(child, pool.ref, pool.base_dir, pool.field), daemon=True,
                                name=f"{pool.kind}-{pool.name}")
        self.proc.start()
        child.close()
        self.ready = False
        self.call: tuple[int, range] | None = None  # (call index, rows) while busy
        self.deadline = time.monotonic() + STARTUP_S

    def send(self, index: int, rows: range, kwargs: dict, timeout_s: float | None) -> None:
        self.conn.send(kwargs)
        self.call = (index, rows)
        self.deadline = time.monotonic() + timeout_s if timeout_s else float("inf")

    def kill(self) -> None:
        try:
            if os.getpgid(self.proc.pid) == self.proc.pid:
                os.killpg(self.proc.pid, signal.SIGKILL)
            else:
                self.proc.kill()
        except (ProcessLookupError, AttributeError, OSError):
            pass
        self.proc.join(5)
        self.conn.close()


class WorkerPool:
    """The worker processes of one reward function; they start on first use and live until `close`."""

    def __init__(self, name: str, ref: str, base_dir: str, field: str, num_workers: int, timeout_s: float | None,
                 chunk_size: int | None, kind: str = "reward"):
        self.name, self.ref, self.base_dir, self.field, self.kind = name, ref, base_dir, field, kind
        self.num_workers, self.timeout_s, self.chunk_size = max(1, num_workers), timeout_s, chunk_size
        self.workers: list[_Worker] = []
        self._ctx = None
        _POOLS.add(self)

    def calls(self, n: int) -> list[range]:
        size = self.chunk_size or -(-n // self.num_workers)
        return [range(s, min(s + size, n)) for s in range(0, n, max(size, 1))]

    def _spawn(self) -> _Worker:
        self._ctx = self._ctx or _context()
        w = _Worker(self._ctx, self)
        self.workers.append(w)
        return w

    def _drop(self, w: _Worker) -> None:
        w.kill()
        self.workers.remove(w)

    def close(self) -> None:
        for w in list(self.workers):
            self._drop(w)


class Batch:
    """The calls of several pooled rewards on one batch of completions, run together: `start` sends the first
    calls (the training process is then free, e.g. to score in-process rewards), `finish` waits for the rest."""

    def __init__(self):
        self.queues: dict[WorkerPool, list[tuple[int, range, dict]]] = {}
        self.results: dict[WorkerPool, list[Outcome]] = {}

    def add(self, pool: WorkerPool, rows_kwargs: list[tuple[range, dict]]) -> None:
        self.queues[pool] = [(i, rows, kw) for i, (rows, kw) in enumerate(rows_kwargs)]
        self.results[pool] = [Outcome(rows) for rows, _ in rows_kwargs]

    def start(self) -> "Batch":
        self._dispatch()
        return self

    def _dispatch(self) -> None:
        for pool, queue in self.queues.items():
            for w in list(pool.workers):
                if queue and w.ready and w.call is None:
                    index, rows, kwargs = queue.pop(0)
                    try:
                        w.send(index, rows, kwargs, pool.timeout_s)
                    except OSError:  # it died while idle: requeue the call on a fresh worker
                        queue.insert(0, (index, rows, kwargs))
                        pool._drop(w)
            starting = sum(not w.ready for w in pool.workers)
            while queue and len(pool.workers) < pool.num_workers and len(queue) > starting:
                pool._spawn()  # on first use, and in place of killed workers
                starting += 1

    def abort(self) -> None:
        """Kill the workers still busy with (or starting for) this batch, so no stale result reaches the next."""
        for pool in self.queues:
            for w in [w for w in pool.workers if w.call is not None or not w.ready]:
                pool._drop(w)

    def _pending(self) -> bool:
        return any(self.queues.values()) or any(w.call is not None for p in self.queues for w in p.workers)

    def finish(self) -> dict[WorkerPool, list[Outcome]]:
        while self._pending():
            self._dispatch()
            live = {w.conn: (p, w) for p in self.queues for w in p.workers if w.call is not None or not w.ready}
            now = time.monotonic()
            wake = min((w.deadline for _, w in live.values()), default=now) - now
            for conn in wait(list(live), timeout=max(0.0, min(wake, 1.0))):
                self._receive(*live[conn])
            now = time.monotonic()
            for pool, w in live.values():
                if w in pool.workers and (w.call is not None or not w.ready) and now > w.deadline:
                    self._overrun(pool, w)
        return self.results

    def _receive(self, pool: WorkerPool, w: _Worker) -> None:
        try:
            kind, value = w.conn.recv()
        except (EOFError, OSError):  # the worker died: a crash in the reward (segfault, os._exit, OOM killer)
            w.proc.join(1)
            if w.call is None:
                pool._drop(w)
                raise UserError(f"{pool.kind} {pool.name}", f"its worker process exited while importing "
                                f"{pool.ref} (exit code {w.proc.exitcode})",
                                "check that the module imports cleanly in a fresh process") from None
            self.results[pool][w.call[0]].error = f"the worker process died (exit code {w.proc.exitcode})"
            pool._drop(w)
            return
        if kind == "ready":
            w.ready, w.deadline = True, float("inf")
            return
        if kind == "load_error":
            pool._drop(w)
            raise UserError(f"{pool.kind} {pool.name}", f"a worker process cannot import {pool.ref}: {value}",
                            "the function must be importable by reference (module:function or file.py:function) "
                            "in a fresh process")
        out = self.results[pool][w.call[0]]
        out.values, out.error = (value, None) if kind == "ok" else (None, value)
        w.call, w.deadline = None, float("inf")

    def _overrun(self, pool: WorkerPool, w: _Worker) -> None:
        if w.call is None:  # never became ready
            pool._drop(w)
            raise UserError(f"{pool.kind} {pool.name}", f"its worker did not start within {STARTUP_S:.0f} s",
                            "check that importing the reward's module does not block")
        self.results[pool][w.call[0]].timed_out = True
        pool._drop(w)


@atexit.register
def _close_all() -> None:
    for pool in list(_POOLS):
        pool.close()
