"""Train helexa's demo model (`helexa/demo`, shipped as `catalogue/demo/`), reproducibly, on CPU.

The demo model lets an agent serve something real with no network at all. It is a tiny
`LlamaForCausalLM` with its own byte-level BPE tokenizer and a ChatML chat template, trained for a few
minutes on English text that ships with Python itself:

- `pydoc_data.topics` (the language reference topics that `help()` shows),
- the docstrings of the standard library's modules, classes and functions (read with `ast`, nothing is
  imported),
- `this` (the Zen of Python, rot13-decoded from the module's source).

Text is cleaned (code blocks, grammar lines, tables and odd whitespace dropped; paragraphs reflowed to
one line) and turned into samples: most are ChatML conversations (a user turn asking about a topic, or
asking to continue a first sentence, and the assistant answering with the text, ended by `<|im_end|>`),
the rest plain text. Everything is deterministic for a given seed and Python stdlib: files are read in
sorted order, samples are shuffled with `random.Random(seed)`, weights start from `torch.manual_seed(seed)`
and batches are drawn with a seeded `torch.Generator`.

The result is written to a temporary directory beside `--out` and renamed into place, so a reader never
sees a half-written model. Run it through `scripts/train-demo-model`.
"""

from __future__ import annotations

import argparse
import ast
import codecs
import hashlib
import json
import logging
import math
import os
import platform
import random
import re
import shutil
import signal
import sys
import sysconfig
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from pydoc_data.topics import topics
from typing import Any

import tokenizers
import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

logger = logging.getLogger("train_demo_model")

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "catalogue" / "demo"

PAD_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = (PAD_TOKEN, IM_START, IM_END)

# ChatML, as Qwen and others use it. Content is text (helexa's HTTP edge flattens content parts); a
# list of parts is joined here too so that plain transformers users get the same rendering.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['content'] is string -%}{%- set content = message['content'] -%}"
    "{%- elif message['content'] is none -%}{%- set content = '' -%}"
    "{%- else -%}{%- set content = message['content'] | map(attribute='text') | join('') -%}"
    "{%- endif -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + content + '<|im_end|>' + '\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)

# Parts of the stdlib that are tests, demos or vendored code rather than documentation prose.
SKIPPED_STDLIB_PARTS = frozenset(
    {"test", "tests", "idlelib", "site-packages", "dist-packages", "lib2to3", "turtledemo", "ensurepip"}
)

SYSTEM_PROMPTS = (
    "You are a helpful assistant.",
    "You are a helpful assistant that knows Python.",
    "Answer in plain English.",
)


@dataclass(frozen=True, kw_only=True, slots=True)
class HyperParams:
    """Everything that decides the trained weights (besides the Python stdlib the text comes from)."""

    seed: int = 1234
    steps: int = 600
    vocab_size: int = 4096
    hidden_size: int = 256
    intermediate_size: int = 768
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 4
    max_position_embeddings: int = 1024
    seq_len: int = 256
    batch_size: int = 16
    learning_rate: float = 2e-3
    min_learning_rate: float = 2e-4
    warmup_steps: int = 60
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    chat_fraction: float = 0.7
    holdout_every: int = 50
    threads: int = 2


@dataclass(frozen=True, kw_only=True, slots=True)
class Document:
    """One cleaned piece of text and what it is about (used to phrase the user's question)."""

    title: str
    kind: str  # "topic" | "module" | "object" | "zen"
    text: str


# ---------------------------------------------------------------------------------------------------
# Corpus


_WORD_RE = re.compile(r"[A-Za-z]+")
_HEADING_RULE_RE = re.compile(r"^\s*([*=\-~^\"'#+_.])\1{2,}\s*$")
_ODD_SPACE_RE = re.compile(r"[\t\u00a0\u2000-\u200b\u3000]+")
_MULTI_SPACE_RE = re.compile(r" {2,}")
_CODE_HINT_RE = re.compile(
    r">>>|::=|\.\.\.\s*$|^\s*[@$%]|[{}\[\]<>|\\]{2,}|\w\(.*\)\s*[:=]|==|!=|->|\+=|^\s*#"
)


