"""Env speed: game load time, steps/s of one env, and of an EnvPool with 1, 2, 4 workers; games per split.

    python -m envs.bench [--env alfworld twx] [--workers 0 1 2 4] [--slots 8] [--episodes 16]

ALFWorld runs on $ALFWORLD_DATA when it holds the full set (else on the test fixtures). Actions are random
admissible commands (seeded). "steps/s, 1 env" times steps only (games loaded); "pool steps/s" plays --episodes
episodes of 10 steps in --slots slots, refilling slots as episodes end, so game loads are included and overlap
with other slots' steps, as in collect.py (0 workers: the same loop in-process, loads not overlapped).
CPU time is this process's only: for TextWorld-Express it leaves out the JVM, which does the work.
"""
import argparse
import os
import random
import time
from pathlib import Path

from envs.alfworld import game_table
from envs.base import EnvPool, make_env

FIXTURES = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "alfworld"


def suite_for(name: str):
    if name == "twx":
        return make_env("twx", "train")
    data = os.environ.get("ALFWORLD_DATA")
    full = data and (Path(data) / "json_2.1.1" / "valid_seen").is_dir()
    return make_env("alfworld", "valid_seen", data_dir=None if full else FIXTURES)


def single_env(suite, n_games: int, n_steps: int, rng: random.Random) -> tuple[str, str]:
    """Seconds per reset and steps/s of one in-process env, as "wall (cpu)": CPU time is this process's alone,
    so it stays meaningful on a busy machine."""
    env = suite.make()
    for task_id in suite.task_ids[::1000]:  # warm-up (first use of each TextWorld-Express game costs ~1 s)
        env.reset(task_id)
    load, step, steps = [0.0, 0.0], [0.0, 0.0], 0
    for task_id in rng.sample(suite.task_ids, n_games):
        t = (time.perf_counter(), time.process_time())
        _, info = env.reset(task_id)
        t2 = (time.perf_counter(), time.process_time())
        for _ in range(n_steps):
            _, _, done, info = env.step(rng.choice(info["admissible"]))
            steps += 1
            if done:
                break
        t3 = (time.perf_counter(), time.process_time())
        for i in range(2):
            load[i] += t2[i] - t[i]
            step[i] += t3[i] - t2[i]
    env.close()
    return f"{load[0] / n_games:.3f} ({load[1] / n_games:.3f})", f"{steps / step[0]:.1f} ({steps / step[1]:.1f})"


def pooled(suite, n_workers: int, slots: int, episodes: int, rng: random.Random) -> float:
    """Transitions/s of an EnvPool playing `episodes` random 10-step episodes in `slots` slots, game loads
    included: a finished slot's next reset goes out with the other slots' steps, as in collect.py."""
    with EnvPool(suite, n_workers=n_workers) as pool:
        pool.reset_many([(s, task_id) for s, task_id in enumerate(suite.task_ids[::1000])])  # warm-up, see above
        t, transitions, started, left = time.perf_counter(), 0, slots, {}  # left: slot -> steps left
        jobs = [("reset", s, rng.choice(suite.task_ids)) for s in range(slots)]
        while jobs:
            next_jobs = []
            for (kind, s, _), result in zip(jobs, pool.run(jobs)):
                info = result[-1]
                left[s] = 10 if kind == "reset" else left[s] - 1
                transitions += kind == "step"
                if "error" in info or (kind == "step" and (result[2] or left[s] == 0)):
                    if started < episodes:
                        next_jobs.append(("reset", s, rng.choice(suite.task_ids)))
                        started += 1
                else:
                    next_jobs.append(("step", s, rng.choice(info["admissible"])))
            jobs = next_jobs
        return transitions / (time.perf_counter() - t)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m envs.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--env", nargs="+", default=["alfworld", "twx"], choices=["alfworld", "twx"])
    parser.add_argument("--workers", nargs="+", type=int, default=[0, 1, 2, 4], help="0: in-process pool")
    parser.add_argument("--games", type=int, default=5, help="games loaded by the single env")
    parser.add_argument("--slots", type=int, default=8)
    parser.add_argument("--episodes", type=int, default=16)
    args = parser.parse_args(argv)
    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}\n")
    print("| env | load s/game, wall (cpu) | steps/s, 1 env, wall (cpu) | " +
          " | ".join(f"pool steps/s, {n} workers" for n in args.workers) + " |")
    print("|---" * (3 + len(args.workers)) + "|")
    for name in args.env:
        suite, rng = suite_for(name), random.Random(0)
        scale = 20 if name == "twx" else 1  # TextWorld-Express is ~100x faster: more work for stable timings
        load, rate = single_env(suite, args.games * scale, 20, rng)
        cells = [f"{pooled(suite, n, args.slots, args.episodes * scale, rng):.1f}" for n in args.workers]
        print(f"| {name} | {load} | {rate} | " + " | ".join(cells) + " |", flush=True)
    if "alfworld" in args.env:
        print("\nALFWorld games per split and task type:\n")
        print(game_table(suite_for("alfworld").games.parent))


if __name__ == "__main__":
    main()
