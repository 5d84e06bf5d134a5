"""The agent-env loop that collect.py, train_rwml.py --task policy and evaluate.py all play episodes with.

Continuous batching: up to `batch_size` episodes are live at once; each loop turn every live episode gets its
next action from ONE batched `act` call, then all of them step together in the env pool's worker processes.
A finished episode leaves at once and the next job takes its slot; the new job's game loads in a worker while the
model generates for the others (ALFWorld compiles its PDDL at load, 1-2 s). An env that raises or a worker that
dies fails that episode only (episode["error"], success False); the run goes on.
"""
from __future__ import annotations

from collections import deque
from typing import Callable

from common import Sample, chat_fn, chat_ids, chat_ids_with_span, generate, load_model
from envs.base import EnvPool, make_env
from prompts import agent_messages, format_reply, parse_action, parse_tool_reply

# reset-info keys an episode keeps when the env gives them: the task type (per-type stats), and for τ² the agent
# system prompt and the user's basic info, which the world-model prompt of its triples needs (paper App. C.1)
EPISODE_INFO = ("task_type", "system_prompt", "user_info")
# step-info keys a step keeps when the env gives them: τ²'s next_kind ("tool" | "user") and task_status
# ("completed" | "ongoing"), which the world-model triple's next state carries (paper App. C.1), and τ²'s
# executed (the env ran the call, even if it answered with an error: still a real transition)
STEP_INFO = ("next_kind", "task_status", "executed")
# --task-type picks tasks of one type: the keyword each env's suite takes it as
TASK_TYPE_KW = {"alfworld": "task_types", "twx": "games", "tau2": "domain"}

Act = Callable[[list[list[dict]], list[dict]], list[Sample]]


def make_suite(env: str, split: str, *, task_type: str | None = None, user_model: str | None = None,
               device=None, n_workers: int = 0, **kw):
    """The env suite every script plays (collect, evaluate, train_rwml --task policy); kw go to make_env.

    task_type: only tasks of this type (alfworld: a task type, e.g. pick_and_place_simple; twx: a game, e.g. coin;
    tau2: a domain, airline | retail | telecom). user_model (τ² only, ignored elsewhere): the user simulator,
    "litellm:<name>" for a hosted litellm model (e.g. litellm:gpt-4.1, needs its API key), anything else a local
    model for common.load_model (tiny | smollm2-135m | HF id | path; default smollm2-135m) that answers greedily
    in this process on `device`. A local user cannot be pickled into env workers, so it needs n_workers 0."""
    if task_type is not None:
        if env not in TASK_TYPE_KW:
            raise SystemExit(f"--task-type is not supported for --env {env}")
        kw[TASK_TYPE_KW[env]] = task_type if env == "tau2" else [task_type]
    if env != "tau2":
        return make_env(env, split, **kw)
    user_model = user_model or "smollm2-135m"
    if user_model.startswith("litellm:"):
        return make_env(env, split, user_model=user_model.removeprefix("litellm:"), **kw)
    if n_workers:
        raise SystemExit(f"--env tau2 with the local user model {user_model!r} needs --n-workers 0 (the model "
                         "lives in this process); a hosted user (--user-model litellm:<name>) runs in workers")
    return make_env(env, split, user_llm=chat_fn(*load_model(user_model, device=device)), **kw)


def recent(steps: list[dict], t: int, history: int) -> list[dict]:
    """The last `history` (obs, action) turns before step t: what the agent's prompt and the triple both show."""
    return [{"obs": s["obs"], "action": s["action"]} for s in steps[max(0, t - history):t]]


def model_actor(model, tokenizer, temperature: float, max_new_tokens: int, top_p: float = 1.0,
                generator=None, obs_spans: bool = False) -> Act:
    """act(messages_list, infos) -> one Sample per prompt, all from one batched generate call. An info's "tools"
    (τ²'s tool schemas) go to the chat template with its messages. obs_spans (text games): each Sample also carries
    the token span of the observation in its prompt (common.chat_ids_with_span)."""
    def act(messages_list: list[list[dict]], infos: list[dict]) -> list[Sample]:
        prompts = [chat_ids_with_span(tokenizer, m) if obs_spans else (chat_ids(tokenizer, m, info.get("tools")), None)
                   for m, info in zip(messages_list, infos)]
        samples = generate(model, tokenizer, [ids for ids, _ in prompts], max_new_tokens, temperature, top_p,
                           batch_size=max(1, len(prompts)), generator=generator)
        for sample, (_, span) in zip(samples, prompts):
            sample.obs_span = span
        return samples
    return act


def _new_episode(env: str, split: str, model: str, job: tuple[str, int], obs: str, info: dict) -> dict:
    episode = {"env": env, "split": split, "task_id": job[0], "instruction": info.get("instruction", ""),
               "rollout": job[1], "model": model, "steps": [], "success": False, "n_steps": 0}
    episode.update((k, info[k]) for k in EPISODE_INFO if info.get(k))
    return {"episode": episode, "obs": obs, "info": info}


