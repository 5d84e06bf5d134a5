"""Prompts and response parsing: the agent prompt (verl-agent style), the RWML world-model prompt (paper
Tables A4/A6), and tag extraction that never raises, whatever the model wrote."""
from __future__ import annotations

ENV_INTRO = {
    "alfworld": "You are an expert agent operating in the ALFRED Embodied Environment.",
    "twx": "You are an expert agent playing a text-based game.",
}

ACTION_KINDS = {"tau2": ": either one tool call (only its JSON object) or your message to the user."}


def _history_text(history: list[dict]) -> str:
    return "\n".join(f"[Observation {i + 1}: {h['obs']!r}, Action {i + 1}: {h['action']!r}]"
                     for i, h in enumerate(history))


def agent_messages(instruction: str, history: list[dict], obs: str, admissible: list[str] | None, step: int,
                   env: str, system: str | None = None) -> list[dict]:
    """One agent turn. `history` = the last H {"obs", "action"} pairs (the prompt is rebuilt each step, as in
    verl-agent, so every step is one prompt + one sampled response). `system` (τ²) replaces the env intro.
    The message's "obs_chars" [start, end) is where `obs` lies in its content (chat templates read only "role" and
    "content"): common.chat_ids_with_span turns it into the observation's token span (ECHO, train_rwml)."""
    parts = [system or ENV_INTRO.get(env, ENV_INTRO["twx"]), f"Your task is to: {instruction}"]
    if history:
        parts.append(f"Prior to this step, you have already taken {step} step(s). Below are the most recent "
                     f"{len(history)} observations and the corresponding actions you took:\n{_history_text(history)}")
    parts.append(f"You are now at step {step + 1} and your current observation is: ")
    obs_start = sum(len(p) + 1 for p in parts) - 1   # the parts are joined by "\n"
    parts[-1] += obs
    if admissible:
        parts.append("Your admissible actions of the current situation are: [" +
                     ", ".join(repr(a) for a in admissible) + "].")
    parts.append("Now it's your turn to take an action. First reason step by step about the current situation "
                 "inside <think> </think> tags. Then give exactly one action for this step inside "
                 "<action> </action> tags" + (", chosen from the admissible actions." if admissible else
                                              ACTION_KINDS.get(env, ".")))
    return [{"role": "user", "content": "\n".join(parts), "obs_chars": [obs_start, obs_start + len(obs)]}]


def last_block(text: str, tag: str) -> str | None:
    """Content of the last <tag>...</tag> block, stripped; None when there is no complete block."""
    end = text.rfind(f"</{tag}>")
    if end < 0:
        return None
    start = text.rfind(f"<{tag}>", 0, end)
    if start < 0:
        return None
    return text[start + len(tag) + 2:end].strip()


def has_format(text: str, answer_tag: str) -> bool:
    """<think>…</think> followed by a non-empty <answer_tag> block: the format both tasks ask for."""
    answer = last_block(text, answer_tag)
    return last_block(text, "think") is not None and bool(answer)


def parse_action(text: str, admissible: list[str] | None) -> tuple[str, bool]:
    """-> (action to send to the env, valid). Text games (admissible given): lowercased; invalid when the tags are
    missing, the action is empty, multi-line, non-ASCII, or not admissible; the env is stepped with it anyway and
    answers as the game would ("Nothing happens."). Without an admissible list (τ²) the env judges validity."""
    action = last_block(text, "action")
    if action is None:
        return "", False
    if admissible is None:
        return action, bool(action)
    action = action.lower()
    valid = bool(action) and action.isascii() and "\n" not in action and action in admissible
    return action, valid


# ----------------------------------------------------------------------------------------------------------
# World model (RWML §2.2): predict s_{t+1} from (history, s_t, a_t); reason in <think>, answer in <next_state>.

# Table A4's task sentence and its hint to learn from the history; then how to answer: RWML reasons first (§2.2),
# the WM SFT baseline answers directly (its label is "<think> </think>\n<next_state> s </next_state>", no thought).
WM_TASK = ("Your task now is to predict the immediate next observation the environment returns after the potential "
           "action. Use the past and current observations as examples of how the environment responds.")
WM_TASK_TAU2 = ("Your task now is to predict the immediate next response to the potential assistant response: the "
                "tool's reply if it is a tool call (as \"tool: \" + the JSON schema of the reply, values left out), "
                "else the user's reply (as \"user: \" + the message), and the task completion status after it. Use "
                "the past and current turns of the history as examples of how the tools and the user respond.")
WM_ANSWER_TAU2 = ("the predicted response followed by a line \"Task status: completed\" if the conversation ends "
                  "there or \"Task status: ongoing\" otherwise")
WM_ANSWER = {  # style -> (text games, τ²)
    "rwml": ("First reason step by step inside <think> </think> tags, then give the predicted next observation "
             "inside <next_state> </next_state> tags.",
             f"First reason step by step inside <think> </think> tags, then give inside <next_state> </next_state> "
             f"tags {WM_ANSWER_TAU2}."),
    "sft": ("Give your final prediction directly, without reasoning: write <think> </think>, then the predicted "
            "next observation inside <next_state> </next_state> tags.",
            f"Give your final prediction directly, without reasoning: write <think> </think>, then inside "
            f"<next_state> </next_state> tags {WM_ANSWER_TAU2}."),
}


def wm_messages(triple: dict, style: str = "rwml") -> list[dict]:
    """The world-model prompt for one triple (Table A4 for text games, Table A6 for τ²). style "rwml": reason,
    then predict (RWML); "sft": the paper's WM SFT prompt, the final prediction directly (WM SFT and the filter
    model, which are trained on labels without a thought)."""
    if style not in WM_ANSWER:
        raise ValueError(f"wm_messages: style must be one of {sorted(WM_ANSWER)}, got {style!r}")
    answer, answer_tau2 = WM_ANSWER[style]
    if triple["env"] == "tau2":
        meta = triple.get("meta", {})
        history = "\n".join(f"{h['obs']}\nassistant: {h['action']}" for h in triple["history"])
        content = "\n\n".join([meta.get("system_prompt", ""), "# User Information\n" + meta.get("user_info", ""),
                               "# History\n" + (history + "\n" if history else "") + triple["state"],
                               "# Potential assistant response\n" + triple["action"], WM_TASK_TAU2 + " " + answer_tau2])
        return [{"role": "user", "content": content}]
    parts = [ENV_INTRO.get(triple["env"], ENV_INTRO["twx"]), f"Your task is to: {triple['instruction']}"]
    if triple["history"]:
        parts.append(f"Below are the most recent {len(triple['history'])} observations and the actions taken:\n"
                     + _history_text(triple["history"]))
    parts += [f"Your current observation is: {triple['state']}", f"Potential action: {triple['action']}",
              WM_TASK + " " + answer]
    return [{"role": "user", "content": "\n".join(parts)}]


def extract_next_state(text: str) -> str:
    """The reward's input (paper §2.2): the last <next_state> block; missing or empty -> "none"."""
    return last_block(text, "next_state") or "none"


def wm_sft_target(next_state: str) -> str:
    """WM SFT label (paper's baseline): an empty thought, then the true next state."""
    return f"<think> </think>\n<next_state> {next_state} </next_state>"


def format_reply(action: str) -> str:
    """An agent reply in the answer format with an empty thought (the cold start's format-only label)."""
    return f"<think> </think>\n<action> {action} </action>"
