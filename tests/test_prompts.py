"""prompts.py: agent/world-model prompts and tag parsing that never raises, whatever the model wrote."""
import pytest

from prompts import agent_messages, extract_next_state, last_block, parse_action, wm_messages, wm_sft_target

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
    # τ²: no admissible list, case kept (tool names, JSON arguments), the env judges validity
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
    first = agent_messages("t", [], "start", None, 0, "twx", system="SYSTEM PROMPT")[0]["content"]
    assert first.startswith("SYSTEM PROMPT") and "already taken" not in first and "admissible" not in first


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
