"""The env interface (below), make_env, and EnvPool: many episodes stepped together in worker processes.

Every env speaks text: reset(task_id) -> (obs, info), step(action) -> (obs, reward, done, info).
  reset info: {"instruction", "admissible": list[str] | None, "gold": str | None, "task_type": str}
  step info:  {"won": bool, "valid": bool, "admissible", "gold"}
"gold" is an action that makes progress from the current state (for tests and imitation baselines), None where the
env has none. A step never raises on a bad action string: the env answers as the game does and sets valid=False.
"""
import contextlib
import os
import socket
import subprocess
import sys
from multiprocessing.connection import Connection
from typing import Protocol


class Env(Protocol):
    def reset(self, task_id: str) -> tuple[str, dict]: ...
    def step(self, action: str) -> tuple[str, float, bool, dict]: ...
    def close(self) -> None: ...


class EnvSuite(Protocol):
    task_ids: list[str]  # stable, sorted; a task id names one episode start (a game file, a seed)
    def make(self) -> Env: ...


def make_env(name: str, split: str, **kw) -> EnvSuite:
    """Suite of `name` ("alfworld" | "twx" | "tau2") on `split`; kw go to the env (see its module).
    Imports are lazy so that `import envs` stays cheap and each env's dependencies stay optional."""
    if name == "alfworld":
        from envs.alfworld import AlfworldSuite
        return AlfworldSuite(split, **kw)
    if name == "twx":
        from envs.textworld_express import TwxSuite
        return TwxSuite(split, **kw)
    if name == "tau2":
        from envs.tau2 import make_suite
        return make_suite(split, **kw)
    raise ValueError(f"unknown env {name!r}: expected one of alfworld, twx, tau2")


def failed_reset(error: str) -> tuple[str, dict]:
    return "", {"instruction": "", "admissible": None, "gold": None, "task_type": "", "error": error}


def failed_step(error: str) -> tuple[str, float, bool, dict]:
    return "", 0.0, True, {"won": False, "valid": False, "admissible": None, "gold": None, "error": error}


def run_jobs(suite: EnvSuite, envs: dict, jobs: list[tuple]) -> list[tuple]:
    """Runs jobs ("reset", slot, task_id) | ("step", slot, action) | ("close", slot, None) in order on envs
    {slot: Env}, one env per slot. An env that raises fails its episode only: the job gets an error result
    (info["error"], done=True) and the slot is emptied."""
    results = []
    for kind, slot, arg in jobs:
        try:
            if kind == "close":
                if slot in envs:
                    envs.pop(slot).close()
                results.append(None)
            elif kind == "reset":
                if slot not in envs:
                    envs[slot] = suite.make()
                results.append(envs[slot].reset(arg))
            elif slot not in envs:
                results.append(failed_step(f"slot {slot} holds no episode (never reset, or its env failed)"))
            else:
                results.append(envs[slot].step(arg))
        except Exception as e:  # noqa: BLE001 -- one broken game must not end a whole collection run
            env = envs.pop(slot, None)
            with contextlib.suppress(Exception):  # the env is already broken; closing it is best effort
                env is not None and env.close()
            error = f"{type(e).__name__}: {e}"
            results.append(failed_reset(error) if kind == "reset" else failed_step(error))
    return results


def worker_main(fd: int) -> None:
    """An EnvPool worker (`python -c ... worker_main(FD)`): receives the suite, then job lists, over FD."""
    conn = Connection(fd)
    suite, envs = conn.recv(), {}
    conn.send("ready")  # imports done: from here on, timeouts measure env work only
    with contextlib.suppress(EOFError):  # EOF: the pool's process is gone
        while (jobs := conn.recv()) is not None:
            conn.send(run_jobs(suite, envs, jobs))
    for env in envs.values():
        env.close()


