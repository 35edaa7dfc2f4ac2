"""Sampling with the KV cache: batched generation for chat, labelling and RL rollouts.

Choices:
- Prefill then one token per step, through the model's own cache (for MLA that is the
  compressed latent plus the rope key). The model takes one ``start_pos`` for the whole
  batch and has no padding mask, so prompts of different lengths are *right*-padded and
  the batch advances in lock-step: the prefill covers the shortest prompt, and at every
  later position a row that still has prompt tokens is fed its own prompt token instead
  of the sampled one (Meta's original LLaMA recipe). No row ever attends to padding and
  every token sits at its true position, so a batch gives the same greedy tokens as each
  prompt alone. The price is that prompt tokens beyond the shortest prompt are fed one
  step at a time; rollouts use prompts of similar length, where that is cheap.
- Sampling: temperature (<= 0 means greedy), then top-k, then top-p (nucleus) on the
  tempered distribution; one ``torch.Generator`` makes runs reproducible.
- Log-probs are of the chosen token under the *unmodified* model distribution
  (log_softmax of the raw logits, temperature 1, no truncation): that is the policy
  probability GRPO's importance ratio and KL need, whatever sampling knobs were used.
- A row stops at its first stop token (kept in its output, because the policy must learn
  to emit it), at ``max_new_tokens``, or at the model's context length.
- Chat template (shared with SFT through ``moeforge.data.tokenizer.encode_chat``)::

      <|bos|><|system|>{system}<|end|><|user|>{user}<|end|><|assistant|>{answer}<|end|>...

  :func:`render_chat` appends ``<|assistant|>`` so the model writes the next answer;
  generation stops at ``<|end|>`` (or ``<|eos|>``). Role tokens are single special ids
  placed by the template, never by text.
- Tokenizer and model are passed in (``ChatTokenizer`` protocol); :func:`load_for_chat`
  is the one place that knows the checkpoint and tokenizer file layout.
"""

from __future__ import annotations

import argparse
import secrets
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol, Sequence

import torch

from moeforge.errors import UserError


class ChatTokenizer(Protocol):
    """What generation and the chat template need from a tokenizer (MoeTokenizer fits)."""

    bos_id: int
    eos_id: int
    end_id: int
    role_ids: dict[str, int]

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


@dataclass
class Generation:
    """Per prompt: the new tokens (stop token included), their log-probs, and why it ended."""

    tokens: list[list[int]]
    logprobs: list[list[float]]
    finished: list[bool]  # True: ended on a stop token; False: hit max_new_tokens or the context


# ----------------------------------------------------------------------------- template
def render_chat(messages: list[dict], tokenizer: ChatTokenizer, add_generation_prompt: bool = True) -> list[int]:
    """Token ids of a conversation in the chat template, ready for the assistant to answer."""
    from moeforge.data.tokenizer import encode_chat  # the one template, also used by SFT

    ids, _ = encode_chat(tokenizer, messages)
    return ids + [tokenizer.role_ids["assistant"]] if add_generation_prompt else ids


def stop_ids_of(tokenizer: ChatTokenizer) -> list[int]:
    return [tokenizer.end_id, tokenizer.eos_id]


