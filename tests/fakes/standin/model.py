"""The stand-in's "model": deterministic words and logprobs, so tests can compare answers across a
suspend and resume; and its byte-level tokenizer."""

from __future__ import annotations

import hashlib
import json
import random

from standin.common import WORDS

EOS_WORD = WORDS[-1]  # the word that plays the end-of-sequence token
MIN_TOKENS_BEFORE_EOS = 20  # so short greedy answers run to max_tokens, and long ones stop somewhere
MAX_LOGPROBS = 20  # vLLM's default max_logprobs


def answer_key(kind: str, prompt: object, seed: object) -> str:
    """What a greedy answer depends on: the same key gives the same words (max_tokens only cuts them)."""
    return hashlib.sha256(json.dumps([kind, prompt, seed], sort_keys=True).encode()).hexdigest()[:32]


def step_piece(key: str, index: int, rank: int, salt: str) -> int:
    """One worker's share of token `index`; `salt` is empty unless the worker computes garbage."""
    digest = hashlib.blake2b(f"{key}/{index}/{rank}/{salt}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def combine_pieces(pieces: list[int]) -> str:
    return WORDS[sum(pieces) % len(WORDS)]


def token_text(word: str, index: int) -> str:
    return word if index == 0 else " " + word


def candidate_logprobs(pieces: list[int], word: str, index: int, count: int) -> list[list]:
    """The sampler's view of one position: [token, logprob] of the chosen word first (the most likely,
    as greedy decoding picks it), then of `count - 1` other words, each less likely than the one before.
    Derived from the workers' pieces, so a worker computing garbage changes them too."""
    rng = random.Random(sum(pieces))
    others = rng.sample([other for other in WORDS if other != word], min(count, len(WORDS)) - 1)
    logprob = -rng.uniform(0.01, 0.5)
    candidates = [[token_text(word, index), logprob]]
    for other in others:
        logprob -= rng.uniform(0.05, 1.5)
        candidates.append([token_text(other, index), logprob])
    return candidates


def tokenize(text: str) -> list[int]:
    return list(text.encode("utf-8"))


def detokenize(tokens: list[int]) -> str:
    return bytes(tokens).decode("utf-8", errors="replace")


def render_chat(messages: list) -> str:
    """The prompt text a chat template would make (only its length matters here)."""
    lines = []
    for message in messages:
        if isinstance(message, dict):
            content = message.get("content")
            text = content if isinstance(content, str) else json.dumps(content)
            lines.append(f"{message.get('role', 'user')}: {text}")
    return "\n".join(lines) + "\nassistant:"