class EnvPool:
    """Episodes in slots (any hashable the caller picks, e.g. 0..B-1), stepped together by n_workers processes.

    run(jobs) takes ("reset", slot, task_id) and ("step", slot, action) jobs and returns their results in order:
    (obs, info) for a reset, (obs, reward, done, info) for a step. Jobs of different workers run in parallel, so
    a game load (1-2 s in ALFWorld) in one worker overlaps with steps in the others; a reset goes to the worker
    with the fewest resets in this call, then the fewest episodes. send(jobs) / recv() split run() in two, so the
    caller can generate while the workers load games. A worker that crashes or hangs past timeout_s is restarted: its jobs get error
    results (info["error"], done=True) and the episodes it held are lost; other workers' episodes go on.
    n_workers=0 runs everything in this process (tests, small runs, suites that cannot be pickled).
    A worker is a fresh Python process that imports only what the pickled suite needs: not a fork (forking a
    process that holds a JVM connection (TextWorld-Express) or torch threads is unsafe), and not
    multiprocessing's "spawn", which would re-import the calling script (torch, transformers: ~300 MB and
    seconds per worker). Start a pool once and keep it: a worker costs a second or two to start. Workers run in
    their own session, so Ctrl-C reaches only this process, whose close() (on leaving a `with`) ends them.
    """

    def __init__(self, suite: EnvSuite, n_workers: int = 0, timeout_s: float = 600.0):
        self.suite, self.timeout_s = suite, timeout_s
        self.local_envs: dict = {}
        self.workers = [self._start() for _ in range(n_workers)]
        for w in range(n_workers):
            self._wait_ready(w)
        self.slot_worker: dict = {}  # slot -> index of the worker holding its env
        self.pending: tuple | None = None

    def _start(self) -> tuple[subprocess.Popen, Connection]:
        ours, theirs = socket.socketpair()
        code = "import sys; from envs.base import worker_main; worker_main(int(sys.argv[1]))"
        # the worker finds the suite's module (envs.*, or a test's fake) on this process's import path
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        proc = subprocess.Popen([sys.executable, "-c", code, str(theirs.fileno())], pass_fds=[theirs.fileno()],
                                env=env, start_new_session=True)
        theirs.close()
        conn = Connection(ours.detach())
        conn.send(self.suite)
        return proc, conn

    def _wait_ready(self, w: int) -> None:
        try:
            ready = self.workers[w][1].recv()
        except EOFError:
            ready = None
        if ready != "ready":
            raise RuntimeError(f"env worker {w} died while starting: see its traceback above")

    def _restart(self, w: int) -> None:
        proc, conn = self.workers[w]
        proc.kill()
        proc.wait()
        conn.close()
        self.workers[w] = self._start()
        self._wait_ready(w)
        self.slot_worker = {s: i for s, i in self.slot_worker.items() if i != w}

    def send(self, jobs: list[tuple]) -> None:
        assert self.pending is None, "recv() the previous send() first"
        if not self.workers:
            self.pending = (jobs, None, None)
            return
        results = [None] * len(jobs)
        per_worker = [[] for _ in self.workers]  # (index in jobs | None for a close, job)
        resets = [0] * len(self.workers)
        held = [0] * len(self.workers)
        for w in self.slot_worker.values():
            held[w] += 1
        for i, (kind, slot, arg) in enumerate(jobs):
            if kind == "reset":  # to the worker with the fewest loads in this call, then the fewest episodes
                old = self.slot_worker.pop(slot, None)
                if old is not None:
                    held[old] -= 1
                w = min(range(len(self.workers)), key=lambda k: (resets[k], held[k]))
                if old is not None and old != w:  # the slot's previous env lives elsewhere: free it
                    per_worker[old].append((None, ("close", slot, None)))
                self.slot_worker[slot], resets[w], held[w] = w, resets[w] + 1, held[w] + 1
            elif slot in self.slot_worker:
                w = self.slot_worker[slot]
            else:
                results[i] = failed_step(f"slot {slot} holds no episode (never reset, or its worker crashed)")
                continue
            per_worker[w].append((i, (kind, slot, arg)))
        for w, todo in enumerate(per_worker):
            if todo:
                try:
                    self.workers[w][1].send([job for _, job in todo])
                except OSError:  # a dead worker: recv() finds out and restarts it
                    pass
        self.pending = (jobs, results, per_worker)

    def recv(self) -> list[tuple]:
        assert self.pending is not None, "send() jobs first"
        jobs, results, per_worker = self.pending
        self.pending = None
        if per_worker is None:  # no workers: run here
            return run_jobs(self.suite, self.local_envs, jobs)
        for w, todo in enumerate(per_worker):
            if not todo:
                continue
            conn = self.workers[w][1]
            try:
                if not conn.poll(self.timeout_s):
                    raise TimeoutError(f"no answer within {self.timeout_s} s")
                out = conn.recv()
            except (EOFError, OSError, TimeoutError) as e:
                error = f"env worker {w} failed ({type(e).__name__}: {e}); its episodes are lost"
                out = [failed_reset(error) if job[0] == "reset" else failed_step(error) for _, job in todo]
                self._restart(w)
            for (i, _), result in zip(todo, out):
                if i is not None:
                    results[i] = result
        return results

    def run(self, jobs: list[tuple]) -> list[tuple]:
        self.send(jobs)
        return self.recv()

    def reset_many(self, pairs: list[tuple]) -> list[tuple[str, dict]]:
        """pairs: [(slot, task_id)] -> [(obs, info)]"""
        return self.run([("reset", slot, task_id) for slot, task_id in pairs])

    def step_many(self, pairs: list[tuple]) -> list[tuple[str, float, bool, dict]]:
        """pairs: [(slot, action)] -> [(obs, reward, done, info)]"""
        return self.run([("step", slot, action) for slot, action in pairs])

    def close(self) -> None:
        for env in self.local_envs.values():
            env.close()
        self.local_envs.clear()
        for proc, conn in self.workers:
            try:
                conn.send(None)
            except OSError:
                pass
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            conn.close()
        self.workers = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
