"""Tokenizers for the backbone: ``tokenizer.json``, the vocabulary inside a GGUF file, chat templates.

Media placeholders (``<|image|>``, ``<|video|>``, ``<|speech|>``) get ids just past the tokenizer's
vocabulary, so the frozen vocabulary and its embedding stay untouched: the composed model replaces
those positions before the backbone sees them.
"""

import json
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from sensorium.errors import TokenizerError

PLACEHOLDERS: tuple[str, ...] = ("<|image|>", "<|video|>", "<|speech|>")
MODALITY_OF_PLACEHOLDER = {"<|image|>": "image", "<|video|>": "video", "<|speech|>": "speech"}
_PLACEHOLDER_RE = re.compile("(" + "|".join(re.escape(p) for p in PLACEHOLDERS) + ")")

Message = dict[str, Any]


class ChatFormat:
    """Renders a list of ``{"role", "content"}`` messages to text in one model family's format."""

    name = "base"

    def render(self, messages: Sequence[Message], *, add_generation_prompt: bool = True) -> str:
        raise NotImplementedError

    stop_strings: tuple[str, ...] = ()


class ChatML(ChatFormat):
    """``<|im_start|>role\\ncontent<|im_end|>`` (Qwen, SmolLM2)."""

    name = "chatml"
    stop_strings = ("<|im_end|>",)

    def __init__(self, default_system: str | None = None) -> None:
        self.default_system = default_system

    def render(self, messages: Sequence[Message], *, add_generation_prompt: bool = True) -> str:
        msgs = list(messages)
        if msgs and msgs[0]["role"] == "system" and content_text(msgs[0]["content"]) == "":
            msgs = msgs[1:]  # an empty system message means: no system message, not the default one
        elif self.default_system and msgs and msgs[0]["role"] != "system":
            msgs = [{"role": "system", "content": self.default_system}, *msgs]
        out = "".join(f"<|im_start|>{m['role']}\n{content_text(m['content'])}<|im_end|>\n" for m in msgs)
        return out + ("<|im_start|>assistant\n" if add_generation_prompt else "")


class Llama3Chat(ChatFormat):
    """``<|start_header_id|>role<|end_header_id|>\\n\\ncontent<|eot_id|>`` (Llama 3.x)."""

    name = "llama3"
    stop_strings = ("<|eot_id|>", "<|eom_id|>", "<|end_of_text|>")

    def render(self, messages: Sequence[Message], *, add_generation_prompt: bool = True) -> str:
        out = "<|begin_of_text|>"
        for m in messages:
            out += f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n{content_text(m['content']).strip()}<|eot_id|>"
        if add_generation_prompt:
            out += "<|start_header_id|>assistant<|end_header_id|>\n\n"
        return out


class Llama2Chat(ChatFormat):
    """``<s>[INST] <<SYS>>...<</SYS>> user [/INST] assistant </s>`` (Llama 2 chat)."""

    name = "llama2"
    stop_strings = ("</s>",)

    def render(self, messages: Sequence[Message], *, add_generation_prompt: bool = True) -> str:
        msgs = list(messages)
        system = None
        if msgs and msgs[0]["role"] == "system":
            system = content_text(msgs[0]["content"])
            msgs = msgs[1:]
        out = ""
        for i, m in enumerate(msgs):
            text = content_text(m["content"]).strip()
            if m["role"] == "user":
                if i == 0 and system:
                    text = f"<<SYS>>\n{system}\n<</SYS>>\n\n{text}"
                out += f"<s>[INST] {text} [/INST]"
            elif m["role"] == "assistant":
                out += f" {text} </s>"
            else:
                raise TokenizerError(f"Llama 2 chat has no role {m['role']!r} after the first message")
        return out


CHAT_FORMATS: dict[str, type[ChatFormat]] = {"chatml": ChatML, "llama3": Llama3Chat, "llama2": Llama2Chat}


def content_text(content: str | Sequence[dict[str, Any]]) -> str:
    """Message content as text: a string, or parts (``{"type": "text", "text": ...}``, ``{"type": "image"}``,
    ``{"type": "video"}``, ``{"type": "audio"}``) with media turned into their placeholders."""
    if isinstance(content, str):
        return content
    out = []
    for part in content:
        kind = part.get("type")
        if kind == "text":
            out.append(part["text"])
        elif kind in ("image", "video"):
            out.append(f"<|{kind}|>")
        elif kind in ("audio", "speech"):
            out.append("<|speech|>")
        else:
            raise TokenizerError(f"unknown message part type {kind!r}")
    return "".join(out)