def _is_prose(paragraph: str) -> bool:
    """True for a paragraph of English sentences: mostly letters, a few words, no code markers."""
    words = _WORD_RE.findall(paragraph)
    if len(words) < 6:
        return False
    if _CODE_HINT_RE.search(paragraph):
        return False
    letters_spaces = sum(ch.isalpha() or ch == " " for ch in paragraph)
    if letters_spaces / len(paragraph) < 0.88:
        return False
    # Identifier-heavy text (snake_case, dotted names) reads like code, not English.
    odd = sum(1 for w in paragraph.split() if "_" in w or w.count(".") > 1)
    return odd / len(words) <= 0.1


def clean_paragraphs(text: str) -> list[str]:
    """Split reST-ish text into prose paragraphs, each reflowed to one line.

    Drops indented blocks (code examples, grammar productions, tables), heading rules, doctests and
    anything `_is_prose` rejects; normalises tabs and exotic spaces to single spaces.
    """
    paragraphs: list[str] = []
    current: list[str] = []

    def flush() -> None:
        if current:
            joined = _MULTI_SPACE_RE.sub(" ", " ".join(current)).strip()
            if _is_prose(joined):
                paragraphs.append(joined)
            current.clear()

    for raw in text.splitlines():
        line = _ODD_SPACE_RE.sub(" ", raw).rstrip()
        if not line.strip() or _HEADING_RULE_RE.match(line):
            flush()
            continue
        if line.startswith(" ") and not current:
            continue  # an indented block that does not continue a paragraph: code, grammar, table
        if line.startswith("   ") and current and not current[-1].endswith((",", "and", "or")):
            flush()  # a paragraph followed directly by an indented block
            continue
        current.append(line.strip())
    flush()
    return paragraphs


def _title_from_topic(key: str) -> str:
    return key.replace("-", " ").replace("_", " ")


def topic_documents() -> list[Document]:
    """The Python docs' topics (`pydoc_data.topics`), one document per topic."""
    docs = []
    for key in sorted(topics):
        paragraphs = clean_paragraphs(topics[key])
        # Keep the topic's own heading (its first line) out: it is usually a quoted keyword.
        if paragraphs:
            docs.append(Document(title=_title_from_topic(key), kind="topic", text="\n".join(paragraphs)))
    return docs


def _stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(
        path
        for path in root.rglob("*.py")
        if not SKIPPED_STDLIB_PARTS.intersection(path.relative_to(root).parts)
        and "__pycache__" not in path.parts
    )


def docstring_documents() -> list[Document]:
    """Docstrings of stdlib modules, classes and functions, parsed with `ast` (nothing imported)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    docs: list[Document] = []
    for path in _stdlib_files():
        rel = path.relative_to(root).with_suffix("")
        module = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Module):
                title, kind = f"the {module} module", "module"
            elif isinstance(node, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                if node.name.startswith("_"):
                    continue
                title, kind = f"{module}.{node.name}", "object"
            else:
                continue
            doc = ast.get_docstring(node, clean=True)
            if not doc:
                continue
            paragraphs = clean_paragraphs(doc)
            if paragraphs:
                docs.append(Document(title=title, kind=kind, text="\n".join(paragraphs)))
    return docs


def zen_document() -> Document:
    """The Zen of Python, decoded from `this.py`'s source without importing it (import prints it)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    tree = ast.parse((root / "this.py").read_text(encoding="utf-8"))
    encoded = next(
        node.value.value
        for node in tree.body
        if isinstance(node, ast.Assign)
        and isinstance(node.value, ast.Constant)
        and isinstance(node.value.value, str)
    )
    lines = [line.strip() for line in codecs.decode(encoded, "rot13").splitlines() if line.strip()]
    return Document(title="the Zen of Python", kind="zen", text="\n".join(lines[1:]))


