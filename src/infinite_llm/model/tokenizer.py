"""Text <-> token ids and chat prompts, over the `tokenizers` library alone.

transformers is not imported here: it takes seconds to import and is not needed at serve time.
Tokenizers are built either from a Hugging Face `tokenizer.json` or, for GGUF files, from the
vocabulary stored in the metadata, made the way transformers' GGUF converter makes them so that
both give the same ids.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as Backend

_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp's token types

# Split regexes by `tokenizer.ggml.pre`, as in transformers' GGUF converter. A pre type not listed
# (such as `smollm`) keeps the GPT-2 regex of the plain byte-level pre-tokenizer.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_PRE_TOKENIZER_SPLITS = {
    **dict.fromkeys(
        ("llama3", "llama-v3", "llama-bpe", "falcon3", "dbrx", "smaug-bpe"), _LLAMA3_SPLIT
    ),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "megrez"), _QWEN2_SPLIT),
    "tekken": _TEKKEN_SPLIT,
}


class Tokenizer:
    """A `tokenizers.Tokenizer` plus what the engine needs around it: special ids, chat template."""

    def __init__(
        self,
        backend: Backend,
        *,
        bos_token: str | None = None,
        eos_token: str | None = None,
        chat_template: str | None = None,
    ) -> None:
        self.backend = backend
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.chat_template = chat_template

    @classmethod
    def from_gguf_metadata(cls, metadata: Mapping[str, Any]) -> Tokenizer:
        """Build from llama.cpp's `tokenizer.*` metadata (key -> decoded value)."""
        kind = metadata.get("tokenizer.ggml.model")
        tokens: list[str] = metadata["tokenizer.ggml.tokens"]
        if kind == "gpt2":
            backend = _byte_level_bpe(tokens, metadata["tokenizer.ggml.merges"])
            backend.pre_tokenizer = _byte_level_pre_tokenizer(metadata.get("tokenizer.ggml.pre"))
            add_bos_default = False
        elif kind == "llama":
            backend = _sentencepiece_bpe(tokens, metadata["tokenizer.ggml.scores"])
            add_bos_default = True  # what llama.cpp does when a sentencepiece file does not say
        else:
            raise ValueError(f"unsupported GGUF tokenizer model {kind!r} (supported: gpt2, llama)")

        def token(key: str) -> str | None:
            index = metadata.get(f"tokenizer.ggml.{key}")
            return tokens[index] if index is not None else None

        bos, eos = token("bos_token_id"), token("eos_token_id")
        # transformers makes the named tokens special too, even where the file does not mark them.
        named = [t for t in (bos, eos, token("unknown_token_id"), token("padding_token_id")) if t]
        token_types = metadata.get("tokenizer.ggml.token_type") or []
        _add_special_tokens(backend, tokens, token_types, named, byte_level=kind == "gpt2")
        backend.post_processor = _bos_eos_template(
            bos if metadata.get("tokenizer.ggml.add_bos_token", add_bos_default) else None,
            eos if metadata.get("tokenizer.ggml.add_eos_token", False) else None,
            backend,
        )
        template = metadata.get("tokenizer.chat_template")
        return cls(backend, bos_token=bos, eos_token=eos, chat_template=template)

    @classmethod
    def from_directory(cls, path: str | Path) -> Tokenizer | None:
        """Load tokenizer.json (+ tokenizer_config.json, chat_template.jinja); None if absent."""
        path = Path(path)
        if not (path / "tokenizer.json").is_file():
            return None
        backend = Backend.from_file(str(path / "tokenizer.json"))
        config = _read_json(path / "tokenizer_config.json")
        bos, eos = _token_content(config.get("bos_token")), _token_content(config.get("eos_token"))
        # transformers rebuilds the post-processor only when the config says what to add.
        if "add_bos_token" in config or "add_eos_token" in config or backend.post_processor is None:
            backend.post_processor = _bos_eos_template(
                bos if config.get("add_bos_token") else None,
                eos if config.get("add_eos_token") else None,
                backend,
            )
        template_file = path / "chat_template.jinja"
        template = config.get("chat_template")
        if template_file.is_file():
            template = template_file.read_text(encoding="utf-8")
        elif isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        return cls(backend, bos_token=bos, eos_token=eos, chat_template=template)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``; ValueError for text that is not Unicode the tokenizer
        can take (a lone surrogate, from JSON's "\\ud800")."""
        try:
            # encode_batch lets the GIL go while it works (encode holds it): a long text
            # tokenized on a server's worker thread leaves the event loop free.
            return self.backend.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids
        except (TypeError, UnicodeError) as error:
            bad = next((i for i, c in enumerate(text) if 0xD800 <= ord(c) <= 0xDFFF), None)
            where = f" (a lone surrogate at character {bad})" if bad is not None else ""
            raise ValueError(f"the text is not valid Unicode{where}") from error

    @cached_property
    def max_token_chars(self) -> int:
        """Characters of the vocabulary's longest entry: no token stands for more text
        (byte-level entries are a character per byte)."""
        return max(len(t) for t in self.backend.get_vocab(with_added_tokens=True))

    @property
    def normalizes(self) -> bool:
        """Whether text is normalized before it is split (so it may shrink)."""
        return self.backend.normalizer is not None

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """A conversation's prompt text, as transformers' `apply_chat_template(tokenize=False)`."""
        if self.chat_template is None:
            raise ValueError("this tokenizer has no chat template")
        # Unset tokens stay undefined, as in transformers, so `is defined` tests behave the same.
        tokens = {"bos_token": self.bos_token, "eos_token": self.eos_token}
        return self._compiled_template.render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            **{name: token for name, token in tokens.items() if token is not None},
        )

    @cached_property
    def _compiled_template(self) -> jinja2.Template:
        # Templates come from downloaded files, hence the sandbox; the options match transformers'.
        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
        )
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_template_error
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        return env.from_string(self.chat_template)

    @property
    def bos_token_id(self) -> int | None:
        return self.backend.token_to_id(self.bos_token) if self.bos_token else None

    @property
    def eos_token_id(self) -> int | None:
        return self.backend.token_to_id(self.eos_token) if self.eos_token else None

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can produce, added tokens included."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    @cached_property
    def all_special_ids(self) -> list[int]:
        """Ids of every special added token: the ones `decode(skip_special_tokens=True)` drops."""
        return sorted(i for i, t in self.backend.get_added_tokens_decoder().items() if t.special)