def detect_chat_format(template: str | None) -> str | None:
    """Name of the chat format a Jinja chat template implements, or None when unrecognised."""
    if not template:
        return None
    if "<|im_start|>" in template:
        return "chatml"
    if "<|start_header_id|>" in template:
        return "llama3"
    if "[INST]" in template:
        return "llama2"
    return None


class Tokenizer:
    """Text ↔ ids, with media placeholders and a chat format.

    Args:
        tok: a ``tokenizers.Tokenizer``.
        bos_id: beginning-of-sequence id, or None.
        eos_ids: ids that end generation (the chat format's end-of-turn tokens are added).
        chat_format: ``"chatml"``, ``"llama3"`` or ``"llama2"``, or a :class:`ChatFormat`.
        add_bos: prepend ``bos_id`` in :meth:`encode` by default.
        source: where it was loaded from (for messages).
    """

    def __init__(
        self,
        tok: HFTokenizer,
        *,
        bos_id: int | None = None,
        eos_ids: Iterable[int] = (),
        chat_format: str | ChatFormat = "chatml",
        add_bos: bool = False,
        source: str = "<memory>",
    ) -> None:
        self.tok = tok
        self.bos_id = bos_id
        self.add_bos = add_bos
        self.source = source
        self.chat_format = CHAT_FORMATS[chat_format]() if isinstance(chat_format, str) else chat_format
        stops = set(eos_ids)
        for s in self.chat_format.stop_strings:
            i = tok.token_to_id(s)
            if i is not None:
                stops.add(i)
        self.stop_ids: frozenset[int] = frozenset(stops)
        self.placeholder_base = tok.get_vocab_size(with_added_tokens=True)

    @property
    def vocab_size(self) -> int:
        """Number of real token ids (placeholders excluded)."""
        return self.placeholder_base

    @property
    def placeholder_ids(self) -> dict[str, int]:
        """Placeholder string → id (ids start at :attr:`placeholder_base`, past the vocabulary)."""
        return {p: self.placeholder_base + i for i, p in enumerate(PLACEHOLDERS)}

    def encode(self, text: str, *, bos: bool | None = None) -> list[int]:
        """Ids of ``text``; special tokens in the text (``<|im_start|>``, placeholders) map to their ids."""
        ids: list[int] = []
        if self.add_bos if bos is None else bos:
            assert self.bos_id is not None, f"{self.source}: this tokenizer has no BOS token"
            ids.append(self.bos_id)
        placeholder_ids = self.placeholder_ids
        for piece in _PLACEHOLDER_RE.split(text):
            if piece in placeholder_ids:
                ids.append(placeholder_ids[piece])
            elif piece:
                ids.extend(self.tok.encode(piece, add_special_tokens=False).ids)
        return ids

    def decode(self, ids: Sequence[int], *, skip_special: bool = True) -> str:
        """Text of ``ids``; placeholders are dropped, or rendered when ``skip_special`` is False."""
        inverse = {v: k for k, v in self.placeholder_ids.items()}
        out, run = [], []
        for i in ids:
            if i in inverse:
                out.append(self.tok.decode(run, skip_special_tokens=skip_special))
                run = []
                if not skip_special:
                    out.append(inverse[i])
            else:
                run.append(int(i))
        out.append(self.tok.decode(run, skip_special_tokens=skip_special))
        return "".join(out)

    def render_chat(self, messages: Sequence[Message], *, add_generation_prompt: bool = True) -> str:
        """The chat as text in this tokenizer's format."""
        return self.chat_format.render(messages, add_generation_prompt=add_generation_prompt)

    def apply_chat_template(self, messages: Sequence[Message], *, add_generation_prompt: bool = True) -> list[int]:
        """Ids of the chat, ending with the assistant header when ``add_generation_prompt``."""
        return self.encode(self.render_chat(messages, add_generation_prompt=add_generation_prompt), bos=False)


