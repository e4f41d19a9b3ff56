"""The shipped demo model `helexa/demo` (`catalogue/demo/`), exercised with transformers directly.

These tests check the committed artefact, not the engine: the files are there and small, the model and
tokenizer load, the ChatML template renders, greedy chat output is mostly real English words (a check
shown to fail on a random-weight model of the same shape), and the tokenizer round-trips any UTF-8 text,
also when decoded incrementally as the engine does.
"""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers.decoders import DecodeStream
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from helexa import catalogue

DEMO_DIR = Path(catalogue.__file__).resolve().parent / "demo"
TRAIN_SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "train_demo_model.py"
MAX_WEIGHTS_BYTES = 25 * 1024 * 1024
WORD_RE = re.compile(r"[A-Za-z]+")


def _load_train_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("train_demo_model", TRAIN_SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return AutoTokenizer.from_pretrained(DEMO_DIR)


@pytest.fixture(scope="module")
def model() -> Any:
    return AutoModelForCausalLM.from_pretrained(DEMO_DIR).eval()


@pytest.fixture(scope="module")
def corpus_words() -> set[str]:
    """Every alphabetic word of the training corpus, lower-cased (rebuilt from this Python's stdlib)."""
    script = _load_train_script()
    return set(script.corpus_words(script.build_documents()))


def english_verdict(text: str, words: set[str]) -> tuple[bool, str]:
    """Whether `text` reads as English words: enough words, mostly known, not one word repeated.

    The distinct-word floor matters: a random-weight model often repeats one token forever, which could
    be a real word.
    """
    found = [w.lower() for w in WORD_RE.findall(text)]
    known = [w for w in found if w in words]
    distinct = set(known)
    ok = len(found) >= 12 and len(known) >= 0.85 * len(found) and len(distinct) >= 6
    return ok, f"{len(known)}/{len(found)} known, {len(distinct)} distinct known: {text!r}"


def greedy_chat(model: Any, tokenizer: Any, prompt: str, max_new_tokens: int = 48) -> str:
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )["input_ids"]
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    return str(tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True))


def test_shipped_files_exist_and_weights_are_small() -> None:
    for name in (
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "README.md",
    ):
        assert (DEMO_DIR / name).is_file(), name
    assert (DEMO_DIR / "model.safetensors").stat().st_size <= MAX_WEIGHTS_BYTES
    total = sum(p.stat().st_size for p in DEMO_DIR.iterdir())
    assert total <= MAX_WEIGHTS_BYTES
    assert not list(DEMO_DIR.parent.glob(".demo.tmp-*")), "a half-written training output was left behind"


def test_configs_name_chatml_end_of_turn_as_eos() -> None:
    tok_config = json.loads((DEMO_DIR / "tokenizer_config.json").read_text())
    assert tok_config["eos_token"] == "<|im_end|>"
    assert "<|im_start|>" in tok_config["chat_template"]
    tokenizer_json = json.loads((DEMO_DIR / "tokenizer.json").read_text())
    ids = {t["content"]: t["id"] for t in tokenizer_json["added_tokens"]}
    assert {"<|endoftext|>", "<|im_start|>", "<|im_end|>"} <= ids.keys()
    generation = json.loads((DEMO_DIR / "generation_config.json").read_text())
    config = json.loads((DEMO_DIR / "config.json").read_text())
    assert generation["eos_token_id"] == config["eos_token_id"] == ids["<|im_end|>"]
    assert config["architectures"] == ["LlamaForCausalLM"]


def test_model_and_tokenizer_load(model: Any, tokenizer: Any) -> None:
    assert type(model).__name__ == "LlamaForCausalLM"
    n_params = sum(p.numel() for p in model.parameters())
    assert 1_000_000 <= n_params <= 10_000_000
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert tokenizer.eos_token == "<|im_end|>"
    assert len(tokenizer) == model.config.vocab_size
    assert model.config.max_position_embeddings >= 1024


def test_chat_template_renders_chatml(tokenizer: Any) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "What is Python?"},
    ]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello.<|im_end|>\n<|im_start|>user\nWhat is Python?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    ids = tokenizer.apply_chat_template(messages[:1], tokenize=True, return_dict=True)["input_ids"]
    assert ids[0] == tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in ids


@settings(max_examples=200, deadline=None)
@given(text=st.text())
def test_tokenizer_round_trips_any_text(tokenizer: Any, text: str) -> None:
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids) == text
    # The engine decodes incrementally; the pieces must join to the same text.
    stream = DecodeStream(skip_special_tokens=False)
    pieces = [stream.step(tokenizer.backend_tokenizer, i) for i in ids]
    assert "".join(p for p in pieces if p is not None) == text


def test_tokenizer_round_trips_non_ascii(tokenizer: Any) -> None:
    text = "Grüße, naïve café — 日本語のテキスト, emoji 🙂🚀, Ελληνικά, עברית, tabs\tand\nnewlines."
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids) == text
    # English from the training corpus compresses well (the BPE learned it); other scripts fall back to bytes.
    english = "The return value is a list of strings, one for each line of the file."
    assert len(tokenizer.encode(english, add_special_tokens=False)) < len(english) / 3


PROMPTS = (
    "Tell me about exceptions in Python.",
    "What does a for loop do?",
    "What is the Zen of Python?",
    "Hello! Who are you?",
)


@pytest.mark.slow
def test_greedy_chat_output_is_english_words(model: Any, tokenizer: Any, corpus_words: set[str]) -> None:
    # Answers are short (the model ends its turn), so judge the answers to several prompts together.
    answers = [greedy_chat(model, tokenizer, prompt) for prompt in PROMPTS]
    ok, detail = english_verdict(" ".join(answers), corpus_words)
    assert ok, detail


@pytest.mark.slow
def test_greedy_chat_answer_ends_its_turn(model: Any, tokenizer: Any) -> None:
    """The model learned the chat format: at least one answer stops with `<|im_end|>` before the limit."""
    ended = 0
    for prompt in PROMPTS:
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}],
            add_generation_prompt=True,
            return_tensors="pt",
            return_dict=True,
        )["input_ids"]
        with torch.no_grad():
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=96,
                do_sample=False,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        ended += int(out[0, -1].item() == tokenizer.eos_token_id)
    assert ended >= 1


@pytest.mark.slow
def test_english_check_rejects_a_random_weight_model(tokenizer: Any, corpus_words: set[str]) -> None:
    """The check above can fail: the same architecture with random weights does not pass it."""
    for seed in (0, 1):
        torch.manual_seed(seed)
        random_model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(DEMO_DIR)).eval()
        answers = [greedy_chat(random_model, tokenizer, prompt) for prompt in PROMPTS]
        ok, detail = english_verdict(" ".join(answers), corpus_words)
        assert not ok, detail