def _raise_template_error(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    x: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None, sort_keys=False
) -> str:
    # Jinja's own tojson escapes HTML characters, which would change the prompt text.
    return json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _token_content(token: str | dict | None) -> str | None:
    """tokenizer_config.json stores special tokens as a string or as a serialized AddedToken."""
    return token.get("content") if isinstance(token, dict) else token


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map, the alphabet of byte-level BPE."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), ord("ÿ") + 1)
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(others)}}


def _byte_level_bpe(tokens: list[str], merges: list[str]) -> Backend:
    spelling = _bytes_to_unicode()
    alphabet = set(spelling.values())
    # Some converters store a few tokens as raw text; respell them in the byte alphabet.
    vocab = {
        t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8")): i
        for i, t in enumerate(tokens)
    }
    bpe = models.BPE(
        vocab=vocab,
        merges=[tuple(m.split(" ")) for m in merges],
        continuing_subword_prefix="",
        end_of_word_suffix="",
        fuse_unk=False,
    )
    backend = Backend(bpe)
    backend.decoder = decoders.ByteLevel()
    return backend


def _byte_level_pre_tokenizer(pre: str | None) -> pre_tokenizers.PreTokenizer:
    split = _PRE_TOKENIZER_SPLITS.get(pre)
    if split is None:
        return pre_tokenizers.ByteLevel(add_prefix_space=False)
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


def _sentencepiece_bpe(tokens: list[str], scores: list[float]) -> Backend:
    """Llama/Mistral sentencepiece vocabulary as BPE, as transformers' LlamaTokenizer builds it.

    GGUF stores scores, not merges: every split of a token into two tokens is a merge, ranked by
    the token's score (ties: shorter left, then right piece), as transformers' generate_merges.
    """
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = []
    for piece, score in zip(tokens, scores):
        splits = [(piece[:k], piece[k:]) for k in range(1, len(piece))]
        found = [(left, right, score) for left, right in splits if left in vocab and right in vocab]
        merges += sorted(found, key=lambda m: (vocab[m[0]], vocab[m[1]]))
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    bpe = models.BPE(
        vocab=vocab, merges=[(left, right) for left, right, _ in merges], fuse_unk=True,
        byte_fallback=True,
    )
    backend = Backend(bpe)
    backend.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first", split=False)
    backend.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(left=1),
        ]
    )
    return backend


def _add_special_tokens(
    backend: Backend, tokens: list[str], token_types: list[int], named: list[str], byte_level: bool
) -> None:
    """Keep control and user-defined tokens whole in text, as llama.cpp and transformers do.

    A byte-level vocabulary spells every real token in the byte alphabet, so a control token with
    other characters is a llama.cpp mislabel; transformers skips those and so do we.
    """
    alphabet = set(_bytes_to_unicode().values())
    control = [
        t
        for t, kind in zip(tokens, token_types)
        if kind == _CONTROL and (not byte_level or set(t) <= alphabet)
    ]
    special = list(dict.fromkeys(control + named))
    backend.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in special])
    user = [t for t, kind in zip(tokens, token_types) if kind == _USER_DEFINED]
    if user:  # only tokens the vocabulary spells as-is, which excludes byte-level respellings
        vocab = backend.get_vocab()
        user = [t for t in user if t in vocab]
    backend.add_tokens([AddedToken(t, normalized=False, special=False) for t in user])


def _bos_eos_template(
    bos: str | None, eos: str | None, backend: Backend
) -> processors.TemplateProcessing:
    """Add BOS / EOS (None: do not) around encoded text, as transformers' update_post_processor."""

    def sequence(name: str, type_id: int) -> str:
        return " ".join(f"{piece}:{type_id}" for piece in (bos, name, eos) if piece)

    single = sequence("$A", 0)
    specials = [(t, backend.token_to_id(t)) for t in (bos, eos) if t]
    return processors.TemplateProcessing(
        single=single, pair=f"{single} {sequence('$B', 1)}", special_tokens=specials
    )
