"""prompts.py: agent/world-model prompts and tag parsing that never raises, whatever the model wrote."""
import pytest

import json

from prompts import (agent_messages, agent_reply_ok, extract_next_state, last_block, parse_action, parse_tool_call,
                     parse_tool_reply, tools_in_text, wm_messages, wm_sft_target)

ADMISSIBLE = ["go to desk 1", "open drawer 2", "look", "inventory"]

HOSTILE = [
    "", "<action>", "</action>", "</action><action>", "<action></action>", "<action>   </action>",
    "<action><action>look</action", "<<action>>look<</action>>", "\x00\x01<action>\x00</action>",
    "<action>LOOK 👀</action>", "<action>ｌｏｏｋ</action>", "<action>go to desk 1\nopen drawer 2</action>",
    "<think>" * 10_000, "<action>" + "a" * 200_000 + "</action>", "\ud800 lone surrogate <action>look</action>",
    "<next_state>" * 5000 + "</next_state>" * 5000, "</think><think></action><action>",
]


@pytest.mark.parametrize("text", HOSTILE)
def test_parsing_never_raises_on_garbage(text):
    for admissible in (ADMISSIBLE, None, []):
        action, valid = parse_action(text, admissible)
        assert isinstance(action, str) and isinstance(valid, bool)
    assert isinstance(extract_next_state(text), str)
    assert isinstance(last_block(text, "think"), (str, type(None)))
    for reply in (text, f"<tool_call>{text}</tool_call>", "<tool_call>" + text, text + "<tool_call>{"):
        action, ok = parse_tool_reply(reply)
        assert isinstance(action, str) and isinstance(ok, bool)


def test_last_complete_action_block_wins():
    text = "<think>first <action>look</action> no</think><action>go to desk 1</action> then <action>open drawer 2"
    assert parse_action(text, ADMISSIBLE) == ("go to desk 1", True)
    assert parse_action("<action>look</action><action>inventory</action>", ADMISSIBLE) == ("inventory", True)


def test_action_is_lowercased_and_stripped_and_checked_against_admissible():
    assert parse_action("<think>x</think><action>  Go To Desk 1 \n</action>", ADMISSIBLE) == ("go to desk 1", True)
    assert parse_action("<action>go to desk 7</action>", ADMISSIBLE) == ("go to desk 7", False)
    assert parse_action("<action>look</action>", []) == ("look", False)      # empty admissible list: nothing is
    assert parse_action("look", ADMISSIBLE) == ("", False)                   # no tags
    assert parse_action("<action> </action>", ADMISSIBLE) == ("", False)     # empty action
    assert parse_action("<action>go to desk 1\nlook</action>", ADMISSIBLE + ["go to desk 1\nlook"])[1] is False
    action, valid = parse_action("<action>löök</action>", ADMISSIBLE + ["löök"])  # non-ASCII is never valid
    assert not valid and action == "löök"


def test_without_admissible_list_the_raw_action_goes_to_the_env():
    # an env without an admissible list: case kept, the env judges validity
    call = '{"name": "Get_Order", "arguments": {"order_id": "#W1"}}'
    assert parse_action(f"<think>t</think><action> {call} </action>", None) == (call, True)
    assert parse_action("<action></action>", None) == ("", False)
    assert parse_action("no tags", None) == ("", False)


def test_extract_next_state_last_block_or_none():
    assert extract_next_state("<next_state>a</next_state> <next_state> b </next_state>") == "b"
    assert extract_next_state("<next_state>  </next_state>") == "none"
    assert extract_next_state("<next_state>cut off") == "none"
    assert extract_next_state(wm_sft_target("You see a mug 1.")) == "You see a mug 1."


def test_agent_prompt_holds_instruction_history_obs_and_admissible():
    history = [{"obs": "You are in the middle of a room.", "action": "go to desk 1"},
               {"obs": "You arrive at desk 1.", "action": "open drawer 2"}]
    msgs = agent_messages("put a mug in the desk.", history, "You open the drawer 2.", ADMISSIBLE, 2, "alfworld")
    assert [m["role"] for m in msgs] == ["user"]
    text = msgs[0]["content"]
    for piece in ["ALFRED", "put a mug in the desk.", "already taken 2 step(s)", "You arrive at desk 1.",
                  "'open drawer 2'", "step 3", "You open the drawer 2.", "'inventory'", "<think>", "<action>"]:
        assert piece in text
    first = agent_messages("t", [], "start", None, 0, "twx")[0]["content"]
    assert first.startswith("You are an expert agent playing") and "already taken" not in first
    assert "admissible" not in first


CALL = {"name": "get_order_details", "arguments": {"order_id": "#W1"}}


