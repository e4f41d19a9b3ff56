"""Tiny random-weight models for tests and benchmarks, built in seconds with no network.

`build_tiny_model` writes a complete transformers model directory: random weights (safetensors), a
config, and a byte-level BPE tokenizer trained here on a little fixed text with `tokenizers` (saved in
the transformers format with special tokens, an eos token and a ChatML chat template). The weights are
random, so the output is gibberish, but every code path of a real model is exercised: the chat
template, multi-byte characters split across byte-level tokens, eos, the KV cache.

`build_qwen25_05b_shaped` writes a model with Qwen2.5-0.5B-Instruct's compute shape (hidden 896, 24
layers, 14 query / 2 key-value heads, intermediate 4864, an embedding and tied LM head of 151,936 rows)
for engine benchmarks. Our trained tokenizer is far smaller than Qwen's, so only its first
`len(tokenizer)` rows are reachable: the engine masks logits past the tokenizer's vocabulary (real Qwen
pads its embedding the same way), so per-token compute matches the real model while every sampled id
decodes.

Heavy libraries (torch, transformers) are imported inside the builders, never at module import.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Literal

log = logging.getLogger(__name__)

Arch = Literal["llama", "qwen2"]

EOS_TOKEN = "<|im_end|>"
BOS_TOKEN = "<|endoftext|>"
SPECIAL_TOKENS = (BOS_TOKEN, "<|im_start|>", EOS_TOKEN)

# ChatML, as Qwen2.5 uses it: a system turn, then user/assistant turns, then the generation prompt.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# ChatML with tools, in the Hermes/Qwen2.5 form: the tools in a system turn, calls in <tool_call> tags,
# tool results in <tool_response> tags (what the engine's tool-calling tests render and parse).
TOOLS_CHAT_TEMPLATE = (
    "{% if tools %}{{ '<|im_start|>system\\nYou may call functions. Tools:\\n<tools>\\n' }}"
    "{% for tool in tools %}{{ tool | tojson }}{{ '\\n' }}{% endfor %}"
    '{{ \'</tools>\\nReturn each call as <tool_call>{"name": ..., "arguments": ...}</tool_call>'
    "<|im_end|>\\n' }}{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' and message.get('tool_calls') %}"
    "{{ '<|im_start|>assistant\\n' + (message['content'] or '') }}"
    "{% for call in message['tool_calls'] %}{{ '<tool_call>\\n' }}"
    "{{ {'name': call['function']['name'], 'arguments': call['function']['arguments']} | tojson }}"
    "{{ '\\n</tool_call>' }}{% endfor %}{{ '<|im_end|>\\n' }}"
    "{% elif message['role'] == 'tool' %}"
    "{{ '<|im_start|>user\\n<tool_response>\\n' + message['content'] + '\\n</tool_response><|im_end|>\\n' }}"
    "{% else %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# A little fixed English (with some multi-byte characters) to train the tokenizer on; the tokenizer
# only needs to be deterministic and to cover every byte, which the byte-level alphabet guarantees.
_TRAINING_TEXT = """\
The quick brown fox jumps over the lazy dog. A model that is loaded once serves many requests.
Beautiful is better than ugly. Explicit is better than implicit. Simple is better than complex.
Complex is better than complicated. Flat is better than nested. Sparse is better than dense.
Readability counts. Special cases aren't special enough to break the rules.
Although practicality beats purity. Errors should never pass silently. Unless explicitly silenced.
In the face of ambiguity, refuse the temptation to guess.
There should be one-- and preferably only one --obvious way to do it.
Now is better than never. Although never is often better than *right* now.
If the implementation is hard to explain, it's a bad idea. If it is easy to explain, it may be good.
Namespaces are one honking great idea -- let's do more of those!
Hello, world. Héllo, wörld. Ça va? Grüße aus Köln. 日本語のテキスト。 Emoji: 🎉 🚀 ✨.
The mesh serves open-weight models on the machines you already own, as if they were one server.
"""


def train_tokenizer(vocab_size: int = 512) -> object:
    """Train a byte-level BPE `tokenizers.Tokenizer` on the fixed text; deterministic for a vocab size."""
    # Lazy, here and in the builders below: importing this module must not import the ML libraries.
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers  # noqa: PLC0415

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_TRAINING_TEXT.splitlines(), trainer=trainer)
    return tokenizer


def save_tokenizer(
    directory: Path, *, vocab_size: int = 512, context_length: int = 512, chat_template: str = CHAT_TEMPLATE
) -> int:
    """Write tokenizer.json + tokenizer_config.json (special tokens, eos, chat template) into
    `directory`; returns the tokenizer's full vocabulary size (special tokens included)."""
    import transformers  # noqa: PLC0415 -- lazy, see train_tokenizer

    tf: Any = transformers  # partially annotated; untyped at this boundary
    raw = train_tokenizer(vocab_size)
    hf_tokenizer = tf.PreTrainedTokenizerFast(
        tokenizer_object=raw,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=BOS_TOKEN,
        additional_special_tokens=["<|im_start|>"],
        model_max_length=context_length,
    )
    hf_tokenizer.chat_template = chat_template
    hf_tokenizer.save_pretrained(str(directory))
    return len(hf_tokenizer)