def _chunks(doc: Document, max_chars: int) -> Iterator[Document]:
    """`doc` split into runs of whole paragraphs of at most about `max_chars` characters.

    Long topics become several samples, each with its own question, so the chat framing appears
    throughout the token stream rather than once per long topic.
    """
    group: list[str] = []
    for paragraph in doc.text.split("\n"):
        if group and sum(len(p) for p in group) + len(paragraph) > max_chars:
            yield Document(title=doc.title, kind=doc.kind, text="\n".join(group))
            group = []
        group.append(paragraph)
    if group:
        yield Document(title=doc.title, kind=doc.kind, text="\n".join(group))


ZEN_REPEATS = 4  # the Zen is short and the one text a user is likely to ask for by name


def build_documents(max_chars: int = 1000) -> list[Document]:
    """All training documents, deduplicated by text, in a fixed (sorted-source) order."""
    seen: set[str] = set()
    docs: list[Document] = []
    for doc in [*topic_documents(), *docstring_documents()]:
        for chunk in _chunks(doc, max_chars):
            if chunk.text not in seen:
                seen.add(chunk.text)
                docs.append(chunk)
    docs += [zen_document()] * ZEN_REPEATS
    return docs


def corpus_words(docs: Sequence[Document]) -> set[str]:
    """Lower-cased alphabetic words of the corpus (the tests' notion of "an English word")."""
    return {w.lower() for doc in docs for w in _WORD_RE.findall(doc.text)}


_SENTENCE_END_RE = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")


def _question(doc: Document, rng: random.Random) -> tuple[str, str]:
    """A user turn for `doc` and the assistant's answer text."""
    first, *rest = _SENTENCE_END_RE.split(doc.text, maxsplit=1)
    if rest and rng.random() < 0.3:
        return f"Continue this text: {first}", rest[0]
    templates: tuple[str, ...]
    if doc.kind == "topic":
        templates = ("Tell me about {t} in Python.", "What is {t}?", "Explain {t}.", "Describe {t}.")
    elif doc.kind == "module":
        templates = ("What is {t} for?", "Tell me about {t}.", "Explain {t}.")
    elif doc.kind == "zen":
        templates = ("What is {t}?", "Recite {t}.", "Tell me {t}.")
    else:
        templates = ("What does {t} do?", "Explain {t}.", "Describe {t}.")
    return rng.choice(templates).format(t=doc.title), doc.text


def render_sample(doc: Document, rng: random.Random, chat_fraction: float) -> str:
    """One training sample: a ChatML conversation (as the chat template renders it) or plain text."""
    if rng.random() >= chat_fraction:
        return doc.text + PAD_TOKEN
    question, answer = _question(doc, rng)
    turns = []
    if rng.random() < 0.3:
        turns.append(("system", rng.choice(SYSTEM_PROMPTS)))
    turns += [("user", question), ("assistant", answer)]
    return "".join(f"{IM_START}{role}\n{content}{IM_END}\n" for role, content in turns) + PAD_TOKEN


# ---------------------------------------------------------------------------------------------------
# Tokenizer


