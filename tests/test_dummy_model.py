"""The 8B-shaped model directory (scripts/build_dummy_model.py) as transformers reads it, without a GPU.

vLLM reads config.json through transformers' config classes and loads the tokenizer with AutoTokenizer;
its own parsing of the directory is checked by the GPU suite.
"""

from __future__ import annotations

import random
import subprocess
import sys

import pytest

from tests.testing import REPO

ENDOFTEXT_ID, IM_START_ID, IM_END_ID = 151643, 151644, 151645


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    output = tmp_path_factory.mktemp("model") / "qwen3-8b-shaped"
    done = subprocess.run(
        [sys.executable, "scripts/build_dummy_model.py", str(output)], cwd=REPO, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    return output


@pytest.fixture(scope="module")
def transformers():
    """transformers, imported by the tests that use it: importing it takes seconds, and every pytest-xdist
    worker collects this module."""
    import transformers

    return transformers


@pytest.fixture(scope="module")
def tokenizer(transformers, model_dir):
    """The directory's tokenizer, loaded once (the tests only read it)."""
    return transformers.AutoTokenizer.from_pretrained(model_dir)


def test_directory_has_a_config_and_a_tokenizer_but_no_weights(model_dir):
    """The script writes the config, the generation config and the tokenizer files, and no weight file."""
    names = {path.name for path in model_dir.iterdir()}
    assert names == {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"}


def test_config_parses_as_qwen3_with_the_8b_architecture(transformers, model_dir):
    """transformers' Qwen3Config reads Qwen3-8B's published architecture, in float16."""
    config = transformers.AutoConfig.from_pretrained(model_dir)
    assert isinstance(config, transformers.Qwen3Config)
    assert config.architectures == ["Qwen3ForCausalLM"]
    assert (
        config.hidden_size,
        config.intermediate_size,
        config.num_hidden_layers,
        config.num_attention_heads,
        config.num_key_value_heads,
        config.head_dim,
        config.vocab_size,
        config.max_position_embeddings,
    ) == (4096, 12288, 36, 32, 8, 128, 151936, 40960)
    # transformers 5 moved rope_theta into rope_parameters; 4.x keeps it as an attribute
    rope = getattr(config, "rope_parameters", None) or {"rope_theta": config.rope_theta}
    assert rope["rope_theta"] == 1e6
    assert config.rms_norm_eps == 1e-6
    assert config.tie_word_embeddings is False
    assert str(getattr(config, "dtype", None) or config.torch_dtype).removeprefix("torch.") == "float16"


def test_config_carries_the_awq_quantization(transformers, model_dir):
    """The quantization config is AWQ 4-bit, group 128, with zero points, GEMM kernels."""
    config = transformers.AutoConfig.from_pretrained(model_dir)
    assert config.quantization_config == {
        "quant_method": "awq",
        "bits": 4,
        "group_size": 128,
        "zero_point": True,
        "version": "gemm",
    }


def test_generation_config_ends_on_qwen3_end_tokens(transformers, model_dir):
    """generation_config.json stops on <|im_end|> and <|endoftext|> at Qwen3's ids."""
    generation = transformers.GenerationConfig.from_pretrained(model_dir)
    assert generation.eos_token_id == [IM_END_ID, ENDOFTEXT_ID]
    assert generation.pad_token_id == ENDOFTEXT_ID


def test_tokenizer_covers_the_whole_vocabulary_with_qwen3_special_ids(tokenizer):
    """Every id the model can emit has its own token; the special tokens sit at Qwen3's ids."""
    assert len(tokenizer) == 151936
    assert len(set(tokenizer.get_vocab().values())) == 151936
    assert tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]) == [
        ENDOFTEXT_ID,
        IM_START_ID,
        IM_END_ID,
    ]
    assert tokenizer.eos_token_id == IM_END_ID


def test_tokenizer_round_trips_text_and_random_ids(tokenizer):
    """Text of known words survives encode/decode; ids drawn over the vocabulary decode to words that encode back."""
    text = "what is the capital of france ?"
    ids = tokenizer(text).input_ids
    assert tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids) == text
    specials = {tokenizer.unk_token_id, ENDOFTEXT_ID, IM_START_ID, IM_END_ID}
    drawn = [token_id for token_id in random.Random(0).sample(range(151936), 3000) if token_id not in specials]
    decoded = tokenizer.decode(drawn)
    assert decoded.isprintable() and tokenizer(decoded).input_ids == drawn


def test_chat_template_renders_chatml(tokenizer):
    """The chat template writes ChatML and its token ids start with <|im_start|> and end on the assistant's turn."""
    messages = [{"role": "system", "content": "Be short."}, {"role": "user", "content": "Say hello."}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|im_start|>system\nBe short.<|im_end|>\n<|im_start|>user\nSay hello.<|im_end|>\n<|im_start|>assistant\n"
    )
    ids = tokenizer(text).input_ids
    assert ids[0] == IM_START_ID and ids[-2:] == [IM_START_ID, tokenizer.convert_tokens_to_ids("assistant")]
    assert ids.count(IM_END_ID) == 2


def test_unwritable_output_is_reported_without_a_traceback(tmp_path):
    """An output path under a file is refused with one line and exit code 1."""
    blocker = tmp_path / "file"
    blocker.write_text("")
    done = subprocess.run(
        [sys.executable, "scripts/build_dummy_model.py", str(blocker / "model")],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 1
    assert "cannot write" in done.stderr and "Traceback" not in done.stderr