def _messages(live: dict, env: str, history: int) -> list[dict]:
    """The agent's prompt: τ²'s own (its system prompt and the whole conversation, env info "messages"; paper §4:
    τ² with its official prompts), else the text-game prompt with the last `history` turns."""
    episode, info = live["episode"], live["info"]
    if env == "tau2":
        return info["messages"]
    steps = episode["steps"]
    return agent_messages(episode["instruction"], recent(steps, len(steps), history), live["obs"],
                          info.get("admissible"), len(steps), env)


def parse_reply(text: str, env: str, info: dict) -> tuple[str, bool]:
    """-> (action for the env, the reply parsed): τ²'s tool call or message in the chat template's format, else
    the text game's <action> (admissible when the env lists its actions)."""
    return parse_tool_reply(text) if env == "tau2" else parse_action(text, info.get("admissible"))


def run_episodes(act: Act, suite, jobs: list[tuple[str, int]], *, env: str, split: str, model: str = "",
                 max_env_steps: int = 30, history: int = 2, n_workers: int = 0, batch_size: int = 16,
                 on_done: Callable[[dict], None] | None = None) -> list[dict]:
    """Plays every job (task_id, rollout_index) once; returns the episodes in job order.

    act(messages_list, infos) -> list[Sample]: one response per live episode (infos: each one's latest env info,
    holding "admissible" and "gold", and τ²'s "tools"). Episode: {"env", "split", "task_id", "instruction",
    "rollout", "model", "steps", "success", "n_steps"} (+ "task_type", "system_prompt", "user_info" when the env
    gives them, + "error" when it failed). Step: {"obs", "action", "response", "valid", "next_obs", "reward",
    "done", "sample"} (+ STEP_INFO keys when the env gives them: τ²'s next_kind and task_status; + "admissible", the
    actions the agent's prompt listed, in text games); "sample" is the common.Sample (token ids and sampler
    log-probs) and is not JSON: drop it before writing. valid = the reply parsed (parse_reply: an admissible action;
    τ²: a well-formed call or a message) AND the env accepted it; an invalid step still reaches the env, which
    answers as the game does. `done` is the env's: an episode cut at max_env_steps ends with done False.
    on_done(episode) runs as each episode finishes.
    """
    if not jobs:
        return []
    queue = deque(enumerate(jobs))
    free = list(range(min(batch_size, len(jobs))))[::-1]
    live: dict[int, dict] = {}                      # slot -> {"episode", "obs", "info", "index"}
    finished: dict[int, dict] = {}                  # job index -> episode

    def finish(slot: int, error: str | None = None) -> None:
        state = live.pop(slot)
        episode = state["episode"]
        if error is not None:
            episode["error"] = error
        episode["n_steps"] = len(episode["steps"])
        episode["success"] = error is None and bool(state["info"].get("won", False))
        finished[state["index"]] = episode
        free.append(slot)
        if on_done is not None:
            on_done(episode)

    with EnvPool(suite, n_workers) as pool:
        while queue or live:
            starts = []
            while free and queue:
                starts.append((free.pop(), *queue.popleft()))
            pool.send([("reset", slot, job[0]) for slot, _, job in starts])  # loads overlap with generate below
            acting = sorted(live)
            samples = act([_messages(live[s], env, history) for s in acting],
                          [live[s]["info"] for s in acting]) if acting else []
            if len(samples) != len(acting):
                raise RuntimeError(f"act returned {len(samples)} samples for {len(acting)} prompts")
            for (slot, index, job), (obs, info) in zip(starts, pool.recv()):
                live[slot] = {**_new_episode(env, split, model, job, obs, info), "index": index}
                if info.get("error"):
                    finish(slot, f"reset failed: {info['error']}")
            actions = [parse_reply(sample.text, env, live[s]["info"]) for s, sample in zip(acting, samples)]
            results = pool.run([("step", s, action) for s, (action, _) in zip(acting, actions)]) if acting else []
            for slot, sample, (action, parsed), (next_obs, reward, done, info) in zip(acting, samples, actions,
                                                                                      results):
                state = live[slot]
                if info.get("error"):  # the env broke: keep the steps it really took, fail the episode
                    finish(slot, f"step failed: {info['error']}")
                    continue
                step = {"obs": state["obs"], "action": action, "response": sample.text,
                        "valid": parsed and bool(info.get("valid", True)), "next_obs": next_obs,
                        "reward": float(reward), "done": bool(done), "sample": sample}
                if state["info"].get("admissible"):  # what the agent was offered: its prompt can be rebuilt
                    step["admissible"] = state["info"]["admissible"]
                step.update((k, info[k]) for k in STEP_INFO if k in info)
                state["episode"]["steps"].append(step)
                state["obs"], state["info"] = next_obs, info
                if done or len(state["episode"]["steps"]) >= max_env_steps:
                    finish(slot)
    return [finished[i] for i in range(len(jobs))]