def train_tokenizer(texts: Sequence[str], vocab_size: int) -> Any:
    """A byte-level BPE tokenizer (GPT-2 style) with the ChatML special tokens; a `tokenizers.Tokenizer`."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def wrap_tokenizer(tokenizer: Any) -> Any:
    """The transformers tokenizer saved beside the model (loadable with `AutoTokenizer`)."""
    return PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=tokenizer,
        eos_token=IM_END,
        pad_token=PAD_TOKEN,
        additional_special_tokens=[IM_START],
        chat_template=CHAT_TEMPLATE,
        model_max_length=HyperParams().max_position_embeddings,
        clean_up_tokenization_spaces=False,
    )


# ---------------------------------------------------------------------------------------------------
# Training


def _split_text(text: str) -> Iterator[str]:
    """Samples split at special tokens, so the BPE trainer never learns merges across them."""
    pattern = "|".join(re.escape(tok) for tok in SPECIAL_TOKENS)
    for piece in re.split(pattern, text):
        if piece:
            yield piece


def _lr_at(step: int, hp: HyperParams) -> float:
    """Linear warm-up, then cosine decay to `min_learning_rate`."""
    if step < hp.warmup_steps:
        return hp.learning_rate * (step + 1) / hp.warmup_steps
    progress = (step - hp.warmup_steps) / max(1, hp.steps - hp.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return hp.min_learning_rate + (hp.learning_rate - hp.min_learning_rate) * cosine


def _next_token_loss(model: Any, batch: Any) -> Any:
    """Mean cross-entropy of predicting `batch[:, 1:]` from `batch[:, :-1]` (a scalar tensor)."""
    logits = model(input_ids=batch[:, :-1]).logits
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), batch[:, 1:].reshape(-1))


def _greedy(model: Any, tokenizer: Any, messages: list[dict[str, str]], max_new_tokens: int) -> str:
    ids = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )["input_ids"]
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=tokenizer.convert_tokens_to_ids(IM_END),
            pad_token_id=tokenizer.convert_tokens_to_ids(PAD_TOKEN),
        )
    return str(tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True))


SAMPLE_PROMPTS = (
    "Tell me about exceptions in Python.",
    "What is the Zen of Python?",
    "What does a for loop do?",
    "Hello! Who are you?",
)


def train(hp: HyperParams, out_dir: Path) -> dict[str, Any]:
    """Build the corpus, train tokenizer and model, write everything into `out_dir` (which must exist)."""
    started = time.monotonic()
    torch.set_num_threads(hp.threads)
    torch.manual_seed(hp.seed)
    torch.use_deterministic_algorithms(True)
    rng = random.Random(hp.seed)

    docs = build_documents()
    corpus_sha = hashlib.sha256("\n\n".join(d.text for d in docs).encode()).hexdigest()
    samples = [render_sample(doc, rng, hp.chat_fraction) for doc in docs]
    rng.shuffle(samples)
    held_out = samples[:: hp.holdout_every]
    train_samples = [s for i, s in enumerate(samples) if i % hp.holdout_every]
    corpus_chars = sum(len(d.text) for d in docs)
    logger.info("corpus: %d documents, %d characters (sha256 %s)", len(docs), corpus_chars, corpus_sha[:16])

    raw_tokenizer = train_tokenizer([p for s in train_samples for p in _split_text(s)], hp.vocab_size)
    tokenizer = wrap_tokenizer(raw_tokenizer)

    def stream(texts: Sequence[str]) -> torch.Tensor:
        ids: list[int] = []
        for encoding in raw_tokenizer.encode_batch(list(texts)):
            ids.extend(encoding.ids)
        return torch.tensor(ids, dtype=torch.long)

    train_ids, val_ids = stream(train_samples), stream(held_out)
    logger.info("tokens: %d train, %d held out", train_ids.numel(), val_ids.numel())

    config = LlamaConfig(
        vocab_size=hp.vocab_size,
        hidden_size=hp.hidden_size,
        intermediate_size=hp.intermediate_size,
        num_hidden_layers=hp.num_hidden_layers,
        num_attention_heads=hp.num_attention_heads,
        num_key_value_heads=hp.num_key_value_heads,
        max_position_embeddings=hp.max_position_embeddings,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=tokenizer.convert_tokens_to_ids(IM_END),
        pad_token_id=tokenizer.convert_tokens_to_ids(PAD_TOKEN),
    )
    model = LlamaForCausalLM(config)
    n_params = sum(p.numel() for p in model.parameters())
    logger.info("model: %d parameters", n_params)

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": hp.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=hp.learning_rate,
        betas=(0.9, 0.95),
    )
    batch_gen = torch.Generator().manual_seed(hp.seed)
    span = hp.seq_len + 1
    n_windows = train_ids.numel() - span

    def evaluate() -> float:
        model.eval()  # type: ignore[no-untyped-call]
        losses: list[float] = []
        with torch.no_grad():
            for start in range(0, val_ids.numel() - span, hp.seq_len * 4):
                chunk = val_ids[start : start + span].unsqueeze(0)
                losses.append(_next_token_loss(model, chunk).item())
                if len(losses) >= 16:
                    break
        model.train()
        return sum(losses) / max(1, len(losses))

    model.train()
    train_started = time.monotonic()
    recent: list[float] = []
    for step in range(hp.steps):
        starts = torch.randint(0, n_windows, (hp.batch_size,), generator=batch_gen)
        batch = torch.stack([train_ids[s : s + span] for s in starts.tolist()])
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(step, hp)
        loss = _next_token_loss(model, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), hp.grad_clip)
        optimizer.step()
        recent = [*recent[-19:], loss.item()]
        if step % 25 == 0 or step == hp.steps - 1:
            elapsed = time.monotonic() - train_started
            logger.info(
                "step %d/%d loss %.3f (mean of last %d: %.3f) lr %.2e %.1fs",
                step + 1,
                hp.steps,
                loss.item(),
                len(recent),
                sum(recent) / len(recent),
                _lr_at(step, hp),
                elapsed,
            )
    train_s = time.monotonic() - train_started
    final_loss = sum(recent) / len(recent)
    val_loss = evaluate()
    logger.info("trained in %.0fs: final train loss %.3f, held-out loss %.3f", train_s, final_loss, val_loss)

    model.eval()  # type: ignore[no-untyped-call]
    model.generation_config = GenerationConfig(  # type: ignore[no-untyped-call]
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
        do_sample=True,
        temperature=0.7,
        top_p=0.9,
        top_k=40,
        max_new_tokens=128,
    )
    model.save_pretrained(out_dir)
    # The chat template goes into tokenizer_config.json (not chat_template.jinja) so that every reader
    # of the ChatML convention finds it in the classic place.
    tokenizer.save_pretrained(out_dir, save_jinja_files=False)
    tok_config_path = out_dir / "tokenizer_config.json"
    tok_config = json.loads(tok_config_path.read_text())
    tok_config["tokenizer_class"] = "PreTrainedTokenizerFast"  # the portable name for tokenizer.json
    tok_config_path.write_text(json.dumps(tok_config, indent=2, ensure_ascii=False) + "\n")

    samples_out = {
        prompt: _greedy(model, tokenizer, [{"role": "user", "content": prompt}], 48)
        for prompt in SAMPLE_PROMPTS
    }
    for prompt, answer in samples_out.items():
        logger.info("sample: %r -> %r", prompt, answer)

    stats: dict[str, Any] = {
        "hyper_parameters": asdict(hp),
        "parameters": n_params,
        "documents": len(docs),
        "corpus_characters": corpus_chars,
        "corpus_sha256": corpus_sha,
        "train_tokens": train_ids.numel(),
        "held_out_tokens": val_ids.numel(),
        "tokens_seen": hp.steps * hp.batch_size * hp.seq_len,
        "final_train_loss": round(final_loss, 4),
        "held_out_loss": round(val_loss, 4),
        "train_seconds": round(train_s, 1),
        "total_seconds": round(time.monotonic() - started, 1),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
        "cpu_count": os.cpu_count(),
        "samples": samples_out,
    }
    (out_dir / "training.json").write_text(json.dumps(stats, indent=2, ensure_ascii=False) + "\n")
    (out_dir / "README.md").write_text(model_card(stats))
    return stats


def model_card(stats: dict[str, Any]) -> str:
    """The README.md shipped with the model: data, hyper-parameters, seed, how to reproduce, results."""
    hp = stats["hyper_parameters"]
    hp_lines = "\n".join(f"| `{k}` | {v} |" for k, v in hp.items())
    sample_lines = "\n".join(f"- **{q}** → {a!r}" for q, a in stats["samples"].items())
    return f"""# helexa/demo

