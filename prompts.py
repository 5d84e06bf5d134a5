"""Prompts and response parsing: the text-game agent prompt (verl-agent style), τ²'s tool calls in the chat
template's format, the RWML world-model prompt (paper Tables A4/A6), and tag extraction that never raises,
whatever the model wrote."""
from __future__ import annotations

import json

ENV_INTRO = {
    "alfworld": "You are an expert agent operating in the ALFRED Embodied Environment.",
    "twx": "You are an expert agent playing a text-based game.",
}


def _history_text(history: list[dict]) -> str:
    return "\n".join(f"[Observation {i + 1}: {h['obs']!r}, Action {i + 1}: {h['action']!r}]"
                     for i, h in enumerate(history))


def agent_messages(instruction: str, history: list[dict], obs: str, admissible: list[str] | None, step: int,
                   env: str) -> list[dict]:
    """One text-game agent turn. `history` = the last H {"obs", "action"} pairs (the prompt is rebuilt each step,
    as in verl-agent, so every step is one prompt + one sampled response). τ² agents see τ²'s own prompt instead
    (the env's info["messages"], with its tools through the chat template: common.chat_ids).
    The message's "obs_chars" [start, end) is where `obs` lies in its content (chat templates read only "role" and
    "content"): common.chat_ids_with_span turns it into the observation's token span (ECHO, train_rwml)."""
    parts = [ENV_INTRO.get(env, ENV_INTRO["twx"]), f"Your task is to: {instruction}"]
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
                 "<action> </action> tags" + (", chosen from the admissible actions." if admissible else "."))
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
    answers as the game would ("Nothing happens."). Without an admissible list the env judges validity. τ² replies
    are parsed by parse_tool_reply instead."""
    action = last_block(text, "action")
    if action is None:
        return "", False
    if admissible is None:
        return action, bool(action)
    action = action.lower()
    valid = bool(action) and action.isascii() and "\n" not in action and action in admissible
    return action, valid


# ----------------------------------------------------------------------------------------------------------
# τ² (paper: τ²'s own agent prompt and tool calling): the model sees τ²'s system prompt and the whole conversation
# as chat messages, its tools through the chat template (`tools=`), and replies with one tool call in the template's
# format or a message to the user. Qwen2.5/Qwen3 templates (the paper's models) use the Hermes convention
# <tool_call>{"name": ..., "arguments": {...}}</tool_call>; a template that does not render tools (SmolLM2's) gets
# the same convention written into the chat by tools_in_text.

TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<tool_call>", "</tool_call>"
MAX_ARG_DEPTH = 32  # deeper arguments are rejected: τ² copies and serializes every message, failing past ~250
TOOLS_TEXT = ("# Tools\nTo call a tool, reply with only " + TOOL_CALL_OPEN + '{{"name": <tool name>, "arguments": '
              '{{<argument>: <value>}}}}' + TOOL_CALL_CLOSE + ", one call per turn. Any other reply is sent to the "
              "user as your message.\n<tools>\n{tools}\n</tools>")


def _depth(value) -> int:
    if isinstance(value, dict):
        return 1 + max(map(_depth, value.values()), default=0)
    if isinstance(value, list):
        return 1 + max(map(_depth, value), default=0)
    return 0


def parse_tool_call(text: str) -> tuple[str, dict] | None:
    """(name, arguments) if text is a tool call, None if it is a message; ValueError (saying why) for a malformed
    call. A call is one JSON object {"name": str, "arguments": {...}} ("parameters" is taken for "arguments", as
    Llama 3 templates write it), bare or in one <tool_call></tool_call> block; text starting with "{" or
    <tool_call> is a call attempt."""
    text = text.strip()
    if text.startswith(TOOL_CALL_OPEN):
        body, closed, rest = text[len(TOOL_CALL_OPEN):].partition(TOOL_CALL_CLOSE)
        if not closed:
            raise ValueError(f"the tool call is not closed by {TOOL_CALL_CLOSE}")
        if TOOL_CALL_OPEN in rest:
            raise ValueError("one tool call per turn")
        text = body.strip()
        if not text.startswith("{"):
            raise ValueError('a tool call must be one JSON object {"name": <tool name>, "arguments": {...}}')
    elif not text.startswith("{"):
        return None
    try:
        call = json.loads(text)
    except (ValueError, RecursionError) as e:
        raise ValueError(f"the tool call is not valid JSON ({type(e).__name__}: {str(e)[:200]})") from None
    if isinstance(call, dict) and set(call) == {"name", "parameters"}:
        call = {"name": call["name"], "arguments": call["parameters"]}
    if not (isinstance(call, dict) and set(call) <= {"name", "arguments"} and isinstance(call.get("name"), str)
            and isinstance(call.get("arguments", {}), dict)):
        raise ValueError('a tool call must be one JSON object {"name": <tool name>, "arguments": {...}}')
    arguments = call.get("arguments", {})
    if _depth(arguments) > MAX_ARG_DEPTH:
        raise ValueError(f"the tool call's arguments are nested deeper than {MAX_ARG_DEPTH} levels")
    return call["name"], arguments


def strip_thinking(text: str) -> str:
    """The reply without its reasoning: what follows the last </think> (Qwen3 thinks first). A reply that opens
    <think> and never closes it was all reasoning (cut at the token cap): nothing."""
    if "</think>" in text:
        return text.rsplit("</think>", 1)[1].strip()
    return "" if "<think>" in text else text.strip()


def parse_tool_reply(text: str) -> tuple[str, bool]:
    """A τ² agent reply -> (action for the env, well-formed). The reasoning is dropped (strip_thinking), and so is
    any text before a <tool_call> (τ² sends the call). A well-formed call becomes the env's call JSON
    {"name", "arguments"}; a reply without one is the message to the user. A malformed call (bad JSON, an unclosed
    block, two calls) goes to the env as written, which answers it with its error: an invalid action, not a crash.
    An empty reply is "" (the env rejects it too)."""
    reply = strip_thinking(text)
    start = reply.find(TOOL_CALL_OPEN)
    reply = reply[start:] if start >= 0 else reply
    try:
        call = parse_tool_call(reply)
    except ValueError:
        return reply, False
    if call is None:
        return reply, bool(reply)
    return json.dumps({"name": call[0], "arguments": call[1]}), True


def tools_in_text(messages: list[dict], tools: list[dict]) -> list[dict]:
    """The chat for a template that does not render tools: the tool list and call format appended to the system
    message (TOOLS_TEXT), past calls written as <tool_call> blocks in the assistant's content and tool replies as
    user turns in <tool_response> blocks, the convention Qwen's templates render them in."""
    out = []
    for m in messages:
        if m.get("tool_calls"):
            calls = [TOOL_CALL_OPEN + json.dumps({"name": c["function"]["name"],
                                                  "arguments": c["function"]["arguments"]}) + TOOL_CALL_CLOSE
                     for c in m["tool_calls"]]
            m = {"role": "assistant", "content": "\n".join(filter(None, [m.get("content") or "", *calls]))}
        elif m["role"] == "tool":
            m = {"role": "user", "content": f"<tool_response>\n{m['content']}\n</tool_response>"}
        out.append({"role": m["role"], "content": m.get("content") or ""})
    text = TOOLS_TEXT.format(tools="\n".join(json.dumps(t) for t in tools))
    if out and out[0]["role"] == "system":
        out[0] = {"role": "system", "content": f"{out[0]['content']}\n\n{text}"}
    else:
        out.insert(0, {"role": "system", "content": text})
    return out


