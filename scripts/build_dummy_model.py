#!/usr/bin/env python3
"""Build a model directory with Qwen3-8B-AWQ's shape and no weights, for vLLM's `--load-format dummy`.

    python3 scripts/build_dummy_model.py OUTPUT_DIR

vLLM then serves it offline, drawing random weights itself:

    vllm serve OUTPUT_DIR --load-format dummy --quantization awq --dtype float16

so the GPU suite measures suspend and resume with the served model's real memory layout (6.3 GiB of
4-bit AWQ weights run through vLLM's AWQ kernels, a KV cache of 36 layers x 8 KV heads x 128) without
downloading 5.7 GB of weights. Written: config.json (Qwen/Qwen3-8B-AWQ's published architecture and
quantization config), generation_config.json, tokenizer.json and tokenizer_config.json.

Why a word-level tokenizer rather than `--skip-tokenizer-init`: without a tokenizer vLLM takes only
token-id prompts, returns no text, and refuses chat completions (no chat template), so neither the
gate's wake-on-request path nor the clients' chat requests could run as users send them. Qwen's own
BPE tokenizer would need a download. A word-level tokenizer over the whole 151936-token vocabulary
(every id the random weights can emit decodes to one readable word; Qwen3's special tokens at their
real ids) lets chat and completions run unchanged and keeps the detokenized text readable.

Only the `tokenizers` package is needed (no torch, no transformers, no network).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, models, normalizers, pre_tokenizers

VOCAB_SIZE = 151936
# Qwen3's special tokens at the ids of Qwen/Qwen3-8B's tokenizer.
ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIAL_IDS = {ENDOFTEXT: 151643, IM_START: 151644, IM_END: 151645}
UNKNOWN = "<unk>"  # a word outside the vocabulary (a word-level model needs one); Qwen has none: id 0

# Qwen/Qwen3-8B-AWQ's config.json: the architecture and the quantization that shape GPU memory.
CONFIG = {
    "architectures": ["Qwen3ForCausalLM"],
    "model_type": "qwen3",
    "hidden_size": 4096,
    "intermediate_size": 12288,
    "num_hidden_layers": 36,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "hidden_act": "silu",
    "vocab_size": VOCAB_SIZE,
    "max_position_embeddings": 40960,
    "rope_theta": 1000000.0,
    "rope_scaling": None,
    "rms_norm_eps": 1e-06,
    "attention_bias": False,
    "attention_dropout": 0.0,
    "initializer_range": 0.02,
    "use_cache": True,
    "use_sliding_window": False,
    "sliding_window": None,
    "max_window_layers": 36,
    "tie_word_embeddings": False,
    "torch_dtype": "float16",
    "bos_token_id": SPECIAL_IDS[ENDOFTEXT],
    "eos_token_id": SPECIAL_IDS[IM_END],
    "quantization_config": {
        "quant_method": "awq",
        "bits": 4,
        "group_size": 128,
        "zero_point": True,
        "version": "gemm",
    },
}

# Token ids only: the suite's requests set their own sampling (greedy), so no sampling defaults here.
GENERATION_CONFIG = {
    "bos_token_id": SPECIAL_IDS[ENDOFTEXT],
    "eos_token_id": [SPECIAL_IDS[IM_END], SPECIAL_IDS[ENDOFTEXT]],
    "pad_token_id": SPECIAL_IDS[ENDOFTEXT],
}

CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# Words a prompt is likely to use get real entries (the rest of the vocabulary is made-up words), so
# that prompts tokenize without unknown words. Lower case: the tokenizer lower-cases its input.
_COMMON_WORDS_TEXT = """
user assistant system the a an and or but not no yes of to in on at by for with from as is are was were
be been it this that these those there here what which who whom whose when where why how i you he she we
they me him her us them my your his its our their say tell hello hi world one two three four five six
seven eight nine ten zero short long sentence word words list colour colours color colors red green blue
yellow black white capital city country france paris count number numbers answer question write story
poem about please thank thanks good bad new old first last next time day year name can could will would
should may might do does did have has had make made give go come see know think want like use find
"""
COMMON_WORDS = _COMMON_WORDS_TEXT.split()
PUNCTUATION = list(".,!?;:'\"()[]{}-_/*+=<>@#$%&") + [str(digit) for digit in range(10)]
CONSONANTS, VOWELS = "bdfghklmnprstvz", "aeiou"


def made_up_words():
    """Pronounceable words of two, then three syllables: kalu, mezo, ... (more than the vocabulary needs)."""
    syllables = [c + v for c in CONSONANTS for v in VOWELS]
    for count in (2, 3):
        for parts in itertools.product(syllables, repeat=count):
            yield "".join(parts)


def vocabulary() -> dict[str, int]:
    """Every id of 0..VOCAB_SIZE-1 to one distinct word; the special tokens at Qwen3's ids."""
    by_id: dict[int, str] = {0: UNKNOWN, **{token_id: token for token, token_id in SPECIAL_IDS.items()}}
    words = itertools.chain(PUNCTUATION, COMMON_WORDS, made_up_words())
    seen: set[str] = set()
    for token_id in range(VOCAB_SIZE):
        if token_id in by_id:
            continue
        word = next(words)
        while word in seen:
            word = next(words)
        seen.add(word)
        by_id[token_id] = word
    return {word: token_id for token_id, word in by_id.items()}


def build_tokenizer() -> Tokenizer:
    tokenizer = Tokenizer(models.WordLevel(vocab=vocabulary(), unk_token=UNKNOWN))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()  # words and runs of punctuation
    # Already in the vocabulary, so they keep their ids; special: matched before the normalizer, and
    # left out of the text by skip_special_tokens.
    tokenizer.add_special_tokens(
        [AddedToken(token, special=True, normalized=False) for token in (ENDOFTEXT, IM_START, IM_END)]
    )
    return tokenizer


def tokenizer_config() -> dict:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": CONFIG["max_position_embeddings"],
        "bos_token": None,
        "eos_token": IM_END,
        "pad_token": ENDOFTEXT,
        "unk_token": UNKNOWN,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHATML_TEMPLATE,
        "added_tokens_decoder": {
            str(token_id): {
                "content": token,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
                "single_word": False,
                "special": True,
            }
            for token, token_id in SPECIAL_IDS.items()
        },
    }


def build(output: Path) -> None:
    output.mkdir(parents=True, exist_ok=True)
    for name, content in (
        ("config.json", CONFIG),
        ("generation_config.json", GENERATION_CONFIG),
        ("tokenizer_config.json", tokenizer_config()),
    ):
        (output / name).write_text(json.dumps(content, indent=2) + "\n")
    build_tokenizer().save(str(output / "tokenizer.json"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output", type=Path, help="the model directory to write (created if missing)")
    args = parser.parse_args(argv)
    try:
        build(args.output)
    except OSError as error:
        print(f"build_dummy_model: cannot write {args.output}: {error}", file=sys.stderr)
        return 1
    print(f"built {args.output}: Qwen3-8B-AWQ's shape, no weights (serve with --load-format dummy)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