A tiny Llama-shaped chat model that helexa trains and ships itself, so that an agent serves something
real with no network at all. It writes English words with little meaning; it is a demo, not an assistant.

- Architecture: `LlamaForCausalLM`, {hp["num_hidden_layers"]} layers, hidden {hp["hidden_size"]}, MLP
  {hp["intermediate_size"]}, {hp["num_attention_heads"]} heads ({hp["num_key_value_heads"]} KV heads),
  tied embeddings, RoPE, {stats["parameters"]:,} parameters, float32 safetensors.
- Tokenizer: its own byte-level BPE (`tokenizers`), vocabulary {hp["vocab_size"]}, special tokens
  `<|endoftext|>` (padding, sample separator), `<|im_start|>`, `<|im_end|>` (end of turn, eos).
- Chat template: ChatML (`<|im_start|>role\\n…<|im_end|>\\n`), in `tokenizer_config.json`.
- Context: positions up to {hp["max_position_embeddings"]}; trained on {hp["seq_len"]}-token windows, so
  quality falls off on longer inputs.

## Data

English text that ships with Python {stats["python"]} (nothing downloaded):
`pydoc_data.topics` (the language reference topics of `help()`), docstrings of the standard library's
modules, public classes and functions (parsed with `ast`; tests, idlelib, lib2to3, turtledemo and
ensurepip skipped), and the Zen of Python (`this.py`, rot13-decoded). Cleaned to prose paragraphs (code
blocks, grammar, doctests, tables, heading rules and identifier-heavy lines dropped; whitespace
normalised), deduplicated: {stats["documents"]:,} documents, {stats["corpus_characters"]:,} characters
(sha256 of the joined text `{stats["corpus_sha256"][:16]}…`). {int(hp["chat_fraction"] * 100)} % of the
samples are ChatML conversations (a user asks about the topic or object, or asks to continue its first
sentence; sometimes after a system prompt; the assistant answers with the text and ends with
`<|im_end|>`), the rest plain text. Every {hp["holdout_every"]}th sample is held out.
Tokens: {stats["train_tokens"]:,} for training, {stats["held_out_tokens"]:,} held out.