# ----------------------------------------------------------------------------- sampling
def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """One token id per row of ``logits`` [B, V]."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # drop a token when the tokens before it already reach top_p (the first always stays)
        drop = probs.cumsum(dim=-1) - probs >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(-1)


@torch.inference_mode()
def generate(model, prompts: Sequence[Sequence[int]], max_new_tokens: int = 128, temperature: float = 1.0,
             top_k: int = 0, top_p: float = 1.0, stop_ids: Sequence[int] = (), seed: int | None = None,
             generator: torch.Generator | None = None,
             on_token: Callable[[int, int], None] | None = None) -> Generation:
    """Sample continuations of token-id ``prompts`` (any lengths) with the KV cache.

    ``generator`` (or ``seed``) fixes the sampling randomness; ``on_token(row, token)`` is
    called for each new token as it is produced (streaming chat).
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise UserError("generate: every prompt needs at least one token")
    if max_new_tokens < 1:
        raise UserError(f"generate: max_new_tokens must be >= 1, got {max_new_tokens}")
    if not (0.0 < top_p <= 1.0) or top_k < 0:
        raise UserError(f"generate: need 0 < top_p <= 1 and top_k >= 0, got top_p={top_p}, top_k={top_k}")
    ctx = model.cfg.max_seq_len
    lens = [len(p) for p in prompts]
    if max(lens) >= ctx:
        row = lens.index(max(lens))
        raise UserError(f"generate: prompt {row} has {lens[row]} tokens; the model's context is {ctx}")
    dev = model.embed.weight.device
    if generator is None and seed is not None:
        generator = torch.Generator(device=dev).manual_seed(seed)
    bsz, total = len(prompts), min(ctx, max(lens) + max_new_tokens)
    buf = torch.zeros(bsz, total, dtype=torch.long, device=dev)  # prompt + generated tokens, right-padded
    for i, p in enumerate(prompts):
        buf[i, : len(p)] = torch.as_tensor(list(p), dtype=torch.long)
    plen = torch.tensor(lens, device=dev)
    budget = torch.clamp(total - plen, max=max_new_tokens)  # new tokens each row may still write
    logp = torch.zeros(bsz, total, device=dev)
    n_new = torch.zeros(bsz, dtype=torch.long, device=dev)
    stopped = torch.zeros(bsz, dtype=torch.bool, device=dev)
    stops = torch.tensor(sorted(set(stop_ids)), dtype=torch.long, device=dev)

    was_training = model.training
    model.eval()
    try:
        cache = model.new_cache(bsz, total)
        start = min(lens)
        logits = model(buf[:, :start], 0, cache, with_mtp=False).logits[:, -1]
        for pos in range(start, total):
            nxt = sample_next(logits, temperature, top_k, top_p, generator)
            in_prompt = pos < plen
            active = ~in_prompt & ~stopped & (n_new < budget)
            tok = torch.where(in_prompt, buf[:, pos], nxt)
            buf[:, pos] = torch.where(active | in_prompt, tok, buf[:, pos])
            logp[:, pos] = torch.log_softmax(logits.float(), dim=-1).gather(-1, tok[:, None]).squeeze(-1)
            n_new += active.long()
            stopped |= active & torch.isin(tok, stops)
            if on_token is not None:
                for row in active.nonzero().flatten().tolist():
                    on_token(row, int(tok[row]))
            if bool((stopped | (n_new >= budget)).all()) or pos + 1 == total:
                break
            logits = model(buf[:, pos : pos + 1], pos, cache, with_mtp=False).logits[:, -1]
    finally:
        model.train(was_training)

    toks, lps, counts = buf.tolist(), logp.tolist(), n_new.tolist()
    return Generation(
        tokens=[toks[i][lens[i] : lens[i] + counts[i]] for i in range(bsz)],
        logprobs=[lps[i][lens[i] : lens[i] + counts[i]] for i in range(bsz)],
        finished=stopped.tolist(),
    )


# ----------------------------------------------------------------------------- loading
def load_for_chat(checkpoint_dir: str | Path, config=None, tokenizer_path: str | Path | None = None,
                  device: str | None = None):
    """(model, tokenizer) from a checkpoint written by the trainer (a step dir, or a run's newest).

    The model config comes from ``config`` when given, else from the checkpoint's
    ``state.json``. The tokenizer is ``tokenizer_path``, else ``tokenizer.json`` beside the
    weights, else the config's data tokenizer. MTP modules are dropped (not used to decode).
    """
    import dataclasses

    from moeforge.config import load_config
    from moeforge.data.tokenizer import load_tokenizer
    from moeforge.model.transformer import Transformer
    from moeforge.train import checkpoint
    from moeforge.train.post_common import load_weights

    path = Path(checkpoint_dir)
    if not path.exists():
        raise UserError(f"checkpoint {path} does not exist")
    if path.is_dir() and not (path / "model.safetensors").exists() and not (path / checkpoint.MARKER).exists():
        path = checkpoint.resolve(path, path)  # a run or checkpoints dir: its newest valid step
    state = checkpoint.verify(path)
    if config is None:  # the saved model and data sections (known fields only); training settings do not matter
        base = load_config(None)
        saved = state.get("config") or {}
        config = load_config(None, {
            f"{sec}.{k}": v for sec in ("model", "data") for k, v in saved.get(sec, {}).items()
            if k in {f.name for f in dataclasses.fields(getattr(base, sec))}})
    model = Transformer(config.model).drop_mtp()
    load_weights(model, path)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = model.to(dev).eval()
    if dev.type == "cuda":
        model.set_compute_dtype(torch.bfloat16)
    data_tok = config.data.tokenizer or Path(config.data.data_dir) / "tokenizer.json"
    candidates = [tokenizer_path] if tokenizer_path else [path / "tokenizer.json", data_tok]
    tok_file = next((Path(c) for c in candidates if Path(c).is_file()), Path(candidates[-1]))
    tok = load_tokenizer(tok_file)
    if tok.vocab_size > config.model.vocab_size:
        raise UserError(f"{tok_file}: vocabulary of {tok.vocab_size} exceeds model.vocab_size={config.model.vocab_size}")
    return model, tok


