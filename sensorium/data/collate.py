"""Batching decoded samples into chat-formatted token ids, labels and media.

A caption sample (``{"text": ...}``) becomes a one-turn chat: the user turn holds one placeholder per
media item followed by the instruction, the assistant turn is the caption. An instruction sample
(``{"messages": [...]}``) keeps its turns; its content marks media with ``<|image|>``-style placeholders.
Loss is taken on assistant turns only (labels ``-100`` elsewhere). Splice adapters need several
positions per item, so their placeholder is repeated to that length here. Truncation never cuts a
media span: the cut moves in front of the span and the items beyond it are dropped.
"""

import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from sensorium.backbone.tokenizer import PLACEHOLDERS, Tokenizer

Lengths = Mapping[str, int | Callable[[Any], int]]
PLACEHOLDER_OF = {"image": "<|image|>", "video": "<|video|>", "speech": "<|speech|>"}


@dataclass
class Batch:
    """A training batch.

    Attributes:
        tokens: ``(B, T)`` ids with placeholder ids, right-padded.
        labels: ``(B, T)`` targets, ``-100`` where no loss is taken.
        media: per modality ``{"inputs": (I, ...), "counts": (B,)}`` (``"features"`` instead of ``"inputs"``
            for cached encoder outputs).
        keys: sample keys.
        bad: ``(url, key, reason)`` of samples skipped while building this batch.
        extra: per-sample fields kept for evaluation (reference text, attributes).
    """

    tokens: torch.Tensor
    labels: torch.Tensor
    media: dict[str, dict[str, Any]]
    keys: list[str]
    bad: list[tuple[str, str, str]] = field(default_factory=list)
    extra: list[dict[str, Any]] = field(default_factory=list)

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def to(self, device: torch.device | str) -> "Batch":
        media = {m: {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in e.items()}
                 for m, e in self.media.items()}
        return Batch(self.tokens.to(device), self.labels.to(device), media, self.keys, self.bad, self.extra)


def _key_rng(sample: Mapping[str, Any], stream: int = 0) -> np.random.Generator:
    """A random stream fixed by the sample's key (the same choices every epoch and in every worker)."""
    return np.random.default_rng([zlib.crc32(str(sample.get("__key__")).encode()), stream])