@pytest.mark.parametrize("reply, action, ok", [
    # the Hermes format of Qwen's templates, with or without reasoning first; text beside the call is dropped
    (f"<tool_call>\n{json.dumps(CALL)}\n</tool_call>", json.dumps(CALL), True),
    (f"<think>I need the order.</think>\n<tool_call>{json.dumps(CALL)}</tool_call>", json.dumps(CALL), True),
    (f"Let me check. <tool_call>{json.dumps(CALL)}</tool_call>", json.dumps(CALL), True),
    # a bare JSON call (Llama 3 writes "parameters"), normalised to the env's {"name", "arguments"}
    (json.dumps({"name": "get_order_details", "parameters": {"order_id": "#W1"}}), json.dumps(CALL), True),
    ('{"name": "done"}', '{"name": "done", "arguments": {}}', True),
    # a message to the user, without its reasoning
    ("<think>greet</think> Hello! What is your order id?", "Hello! What is your order id?", True),
    # malformed calls go to the env as written (it answers with its error); empty replies are ""
    ('<tool_call>{"name": "get_order_details", "arguments": {"order_id": </tool_call>',
     '<tool_call>{"name": "get_order_details", "arguments": {"order_id": </tool_call>', False),
    (f"<tool_call>{json.dumps(CALL)}", f"<tool_call>{json.dumps(CALL)}", False),  # never closed
    (f"<tool_call>{json.dumps(CALL)}</tool_call><tool_call>{json.dumps(CALL)}</tool_call>",
     f"<tool_call>{json.dumps(CALL)}</tool_call><tool_call>{json.dumps(CALL)}</tool_call>", False),  # two calls
    ("<tool_call>hello</tool_call>", "<tool_call>hello</tool_call>", False),
    ('{"tool": "x"}', '{"tool": "x"}', False),
    ("<think>still thinking when the token cap hit", "", False),
    ("   ", "", False),
])
def test_tool_reply_becomes_the_env_action(reply, action, ok):
    assert parse_tool_reply(reply) == (action, ok)
    assert agent_reply_ok(reply, "tau2") is ok
    if not ok and action:  # the env's own parse names what is wrong
        with pytest.raises(ValueError):
            parse_tool_call(action)


def test_agent_reply_format_depends_on_the_env():
    assert agent_reply_ok("<think>x</think><action>look</action>", "alfworld")
    assert not agent_reply_ok("look", "alfworld") and agent_reply_ok("look", "tau2")  # τ²: a message
    assert not agent_reply_ok(f"<tool_call>{json.dumps(CALL)}</tool_call>", "twx")


def test_tools_in_text_for_templates_without_tools():
    tools = [{"type": "function", "function": {"name": "get_order_details", "parameters": {}}}]
    chat = [{"role": "system", "content": "POLICY"}, {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "", "tool_calls": [{"id": "c0", "type": "function", "function": CALL}]},
            {"role": "tool", "tool_call_id": "c0", "content": '{"status": "pending"}'},
            {"role": "assistant", "content": "It is pending."}]
    out = tools_in_text(chat, tools)
    assert [m["role"] for m in out] == ["system", "user", "assistant", "user", "assistant"]
    assert out[0]["content"].startswith("POLICY\n\n# Tools\n") and json.dumps(tools[0]) in out[0]["content"]
    assert "<tool_call>" in out[0]["content"]  # the format the model is asked to use
    assert out[2]["content"] == f"<tool_call>{json.dumps(CALL)}</tool_call>"
    assert parse_tool_reply(out[2]["content"]) == (json.dumps(CALL), True)  # what it is shown, it can write back
    assert out[3]["content"] == '<tool_response>\n{"status": "pending"}\n</tool_response>'
    assert all(set(m) == {"role", "content"} for m in out) and chat[0]["content"] == "POLICY"  # input untouched
    assert tools_in_text([{"role": "user", "content": "hi"}], tools)[0]["role"] == "system"


def test_wm_prompt_for_text_games_and_tau2():
    triple = {"env": "alfworld", "instruction": "heat an egg.", "history": [{"obs": "o1", "action": "a1"}],
              "state": "You arrive at microwave 1.", "action": "open microwave 1", "next_state": "THE-ANSWER"}
    text = wm_messages(triple)[0]["content"]
    assert "heat an egg." in text and "'a1'" in text and "Potential action: open microwave 1" in text
    assert "<next_state>" in text and "THE-ANSWER" not in text   # the prompt never leaks the label
    tau = {"env": "tau2", "instruction": "", "history": [{"obs": "user: hi", "action": "hello"}],
           "state": "user: cancel it", "action": '{"name": "cancel"}', "next_state": "THE-ANSWER",
           "meta": {"system_prompt": "You are a retail agent.", "user_info": "name: Ann"}}
    text = wm_messages(tau)[0]["content"]
    for piece in ["You are a retail agent.", "# User Information\nname: Ann", "user: hi\nassistant: hello",
                  "user: cancel it", '# Potential assistant response\n{"name": "cancel"}', "completion status"]:
        assert piece in text
    assert "THE-ANSWER" not in text


def test_wm_prompt_styles_rwml_reasons_sft_predicts_directly():
    """RWML asks for reasoning then the prediction; the paper's WM SFT prompt asks for the prediction directly
    (its label has an empty thought). Both keep Table A4's hint to learn from the observations shown."""
    for triple in ({"env": "alfworld", "instruction": "heat an egg.", "history": [], "state": "s", "action": "a"},
                   {"env": "tau2", "instruction": "", "history": [], "state": "user: hi", "action": "hello",
                    "meta": {"system_prompt": "SYS", "user_info": "name: Ann"}}):
        rwml, sft = (wm_messages(triple, style)[0]["content"] for style in ("rwml", "sft"))
        assert "reason step by step" in rwml and "directly" not in rwml
        assert "directly" in sft and "reason step by step" not in sft and "<next_state>" in sft
        assert "past and current" in rwml and "past and current" in sft
        assert wm_messages(triple)[0]["content"] == rwml   # RWML is the default
    with pytest.raises(ValueError, match="style"):
        wm_messages(triple, "paper")