# ----------------------------------------------------------------------------- chat
def _fit_history(messages: list[dict], tok: ChatTokenizer, limit: int) -> list[int] | None:
    """Drop the oldest turns (keeping a system message) until the prompt fits in ``limit``."""
    msgs = list(messages)
    while True:
        ids = render_chat(msgs, tok)
        if len(ids) <= limit:
            return ids
        first = 1 if msgs and msgs[0]["role"] == "system" else 0
        if len(msgs) - first <= 1:
            return None
        del msgs[first]


def chat_loop(model, tok: ChatTokenizer, system: str = "", max_new_tokens: int = 256, temperature: float = 0.7,
              top_k: int = 0, top_p: float = 0.9, seed: int | None = None,
              read: Callable[[str], str] = input, write: Callable[[str], None] = print) -> int:
    """Read user turns until EOF or /quit; /reset clears the history. Answers are streamed."""
    history: list[dict] = [{"role": "system", "content": system}] if system else []
    gen = torch.Generator(device=model.embed.weight.device)
    gen.manual_seed(seed if seed is not None else secrets.randbits(63))  # not torch.seed(): it reseeds the global RNG
    limit = model.cfg.max_seq_len - max(1, min(max_new_tokens, model.cfg.max_seq_len // 2))
    write("moeforge chat: type a message; /reset clears the conversation, /quit or Ctrl-D ends.")
    while True:
        try:
            line = read("you> ")
        except EOFError:
            write("")
            return 0
        if line.strip() in ("/quit", "/exit"):
            return 0
        if line.strip() == "/reset":
            history = history[:1] if system else []
            write("(conversation cleared)")
            continue
        if not line.strip():
            continue
        history.append({"role": "user", "content": line})
        ids = _fit_history(history, tok, limit)
        if ids is None:
            history.pop()
            write(f"(that message is longer than the model's context of {model.cfg.max_seq_len} tokens)")
            continue
        new: list[int] = []
        shown = ""

        def stream(_row: int, t: int) -> None:
            # decode everything so far and print the growth: a byte-level token may end
            # mid-character, which only a later token completes
            nonlocal shown
            if t not in stop_ids_of(tok):
                new.append(t)
            text = tok.decode(new)
            if not text.endswith("\ufffd"):
                sys.stdout.write(text[len(shown):])
                sys.stdout.flush()
                shown = text

        sys.stdout.write("model> ")
        out = generate(model, [ids], max_new_tokens, temperature, top_k, top_p, stop_ids_of(tok),
                       generator=gen, on_token=stream)
        answer = tok.decode(new)
        sys.stdout.write(answer[len(shown):])  # whatever a trailing partial character held back
        write("" if out.finished[0] else " [...]")
        history.append({"role": "assistant", "content": answer})


def cli(argv: list[str]) -> int:
    """``moeforge chat --checkpoint DIR [--config FILE] [--section.field value ...]``."""
    from moeforge.cli import parse_config_args

    parser = argparse.ArgumentParser(prog="moeforge chat", description="Interactive chat with a checkpoint.")
    parser.add_argument("--checkpoint", required=True, help="checkpoint step directory (or a run/checkpoints dir)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer.json (default: beside the checkpoint, else the config's)")
    parser.add_argument("--system", default="", help="system message")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.7, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=0, help="0 = off")
    parser.add_argument("--top-p", type=float, default=0.9)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    args, cfg = parse_config_args(argv, parser)
    # without --config or overrides the checkpoint's own saved config is the truth
    explicit = args.config is not None or any(a.startswith("--") and "." in a.split("=", 1)[0] for a in argv)
    model, tok = load_for_chat(args.checkpoint, cfg if explicit else None, args.tokenizer, args.device)
    return chat_loop(model, tok, args.system, args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.seed)