## Training

AdamW (β 0.9/0.95), linear warm-up then cosine decay, gradient clipping, random {hp["seq_len"]}-token
windows of the packed token stream, loss on every token. {stats["tokens_seen"]:,} tokens seen.

| hyper-parameter | value |
|---|---|
{hp_lines}

Results: final training loss {stats["final_train_loss"]} (mean of the last 20 steps), held-out loss
{stats["held_out_loss"]}. Training took {stats["train_seconds"]:.0f} s ({stats["total_seconds"]:.0f} s
in all, with corpus and tokenizer) on {hp["threads"]} threads of a shared {stats["cpu_count"]}-core machine
(torch {stats["torch"]}, transformers {stats["transformers"]}, tokenizers {stats["tokenizers"]}).
A step takes about 1.0 to 1.4 s on 2 idle cores (measured), several times longer while other work shares
them. `training.json` holds these numbers.

## Reproduce

```
scripts/train-demo-model                    # writes catalogue/demo/ (seed {hp["seed"]}, {hp["steps"]} steps)
scripts/train-demo-model --out /tmp/demo --steps 50 --seed 7   # a quick variant elsewhere
```

Same seed, same Python stdlib and same library versions give the same corpus, tokenizer and batches;
the weights then match up to floating-point differences between CPUs.

## Samples (greedy, chat template)

{sample_lines}
"""


def main(argv: Sequence[str] | None = None) -> int:
    defaults = HyperParams()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help="model directory (default: %(default)s)"
    )
    parser.add_argument("--steps", type=int, default=defaults.steps, help="optimiser steps (%(default)s)")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="random seed (%(default)s)")
    parser.add_argument("--threads", type=int, default=defaults.threads, help="torch threads (%(default)s)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    # A plain SIGTERM would end the process without unwinding, leaving the temporary directory behind.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))

    hp = HyperParams(
        seed=args.seed,
        steps=args.steps,
        threads=args.threads,
        warmup_steps=min(defaults.warmup_steps, max(1, args.steps // 10)),
    )
    out: Path = args.out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    # Write beside the target (same filesystem) and swap directories with renames, so the target is
    # always either the old complete model or the new complete model.
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        train(hp, tmp)
        # Package data must be readable by whoever runs the agent (e.g. a system user).
        tmp.chmod(0o755)
        for path in tmp.iterdir():
            path.chmod(0o644)
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        if out.exists():
            out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("wrote %s", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