def build_tiny_model(
    directory: Path | str,
    *,
    arch: Arch = "llama",
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int | None = None,
    vocab_size: int = 512,
    padded_vocab_size: int | None = None,
    context_length: int = 512,
    dtype: Literal["float32", "bfloat16", "float16"] = "float32",
    initializer_range: float = 0.3,
    seed: int = 0,
    chat_template: str = CHAT_TEMPLATE,
) -> Path:
    """Write a random-weight causal LM plus a trained tokenizer into `directory` (created if needed).

    `vocab_size` is the tokenizer's BPE target; the model's embedding has `padded_vocab_size` rows
    (default: exactly the tokenizer's vocabulary). `initializer_range` is the std of the random
    weights: the default 0.3 gives a tiny model peaky, varied output (at the usual 0.02, its greedy
    decoding repeats one token, which makes tests of the decode loop weak). Deterministic for given
    arguments. Returns the directory.
    """
    import torch  # noqa: PLC0415 -- lazy, see train_tokenizer
    import transformers  # noqa: PLC0415

    tf: Any = transformers  # partially annotated; untyped at this boundary

    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer_vocab = save_tokenizer(
        path, vocab_size=vocab_size, context_length=context_length, chat_template=chat_template
    )
    model_vocab = max(padded_vocab_size or tokenizer_vocab, tokenizer_vocab)
    # The saved tokenizer gives the special tokens the first ids, in SPECIAL_TOKENS order.
    bos_id, eos_id = 0, 2
    common: dict[str, object] = {
        "vocab_size": model_vocab,
        "hidden_size": hidden,
        "intermediate_size": intermediate or hidden * 4,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "max_position_embeddings": context_length,
        "tie_word_embeddings": True,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "pad_token_id": bos_id,
        "rms_norm_eps": 1e-6,
        "initializer_range": initializer_range,
    }
    config = tf.LlamaConfig(**common) if arch == "llama" else tf.Qwen2Config(**common)
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    model.generation_config.eos_token_id = eos_id
    model.generation_config.bos_token_id = bos_id
    model.generation_config.pad_token_id = bos_id
    model.save_pretrained(str(path))
    log.debug("built %s model (%d params) in %s", arch, sum(p.numel() for p in model.parameters()), path)
    return path


def build_qwen25_05b_shaped(directory: Path | str, *, seed: int = 0) -> Path:
    """A random-weight model with Qwen2.5-0.5B's compute shape (about 494 M parameters, stored in
    bfloat16 like the real checkpoint: about 1 GB on disk). See the module docstring for the vocab."""
    return build_tiny_model(
        directory,
        arch="qwen2",
        hidden=896,
        layers=24,
        heads=14,
        kv_heads=2,
        intermediate=4864,
        vocab_size=2048,
        padded_vocab_size=151936,
        context_length=32768,
        dtype="bfloat16",
        initializer_range=0.02,
        seed=seed,
    )


def build_tiny_encoder(
    directory: Path | str,
    *,
    hidden: int = 32,
    layers: int = 2,
    heads: int = 4,
    vocab_size: int = 512,
    context_length: int = 128,
    pooling: Literal["mean", "cls", "lasttoken"] = "mean",
    normalize: bool = True,
    matryoshka_dimensions: tuple[int, ...] | None = None,
    seed: int = 0,
) -> Path:
    """Write a random-weight BERT-like encoder (`BertModel`), a trained tokenizer that adds [CLS] and [SEP],
    and a sentence-transformers pooling configuration (`modules.json`, `1_Pooling/config.json`, a
    `Normalize` module when `normalize`) into `directory`. `matryoshka_dimensions` goes into config.json
    (the engine then allows shorter `dimensions`). Deterministic for given arguments. Returns the directory.
    """
    import torch  # noqa: PLC0415 -- lazy, see train_tokenizer
    import transformers  # noqa: PLC0415
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers  # noqa: PLC0415

    tf: Any = transformers  # partially annotated; untyped at this boundary
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    raw = Tokenizer(models.BPE(unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    raw.train_from_iterator(
        _TRAINING_TEXT.splitlines(),
        trainer=trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=specials,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        ),
    )
    raw.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    tokenizer = tf.PreTrainedTokenizerFast(
        tokenizer_object=raw,
        pad_token="[PAD]",
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=context_length,
    )
    tokenizer.save_pretrained(str(path))
    extra = {"matryoshka_dimensions": list(matryoshka_dimensions)} if matryoshka_dimensions else {}
    config = tf.BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=hidden * 2,
        max_position_embeddings=context_length,
        pad_token_id=0,
        **extra,
    )
    torch.manual_seed(seed)
    tf.BertModel(config).save_pretrained(str(path))
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]
    if normalize:
        modules.append(
            {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}
        )
    (path / "modules.json").write_text(json.dumps(modules, indent=2))
    (path / "1_Pooling").mkdir(exist_ok=True)
    flags = {
        "pooling_mode_cls_token": pooling == "cls",
        "pooling_mode_mean_tokens": pooling == "mean",
        "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False,
        "pooling_mode_lasttoken": pooling == "lasttoken",
    }
    (path / "1_Pooling" / "config.json").write_text(
        json.dumps({"word_embedding_dimension": hidden, **flags}, indent=2)
    )
    return path