class ChatCollator:
    """Build :class:`Batch` es from decoded samples.

    Args:
        tokenizer: the backbone's tokenizer.
        placeholder_ids: placeholder id per modality (as the composed model numbers them).
        tokens_per_item: positions each item occupies, per modality: an int, or a function of the item.
        prompt: the instruction after the media in caption samples.
        system: system message (None: the tokenizer's default; "": none).
        max_len: longest sequence in tokens.
        pad_id: id for padding positions.
        features: the items are cached encoder outputs (batched under ``"features"``), not raw media.
        context_turns: share of batches whose chats start with one or two earlier text-only turns about
            media of the other modalities (:func:`~sensorium.data.synthetic.earlier_turns`, drawn from the
            key of the batch's first sample; not trained on), so an adapter learns to work later in a
            conversation about other media too. Whole batches, so the others are not padded to the longer
            chats; the chats of a batch share their earlier turns, so the model computes them once (see
            :func:`~sensorium.compose.shared_prefix_length`). 0 (default): none.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        placeholder_ids: Mapping[str, int],
        *,
        tokens_per_item: Lengths | None = None,
        prompt: str = "Describe the image.",
        system: str | None = "",
        max_len: int = 128,
        pad_id: int = 0,
        features: bool = False,
        context_turns: float = 0.0,
    ) -> None:
        if not 0.0 <= context_turns <= 1.0:
            raise ValueError(f"context_turns is a share in [0, 1], got {context_turns}")
        self.context_turns = context_turns
        self.tokenizer, self.placeholder_ids = tokenizer, dict(placeholder_ids)
        self.tokens_per_item = dict(tokens_per_item or {})
        self.prompt, self.system, self.max_len, self.pad_id = prompt, system, max_len, pad_id
        self.features = features
        others = tuple(m for m in PLACEHOLDER_OF if m not in self.placeholder_ids)
        self.earlier_kinds = others or tuple(PLACEHOLDER_OF)  # what earlier turns are about
        self._text_ids = {tokenizer.placeholder_ids[PLACEHOLDER_OF[m]]: m for m in self.placeholder_ids}

    # ------------------------------------------------------------------------------------ per sample
    def messages(self, sample: Mapping[str, Any], *, context: bool | Sequence[Mapping[str, Any]] = False
                 ) -> list[dict[str, Any]]:
        """The chat of a sample (caption samples become one user/assistant turn); ``context``: after earlier
        text-only turns (see ``context_turns``), drawn from the sample's key when True, or these turns."""
        if "messages" in sample:
            msgs = [dict(m) for m in sample["messages"]]
        else:
            marks = "".join(PLACEHOLDER_OF[m] * len(items) for m, items in sample.get("media", {}).items())
            msgs = [{"role": "user", "content": marks + self.prompt}, {"role": "assistant", "content": sample["text"]}]
        if context:
            head = 1 if msgs[0]["role"] == "system" else 0
            earlier = self.earlier_turns(sample) if context is True else context
            msgs = [*msgs[:head], *(dict(m) for m in earlier), *msgs[head:]]
        if self.system is not None and not (msgs and msgs[0]["role"] == "system"):
            msgs = [{"role": "system", "content": self.system}, *msgs]
        return msgs

    def earlier_turns(self, sample: Mapping[str, Any]) -> list[dict[str, Any]]:
        """The earlier turns drawn from ``sample``'s key (see ``context_turns``)."""
        from sensorium.data.synthetic import earlier_turns

        return earlier_turns(_key_rng(sample), self.earlier_kinds)

    def encode(self, sample: Mapping[str, Any], *, context: bool | Sequence[Mapping[str, Any]] = False
               ) -> tuple[list[int], list[int], dict[str, list[Any]]]:
        """Token ids, labels and the media items kept after truncation (``context``: see :meth:`messages`)."""
        msgs = self.messages(sample, context=context)
        render = self.tokenizer.render_chat
        prefixes = [render(msgs[:i], add_generation_prompt=False) for i in range(len(msgs) + 1)]
        ids: list[int] = []
        labels: list[int] = []
        for i, m in enumerate(msgs):
            before, after = prefixes[i], prefixes[i + 1]
            if not after.startswith(before):
                raise ValueError(f"chat format {self.tokenizer.chat_format.name} does not render turn by turn")
            if m["role"] == "assistant":
                prompt = render(msgs[:i], add_generation_prompt=True)
                h = self.tokenizer.encode(prompt[len(before):])
                b = self.tokenizer.encode(after[len(prompt):])
                ids += h + b
                # loss on the assistant's words and its end-of-turn token (not on context answers)
                labels += [-100] * len(h) + (b if m.get("loss", True) else [-100] * len(b))
            else:
                t = self.tokenizer.encode(after[len(before):])
                ids += t
                labels += [-100] * len(t)
        return self._expand_and_truncate(ids, labels, sample.get("media", {}))

    def prompt_ids(self, sample: Mapping[str, Any]) -> tuple[list[int], dict[str, list[Any]]]:
        """Ids of the chat up to the (last) assistant answer, ending in the assistant header; and its media."""
        msgs = self.messages(sample)
        if msgs[-1]["role"] == "assistant":
            msgs = msgs[:-1]
        ids = self.tokenizer.encode(self.tokenizer.render_chat(msgs, add_generation_prompt=True))
        ids, _, media = self._expand_and_truncate(ids, [-100] * len(ids), sample.get("media", {}))
        return ids, media

    def _expand_and_truncate(self, ids: list[int], labels: list[int], media: Mapping[str, Sequence[Any]]
                             ) -> tuple[list[int], list[int], dict[str, list[Any]]]:
        out_ids: list[int] = []
        out_labels: list[int] = []
        spans: list[tuple[int, int, str]] = []  # (start, end, modality) per item, in reading order
        seen = {m: 0 for m in self.placeholder_ids}
        for i, y in zip(ids, labels, strict=True):
            modality = self._text_ids.get(i)
            if modality is None:
                out_ids.append(i)
                out_labels.append(y)
                continue
            items = media.get(modality, [])
            if seen[modality] >= len(items):
                raise ValueError(f"more <|{modality}|> placeholders than {modality} items ({len(items)})")
            n = self._length(modality, items[seen[modality]])
            seen[modality] += 1
            spans.append((len(out_ids), len(out_ids) + n, modality))
            out_ids += [self.placeholder_ids[modality]] * n
            out_labels += [-100] * n
        for modality, items in media.items():
            if seen.get(modality, 0) != len(items):
                raise ValueError(f"{len(items)} {modality} items but {seen.get(modality, 0)} placeholders")
        cut = len(out_ids)
        if cut > self.max_len:
            cut = self.max_len
            for start, end, _ in spans:
                if start < cut < end:
                    cut = start  # never leave part of a media span
        kept: dict[str, list[Any]] = {m: [] for m in media}
        index = {m: 0 for m in media}
        for start, _, modality in spans:
            if start < cut:
                kept[modality].append(media[modality][index[modality]])
            index[modality] += 1
        return out_ids[:cut], out_labels[:cut], {m: v for m, v in kept.items() if v}

    def _length(self, modality: str, item: Any) -> int:
        n = self.tokens_per_item.get(modality, 1)
        return n(item) if callable(n) else n

    # ---------------------------------------------------------------------------------------- batch
    def __call__(self, samples: Sequence[Mapping[str, Any]]) -> Batch:
        bad = [(s.get("__url__", "?"), s.get("__key__", "?"), s["__bad__"]) for s in samples if "__bad__" in s]
        good = [s for s in samples if "__bad__" not in s]
        rows, media_items = [], {m: [] for m in self.placeholder_ids}
        counts = {m: [] for m in self.placeholder_ids}
        keys, extra = [], []
        context: list[dict[str, Any]] | bool = False
        if good and self.context_turns > 0 and _key_rng(good[0], 1).random() < self.context_turns:
            context = self.earlier_turns(good[0])  # one set for the whole batch
        for s in good:
            try:
                ids, labels, kept = self.encode(s, context=context)
            except ValueError as e:
                bad.append((s.get("__url__", "?"), s.get("__key__", "?"), str(e)))
                continue
            rows.append((ids, labels))
            for m in self.placeholder_ids:
                items = kept.get(m, [])
                media_items[m] += items
                counts[m].append(len(items))
            keys.append(s.get("__key__", "?"))
            extra.append({k: s[k] for k in ("text", "attributes", "messages", "task") if k in s})
        T = max((len(r[0]) for r in rows), default=1)
        tokens = torch.full((len(rows), T), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), T), -100, dtype=torch.long)
        for i, (ids, ys) in enumerate(rows):
            tokens[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            labels[i, : len(ys)] = torch.tensor(ys, dtype=torch.long)
        kind = "features" if self.features else "inputs"
        media = {m: {kind: _stack(items), "counts": torch.tensor(counts[m], dtype=torch.long)}
                 for m, items in media_items.items() if items}
        return Batch(tokens, labels, media, keys, bad, extra)


def _stack(items: list[Any]) -> Any:
    if all(isinstance(x, torch.Tensor) for x in items) and len({tuple(x.shape) for x in items}) == 1:
        return torch.stack(items)
    return items


__all__ = ["PLACEHOLDERS", "Batch", "ChatCollator"]