def load_tokenizer(path: str | Path, *, chat_format: str | None = None) -> Tokenizer:
    """Load a tokenizer from a local path.

    Args:
        path: a ``tokenizer.json`` file, a folder holding one (its ``tokenizer_config.json`` is read for
            BOS/EOS and the chat template), or a ``.gguf`` file whose vocabulary is BPE (``gpt2`` kind).
        chat_format: force ``"chatml"``, ``"llama3"`` or ``"llama2"``; detected from the template otherwise.

    Raises:
        TokenizerError: nothing usable at ``path``.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise TokenizerError(f"{p}: no such file or directory")
    if p.is_dir():
        if (p / "tokenizer.json").is_file():
            return _from_tokenizer_json(p / "tokenizer.json", chat_format)
        ggufs = sorted(p.glob("*.gguf"))
        if len(ggufs) == 1:
            return _from_gguf(ggufs[0], chat_format)
        raise TokenizerError(f"{p}: no tokenizer.json or .gguf file in this folder")
    if p.suffix == ".gguf":
        return _from_gguf(p, chat_format)
    if p.suffix == ".json":
        return _from_tokenizer_json(p, chat_format)
    raise TokenizerError(f"{p}: not a tokenizer (expected tokenizer.json or a .gguf file)")


def _from_tokenizer_json(path: Path, chat_format: str | None) -> Tokenizer:
    try:
        tok = HFTokenizer.from_file(str(path))
    except Exception as e:
        raise TokenizerError(f"{path}: cannot read tokenizer ({e})") from e
    cfg: dict[str, Any] = {}
    cfg_path = path.parent / "tokenizer_config.json"
    if cfg_path.is_file():
        try:
            cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError, RecursionError) as e:  # ValueError: malformed, or huge integers
            raise TokenizerError(f"{cfg_path}: not valid JSON ({e})") from e

    def token_id(value: Any) -> int | None:
        text = value.get("content") if isinstance(value, dict) else value
        return tok.token_to_id(text) if isinstance(text, str) else None

    bos, eos = token_id(cfg.get("bos_token")), token_id(cfg.get("eos_token"))
    template = cfg.get("chat_template")
    fmt = chat_format or detect_chat_format(template if isinstance(template, str) else None) or _guess_format(tok)
    return Tokenizer(
        tok,
        bos_id=bos,
        eos_ids=[eos] if eos is not None else [],
        chat_format=fmt,
        add_bos=bool(cfg.get("add_bos_token", False)) and bos is not None,
        source=str(path),
    )


def _guess_format(tok: HFTokenizer) -> str:
    if tok.token_to_id("<|start_header_id|>") is not None:
        return "llama3"
    if tok.token_to_id("<|im_start|>") is not None:
        return "chatml"
    return "llama2"


# llama.cpp's pre-tokenizer names (tokenizer.ggml.pre) → the split rules they stand for.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _gguf_pre_tokenizer(pre: str | None) -> pre_tokenizers.PreTokenizer:
    if pre in (None, "default", "gpt2", "gpt-2"):
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre == "smollm":
        return pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
        )
    if pre in ("llama-bpe", "llama3", "llama-v3"):
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    raise TokenizerError(f"GGUF pre-tokenizer {pre!r} is not supported (supported: gpt2, smollm, llama-bpe)")


def _from_gguf(path: Path, chat_format: str | None) -> Tokenizer:
    from sensorium.backbone.gguf_file import GGUFFile

    reader = GGUFFile(path)  # unreadable files are a CheckpointError
    kind = reader.field("tokenizer.ggml.model")
    if kind != "gpt2":
        raise TokenizerError(f"{path}: GGUF tokenizer model {kind!r} is not supported (supported: 'gpt2' BPE)")
    tokens = reader.field("tokenizer.ggml.tokens")
    if not tokens:
        raise TokenizerError(f"{path}: GGUF file has no tokenizer.ggml.tokens")
    merges = reader.field("tokenizer.ggml.merges") or []
    types = reader.field("tokenizer.ggml.token_type") or [1] * len(tokens)
    vocab = {t: i for i, t in enumerate(tokens)}
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = _gguf_pre_tokenizer(reader.field("tokenizer.ggml.pre"))
    tok.decoder = decoders.ByteLevel()
    # Control (3) and user-defined (4) tokens are matched whole in text, as llama.cpp does.
    special = [AddedToken(t, special=types[i] == 3, normalized=False) for i, t in enumerate(tokens) if types[i] in (3, 4)]
    tok.add_tokens(special)
    bos = reader.field("tokenizer.ggml.bos_token_id")
    eos = reader.field("tokenizer.ggml.eos_token_id")
    template = reader.field("tokenizer.chat_template")
    fmt_name = chat_format or detect_chat_format(template) or _guess_format(tok)
    fmt: ChatFormat = CHAT_FORMATS[fmt_name]()
    if isinstance(fmt, ChatML) and template:
        # Templates such as SmolLM2's insert a default system prompt when the chat has none.
        m = re.search(r"<\|im_start\|>system\n(.+?)<\|im_end\|>", template)
        fmt.default_system = m.group(1) if m else None
    return Tokenizer(
        tok,
        bos_id=None if bos is None else int(bos),
        eos_ids=[int(eos)] if eos is not None else [],
        chat_format=fmt,
        add_bos=bool(reader.field("tokenizer.ggml.add_bos_token", False)) and bos is not None,
        source=str(path),
    )