def strip_samples(episode: dict) -> dict:
    """The episode as written to episodes.jsonl: every step without its in-memory Sample."""
    return {**episode, "steps": [{k: v for k, v in step.items() if k != "sample"} for step in episode["steps"]]}


def wm_next_state(step: dict) -> tuple[str, dict]:
    """A triple's next state and extra meta. τ² (paper App. C.1): tool replies are masked to their OpenAPI-style
    schema, so the world model learns a reply's shape, not database values (the raw reply stays in meta), and
    the state ends with the task-completion status the world model must also predict:
    "user: <reply>\nTask status: ongoing" | "tool: <schema>\nTask status: completed"."""
    next_state, extra = step["next_obs"], {}
    if step.get("next_kind") == "tool":
        from envs.tau2 import mask_tool_reply
        prefix, sep, reply = next_state.partition(": ")  # τ² observations read "tool: <reply>"
        next_state = f"{prefix}{sep}{mask_tool_reply(reply)}" if sep else mask_tool_reply(next_state)
        extra["raw_next_state"] = step["next_obs"]
    if "task_status" in step:
        next_state += f"\nTask status: {step['task_status']}"
    return next_state, extra


def transition_triple(episode: dict, t: int, step: dict, history: int, suffix: str = "",
                      meta: dict | None = None) -> dict:
    """The triple of `step` taken at the state of episode step t: the state and the last `history` turns are the
    episode's at t, the action and next state are the step's (the episode's own step t, or an alternative action
    taken from the same state: collect.py --alternatives). id = task#rollout#t + suffix; meta adds to the meta."""
    next_state, extra = wm_next_state(step)
    context = {k: episode[k] for k in EPISODE_INFO if k in episode}
    steps = episode["steps"]
    return {
        "id": f"{episode['task_id']}#{episode['rollout']}#{t}{suffix}", "env": episode["env"],
        "task_id": episode["task_id"], "instruction": episode["instruction"], "history": recent(steps, t, history),
        "state": steps[t]["obs"], "action": step["action"], "next_state": next_state,
        "next_kind": step.get("next_kind", "obs"),
        "meta": {"split": episode["split"], "rollout": episode["rollout"], "t": t, "model": episode["model"],
                 "reward": step["reward"], "done": step["done"], **context, **extra, **(meta or {})}}


def is_transition(step: dict) -> bool:
    """A step that becomes a triple: text games keep valid actions only (paper); τ² keeps a tool call it executed
    but answered with an error (a real transition, and what teaches the model which calls fail) and drops only
    replies it could not parse at all (step "executed" False); a step the env did not answer (τ² can end a
    conversation with no reply, e.g. on the agent's `done` or at its step limit) has nothing to predict."""
    return bool((step["valid"] or step.get("executed", False)) and step["next_obs"])


def episode_triples(episode: dict, history: int) -> list[dict]:
    """RWML triples (paper §2.2; common.TRIPLE_KEYS): one per step that is_transition, <last `history` turns, state, action,
    next state>. The history counts every earlier step, invalid ones too: it is what the agent saw (τ² uses 5
    turns, ALFWorld 2: collect.py's --history). id = task#rollout#t."""
    return [transition_triple(episode, t, step, history) for t, step in enumerate(episode["steps"])
            if is_transition(step)]


def step_messages(episode: dict, t: int, history: int) -> list[dict]:
    """The text-game agent prompt of episode step t, rebuilt from the episode: what the agent saw there (with the
    admissible actions it was offered). A τ² agent's prompt is τ²'s live conversation, which episodes do not keep
    per step, so τ² steps cannot be rebuilt here."""
    if episode["env"] == "tau2":
        raise ValueError(f"{episode['task_id']}: τ² agent prompts are τ²'s own conversation, not kept per step in "
                         "episodes.jsonl; agent examples (IL, SR, the format cold start) need text-game episodes")
    steps = episode["steps"]
    return agent_messages(episode["instruction"], recent(steps, t, history), steps[t]["obs"],
                          steps[t].get("admissible"), t, episode["env"])


def agent_examples(episode: dict, history: int) -> list[tuple[list[dict], str]]:
    """(agent prompt, reply) for every valid step: the prompt the agent saw and the action it took, in the answer
    format with an empty thought. What they teach depends on who acted: on expert episodes (collect.py --policy
    expert) they are imitation learning (Early Experience's IL); on episodes of random admissible actions
    (collect.py --explore 1) the format and nothing about the task (the miniature's cold start, run.sh --quick)."""
    return [(step_messages(episode, t, history), format_reply(step["action"]))
            for t, step in enumerate(episode["steps"]) if step["valid"]]