def agent_reply_ok(text: str, env: str) -> bool:
    """Does an agent reply follow its env's answer format? Text games: <think>…</think> then a non-empty <action>
    block (has_format); τ²: a well-formed tool call or a non-empty message (parse_tool_reply). The policy reward's
    format penalty and train_rwml's format_error_rate count the replies that do not."""
    return parse_tool_reply(text)[1] if env == "tau2" else has_format(text, "action")


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


def format_reply(action: str, thought: str = "") -> str:
    """An agent reply in the answer format: the action after a thought, empty by default (the label of the cold
    start's format-only examples and of imitation learning; self-reflection puts its rationale there)."""
    return f"<think> {thought + ' ' if thought else ''}</think>\n<action> {action} </action>"


# ----------------------------------------------------------------------------------------------------------
# Self-reflection (Early Experience's SR baseline, RWML Table 2): from an expert state, the model sees what the
# expert action and a few alternative actions led to, and explains why the expert action is the better one.

def reflection_messages(triple: dict, expert_action: str, expert_outcome: str,
                        alternatives: list[tuple[str, str]]) -> list[dict]:
    """The rationale prompt at the state of `triple` (an alternative-action triple: its instruction, history,
    state and meta hold the expert state): the task and the situation as the agent saw it, then each action
    with the observation it led to, the expert's first, then the request for a rationale alone."""
    system = triple.get("meta", {}).get("system_prompt")
    parts = [system or ENV_INTRO.get(triple["env"], ENV_INTRO["twx"]), f"Your task is to: {triple['instruction']}"]
    if triple["history"]:
        parts.append(f"Below are the most recent {len(triple['history'])} observations and the actions taken:\n"
                     + _history_text(triple["history"]))
    parts.append(f"Your current observation is: {triple['state']}")
    tried = [(expert_action, expert_outcome)] + list(alternatives)
    parts.append("Here is what each candidate action leads to:\n" + "\n".join(
        f"- Action {a!r} -> observation: {o!r}" for a, o in tried))
    parts.append(f"The expert chose {expert_action!r}. In a few sentences, explain why {expert_action!r} is a "
                 "better step towards the task than the other actions, judging by what they lead to. Write only the "
                 "explanation: no tags, no action.")
    return [{"role": "user", "content": "\n".join(parts)}]


def clean_rationale(text: str) -> str:
    """The rationale as the thought of an SR example: cut at the first answer-format tag the model wrote (a tag
    inside the thought would break the example's format), stripped; "" when nothing is left."""
    cut = min((i for tag in ("<think>", "</think>", "<action>", "</action>") if (i := text.find(tag)) >= 0),
              default=len(text))
    return text[:cut].strip()
