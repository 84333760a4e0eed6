"""One frozen backbone plus any set of trained adapters: forward for training, generate for inference.

Media reach the model as placeholder tokens in the text (``<|image|>``, ``<|video|>``, ``<|speech|>``,
ids just past the vocabulary) plus, per modality, the items in the order their placeholders appear:
``{"image": {"inputs": (I, 3, S, S), "counts": (B,)}}`` (or ``"features": (I, N, D)`` already encoded;
items of different lengths, such as speech, come as lists). Cross-attention adapters see their media
through gated blocks; splice adapters (projection, speech) replace their placeholder positions with
projected encoder tokens — a fixed number per item, or for speech a number computed from its length.

Composition: adapters trained one at a time on the same backbone combine without retraining. Each one sees
only its own modality (its blocks read ``extras[modality]``, its splice fills only its own placeholders), a
modality whose media are absent leaves the result exactly as if its adapter were not composed, and where
two adapters put blocks in front of the same decoder layer they run in the order the adapters are given.
An adapter that does not fit the backbone (another width, blocks past its last layer, a folder trained on
another backbone shape) or its encoder is refused with an error that names the adapter folder.

Media scope (``media_scope``): an image or clip is seen by the text after it until media of another
modality arrive: the next run of placeholders (placeholders side by side, such as the media parts of one
message) that holds another modality's item ends its window. Adapters trained one at a time never saw
text about another medium, nor earlier turns that another adapter had acted on: they learnt to follow
earlier turns as plain text. So by default (``"current"``) a medium whose window has ended acts on no
position at all: in a chat of an image turn, then a clip turn, then a speech turn, the image and clip
turns read as the backbone alone reads their words (as the adapters saw earlier turns in training) and
only the speech turn, the current one, has its medium (spliced speech stays in the context as it is).
``"until_other"`` keeps an ended medium acting on the text of its own window, whose states the later
turns then attend to. Media of one run (``--image a.jpg --audio b.wav`` in one message) are all seen by
the text that follows them, and several images stay visible together. ``"all"`` keeps the Flamingo rule
across modalities: every earlier medium stays visible. With one modality in the text the three are the
same.

Generation can contrast the prompt with its media against the prompt without them (CM3Leon-style
classifier-free guidance, ``contrastive_alpha``; see :mod:`sensorium.backbone.generate`).
"""

from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sensorium.adapters.artifact import AdapterMismatchError
from sensorium.adapters.cross_attention import MediaInputs
from sensorium.adapters.fusion import FusedLayer, fuse, unfuse
from sensorium.backbone.model import Llama
from sensorium.backbone.tokenizer import MODALITY_OF_PLACEHOLDER, PLACEHOLDERS, Tokenizer
from sensorium.encoders.base import Features
from sensorium.errors import SensoriumError

MODALITIES: tuple[str, ...] = tuple(MODALITY_OF_PLACEHOLDER[p] for p in PLACEHOLDERS)  # image, video, speech
PART_TYPES = {"image": "image", "video": "video", "audio": "speech", "speech": "speech"}  # message part type → modality


NO_ENCODER = "no {modality} encoder is composed"
SHARED_PREFIX_MIN = 16  # shorter shared prefixes are run in every row (the saving would not pay for the extra pass)
MEDIA_SCOPES = ("current", "until_other", "all")


class MediaMismatchError(SensoriumError, ValueError):
    """The placeholders in the text do not match the media given (count, modality or adapter)."""


def lm_loss(hidden: torch.Tensor, labels: torch.Tensor, head: nn.Module) -> torch.Tensor:
    """Next-token cross-entropy over labelled positions only (``-100`` = ignore).

    Logits are computed for the labelled positions alone, which saves most of the output-head work; a
    batch with no labels gives a zero loss that still depends on ``hidden`` (never NaN).
    """
    h, y = hidden[:, :-1], labels[:, 1:]  # predict token t+1 from position t
    keep = y != -100  # (B, T-1)
    if not bool(keep.any()):
        return hidden.sum() * 0.0
    logits = head(h[keep])  # (K, vocab)
    return F.cross_entropy(logits.float(), y[keep])


class ComposedModel(nn.Module):
    """A frozen backbone with trained adapters (and their encoders) composed for forward and generation.

    Args:
        backbone: the language model (kept frozen).
        adapters: adapters, at most one per modality.
        encoders: frozen encoders keyed by modality (needed for raw media; not for precomputed features).
        tokenizer: used by :meth:`generate`; its placeholder ids are aligned with the backbone's vocabulary.
        media_scope: ``"current"`` (default), ``"until_other"`` or ``"all"``: how long text sees a medium
            (module docstring).
    """

    def __init__(
        self,
        backbone: Llama,
        adapters: Sequence[nn.Module] = (),
        *,
        encoders: Mapping[str, nn.Module] | None = None,
        tokenizer: Tokenizer | None = None,
        media_scope: str = "current",
    ) -> None:
        super().__init__()
        self.media_scope = check_media_scope(media_scope)
        # a loss computes a prefix all rows share once (see :func:`shared_prefix_length`; not under FSDP)
        self.share_prefix = True
        self.backbone = backbone.requires_grad_(False).eval()
        self.adapters = nn.ModuleDict()
        self.encoders = nn.ModuleDict(dict(encoders or {}))
        self.tokenizer = tokenizer
        vocab = backbone.config.vocab_size
        base = vocab if tokenizer is None else max(vocab, tokenizer.placeholder_base)
        if tokenizer is not None:
            tokenizer.placeholder_base = base
        self.placeholder_ids = {m: base + i for i, m in enumerate(MODALITIES)}
        try:
            for adapter in adapters:
                self.add_adapter(adapter)
        except Exception:
            for modality in list(self.adapters):  # leave the backbone as it was given
                self.remove_adapter(modality)
            raise

    # -------------------------------------------------------------------------------------- adapters
    def add_adapter(self, adapter: nn.Module) -> None:
        """Attach an adapter (its blocks go in front of the backbone layers it names).

        Raises:
            AdapterMismatchError: the adapter (or the encoder composed for its modality) does not fit.
            MediaMismatchError: its modality already has an adapter here, or the backbone already carries
                blocks of that modality from another composition (they would see this one's media).
        """
        name = describe_adapter(adapter)
        if adapter.modality in self.adapters:
            other = describe_adapter(self.adapters[adapter.modality])
            raise MediaMismatchError(f"{name}: {other} is already composed for {adapter.modality}; one adapter per modality")
        self._check_fits(adapter)
        if adapter.blocks:
            stale = [i for i, layer in enumerate(self.backbone.layers) if isinstance(layer, FusedLayer)
                     and any(m == adapter.modality for m, _ in layer.blocks)]
            if stale:
                raise MediaMismatchError(
                    f"{name}: the backbone already carries {adapter.modality} blocks (layers {stale}) from another "
                    f"composition, which would see this one's media; remove_adapter('{adapter.modality}') on that "
                    "model or load the backbone again"
                )
            fuse(self.backbone.layers, adapter)
        self.adapters[adapter.modality] = adapter

    def _check_fits(self, adapter: nn.Module) -> None:
        """The adapter writes the backbone's width, places blocks on existing layers, and reads its encoder's width."""
        name, c = describe_adapter(adapter), self.backbone.config
        dim = getattr(getattr(adapter, "config", None), "dim", None)
        if dim is not None and dim != c.dim:
            raise AdapterMismatchError(f"{name}: writes {dim}-wide embeddings; the backbone's width is {c.dim}")
        outside = [i for i in getattr(adapter, "layers", []) if not 0 <= i < c.n_layers]
        if outside:
            raise AdapterMismatchError(f"{name}: places blocks at layer(s) {outside}; the backbone has {c.n_layers} layers")
        encoder = self.encoders[adapter.modality] if adapter.modality in self.encoders else None
        want, have = media_dim(adapter), getattr(encoder, "out_dim", None)
        if want is not None and have is not None and want != have:
            raise AdapterMismatchError(
                f"{name}: reads {want}-wide {adapter.modality} features; its encoder gives {have}-wide ones"
            )

    def remove_adapter(self, modality: str) -> nn.Module:
        """Detach and return the adapter of ``modality``; the backbone's layers are restored."""
        adapter = self.adapters[modality]
        unfuse(self.backbone.layers, adapter)
        del self.adapters[modality]
        return adapter

    def train(self, mode: bool = True) -> "ComposedModel":
        super().train(mode)
        self.backbone.eval()  # frozen: dropout-free eval mode always
        return self

    # ----------------------------------------------------------------------------------------- media
    def encode(self, modality: str, entry: Mapping[str, Any]) -> Features:
        """Encoder tokens ``(I, N, D)`` and their mask for one modality's items (runs the encoder unless cached)."""
        return encode_entry(self.encoders, modality, entry, missing=NO_ENCODER)

    def item_positions(self, modality: str, item: Any) -> int:
        """Placeholder positions one item fills: the adapter's fixed count, or for variable-length adapters
        the count computed from the item (a raw 1-D waveform, or cached ``(frames, D)`` features)."""
        adapter = self.adapters[modality]
        if not getattr(adapter, "variable_length", False):
            return adapter.tokens_per_item
        if item.ndim == 1:
            if modality not in self.encoders:
                raise MediaMismatchError(f"raw {modality} input but no {modality} encoder is composed")
            return adapter.output_length(self.encoders[modality].output_length(item.shape[0]))
        return adapter.output_length(item.shape[0])

    def prepare(self, tokens: torch.Tensor, media: Mapping[str, Mapping[str, Any]] | None) -> dict[str, Any]:
        """Encode and project the media for ``tokens`` ``(B, T)``: cross-attention inputs or splice embeddings.

        Raises:
            MediaMismatchError: a modality has no adapter, or placeholder counts differ from item counts.
        """
        return prepare_media(self.adapters, self.encoders, self.placeholder_ids, tokens, media,
                             dim=self.backbone.config.dim, owner="composed", no_encoder=NO_ENCODER,
                             scope=self.media_scope)

    @staticmethod
    def _check_positions(modality: str, is_ph: torch.Tensor, counts: torch.Tensor, per_item: torch.Tensor) -> None:
        """Each row's placeholder positions must equal the positions its items fill."""
        row = torch.repeat_interleave(torch.arange(counts.shape[0], device=counts.device), counts)
        expected = torch.zeros_like(counts).index_add_(0, row, per_item.to(counts.dtype))
        have = is_ph.sum(-1)
        if not torch.equal(have, expected):
            b = int((have != expected).nonzero()[0])
            raise MediaMismatchError(
                f"sample {b}: {int(have[b])} <|{modality}|> positions in the text, but {int(counts[b])} "
                f"{modality} item(s) filling {int(expected[b])} position(s)"
            )

    @staticmethod
    def _cross_attention_inputs(adapter: nn.Module, feats: torch.Tensor, counts: torch.Tensor,
                                is_ph: torch.Tensor) -> MediaInputs:
        B, M = counts.shape[0], max(int(counts.max()), 1)
        I, N, D = feats.shape
        row = torch.repeat_interleave(torch.arange(B, device=feats.device), counts)  # (I,)
        first = torch.cumsum(counts, 0) - counts  # index of each row's first item
        col = torch.arange(I, device=feats.device) - first[row]  # item index within its row
        grid = feats.new_zeros(B, M, N, D)
        grid[row, col] = feats  # (B, M, N, D)
        valid = torch.zeros(B, M, dtype=torch.bool, device=feats.device)
        valid[row, col] = True
        slot = torch.full((B, M), torch.iinfo(torch.long).max, dtype=torch.long, device=feats.device)
        rows, positions = is_ph.nonzero(as_tuple=True)  # row-major: placeholders in reading order
        slot[row, col] = positions
        assert torch.equal(rows, row), "placeholder rows must match item rows"
        return adapter.prepare(grid, valid, slot)

    def embed(self, tokens: torch.Tensor, state: Mapping[str, Any]) -> torch.Tensor:
        """Input embeddings ``(B, T, dim)``: token embeddings with placeholder positions filled in."""
        return embed_with_media(self.backbone.embed, self.backbone.config.vocab_size, self.adapters,
                                self.placeholder_ids, tokens, state, owner="composed")

    # --------------------------------------------------------------------------------------- forward
    def forward(
        self,
        tokens: torch.Tensor,
        *,
        media: Mapping[str, Mapping[str, Any]] | None = None,
        media_state: Mapping[str, Any] | None = None,
        labels: torch.Tensor | None = None,
        pad_mask: torch.Tensor | None = None,
        start: int = 0,
        last_only: bool = False,
    ) -> torch.Tensor:
        """Logits ``(B, T, vocab)``, or the mean next-token loss when ``labels`` are given.

        Args:
            tokens: ids with placeholders ``(B, T)``.
            media: per modality, the items for the placeholders (see the module docstring).
            media_state: the result of :meth:`prepare`, to reuse encoded media (generation).
            labels: ``(B, T)`` targets, ``-100`` where no loss is taken.
            pad_mask: ``(B, start + T)`` real-token mask for left-padded batches.
            start: cache slot of the first position.
            last_only: logits of the last position only.
        """
        state = media_state if media_state is not None else self.prepare(tokens, media)
        x = self.embed(tokens, state if start == 0 else {})
        extras = {m: s for m, s in state.items() if isinstance(s, MediaInputs)}
        if labels is None:
            return self.backbone(embeds=x, pad_mask=pad_mask, start=start, extras=extras, last_only=last_only)
        shared = 0
        if self.share_prefix and start == 0 and pad_mask is None and not self.backbone.caches_enabled:
            shared = shared_prefix_length(tokens, labels, self.placeholder_ids.values())
        if shared < SHARED_PREFIX_MIN or _sharded(self.backbone):  # the module walk only where a prefix is shared
            hidden = self.backbone(embeds=x, pad_mask=pad_mask, start=start, extras=extras, return_hidden=True)
            return lm_loss(hidden, labels, self.backbone.lm_head)
        # The rows start with the same text (earlier turns of a chat) that no medium and no label depends
        # on: its keys and values are computed once, without gradients, and every row continues from them.
        prefix = self.backbone.prefix_kv(x[:1, :shared].detach())
        hidden = self.backbone(embeds=x[:, shared:], prefix=prefix, extras=extras, return_hidden=True)
        return lm_loss(hidden, labels[:, shared:], self.backbone.lm_head)

    def setup_caches(self, batch_size: int, max_len: int, *, dtype: torch.dtype | None = None) -> None:
        self.backbone.setup_caches(batch_size, max_len, dtype=dtype)

    def clear_caches(self) -> None:
        self.backbone.clear_caches()

    # ------------------------------------------------------------------------------------ generation
    def expand_placeholders(self, ids: Sequence[int], items: Mapping[str, Sequence[Any]] | None = None) -> list[int]:
        """Repeat each splice adapter's placeholder to the positions of its item (``items``: per modality, the
        preprocessed items in placeholder order; needed for variable-length adapters such as speech)."""
        out: list[int] = []
        modality_of = {self.placeholder_ids[m]: m for m in self.adapters}
        seen = {m: 0 for m in self.adapters}
        for i in ids:
            m = modality_of.get(i)
            if m is None or self.adapters[m].blocks:
                out.append(i)
                continue
            if getattr(self.adapters[m], "variable_length", False):
                group = (items or {}).get(m, [])
                if seen[m] >= len(group):
                    raise MediaMismatchError(f"more <|{m}|> placeholders than {m} items")
                out.extend([i] * self.item_positions(m, group[seen[m]]))
            else:
                out.extend([i] * self.adapters[m].tokens_per_item)
            seen[m] += 1
        return out

    @torch.inference_mode()
    def generate(
        self,
        messages: Sequence[Mapping[str, Any]] | Sequence[Sequence[Mapping[str, Any]]],
        *,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        system: str | None = None,
        on_token: Callable[[int, int], None] | None = None,
        contrastive_alpha: float = 0.0,
    ) -> str | list[str]:
        """Answer one conversation (or a batch of them) whose messages may hold media.

        Message content is a string or a list of parts: ``{"type": "text", "text": ...}``,
        ``{"type": "image", "image": path | PIL image | array | tensor}`` (likewise ``video``, ``audio``).
        Media are encoded once; cross-attention K/V are computed once per generation.

        Args:
            messages: a conversation, or a list of conversations (answered as one batch).
            max_new_tokens: most tokens per answer.
            temperature: 0 for greedy decoding.
            top_p: nucleus sampling mass.
            seed: sampling seed.
            system: system message (None: the tokenizer's default; "": no system message).
            on_token: streaming callback ``(row, token_id)``.
            contrastive_alpha: contrastive decoding weight ``α``: the next token is chosen from
                ``(1 + α) · logits(chat) − α · logits(chat without its media)`` (see :meth:`generate_ids`);
                0 (the default) is plain decoding.
        """
        assert self.tokenizer is not None, "compose(..., tokenizer=...) is needed for generate"
        single = bool(messages) and isinstance(messages[0], Mapping)
        chats = [messages] if single else list(messages)
        chats_ids, items = [], {m: [] for m in MODALITIES}
        counts = {m: [] for m in MODALITIES}
        for chat in chats:
            chat = list(chat)
            if system is not None:
                chat = [{"role": "system", "content": system}] + [m for m in chat if m["role"] != "system"]
            per_chat = {m: 0 for m in MODALITIES}
            for msg in chat:
                if isinstance(msg["content"], str):
                    continue
                for part in msg["content"]:
                    modality = PART_TYPES.get(part.get("type", ""))
                    if modality is not None:
                        items[modality].append(part.get(part["type"]))
                        per_chat[modality] += 1
            for m in MODALITIES:
                counts[m].append(per_chat[m])
            chats_ids.append(self.tokenizer.apply_chat_template(chat))
        device = next(self.backbone.parameters()).device
        inputs = {m: [x.to(device) for x in self.preprocess(m, items[m])] for m in MODALITIES if items[m]}
        prompts, start = [], {m: 0 for m in inputs}
        for b, ids in enumerate(chats_ids):
            own = {m: v[start[m] : start[m] + counts[m][b]] for m, v in inputs.items()}
            prompts.append(self.expand_placeholders(ids, own))
            for m in inputs:
                start[m] += counts[m][b]
        media = {m: {"inputs": stack_items(v), "counts": counts[m]} for m, v in inputs.items()}
        out = self.generate_ids(prompts, media, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                seed=seed, on_token=on_token, contrastive_alpha=contrastive_alpha)
        texts = [self.tokenizer.decode(o) for o in out]
        return texts[0] if single else texts

    @torch.inference_mode()
    def generate_ids(
        self,
        prompts: Sequence[Sequence[int]],
        media: Mapping[str, Mapping[str, Any]] | None = None,
        *,
        max_new_tokens: int = 64,
        stop_ids: Sequence[int] | None = None,
        contrastive_alpha: float = 0.0,
        **sampling: Any,
    ) -> list[list[int]]:
        """Continue token prompts (placeholders already expanded) given their media; new ids per prompt.

        Media are encoded and projected once, before decoding starts.

        Contrastive decoding (``contrastive_alpha`` = α > 0, CM3Leon's classifier-free guidance): each prompt
        also runs without its media — its placeholder positions removed, so no cross-attention block sees
        media and nothing is spliced — as a second batch half with its own KV-cache rows (one forward of
        ``2B`` rows per step), and the next token is chosen from
        ``(1 + α) · logits_with_media − α · logits_without_media``. α = 0 is plain decoding (the same code
        path); a batch without any media decodes plainly too (both halves would be equal).

        Args:
            prompts: token ids per prompt, placeholders expanded (:meth:`expand_placeholders`).
            media: per modality, the items for the placeholders (see the module docstring).
            max_new_tokens: most tokens per answer.
            stop_ids: ids that end an answer (default: the tokenizer's).
            contrastive_alpha: guidance weight α (>= 0).
            **sampling: ``temperature``, ``top_p``, ``seed``, ``on_token``, ``use_cache`` of
                :func:`~sensorium.backbone.generate.generate`.
        """
        from sensorium.backbone.generate import check_contrastive_alpha, generate

        alpha = check_contrastive_alpha(contrastive_alpha)
        prompts = [list(p) for p in prompts]
        without = self.without_media(prompts) if alpha != 0 else None
        rows = prompts + (without or [])
        device = next(self.backbone.parameters()).device
        L = max(len(p) for p in rows)
        padded = torch.zeros(len(rows), L, dtype=torch.long, device=device)  # left-padded, as generate() does
        for i, p in enumerate(rows):
            padded[i, L - len(p) :] = torch.tensor(p, device=device)
        if without is not None:  # the contrast rows hold no item of any modality
            media = {m: {**entry, "counts": torch.cat([torch.as_tensor(entry["counts"]).long().cpu(),
                                                       torch.zeros(len(without), dtype=torch.long)])}
                     for m, entry in (media or {}).items()}
        state = self.prepare(padded, media)
        if stop_ids is None:
            stop_ids = sorted(self.tokenizer.stop_ids) if self.tokenizer is not None else []
        return generate(self, prompts, max_new_tokens=max_new_tokens, stop_ids=stop_ids,
                        forward_kwargs={"media_state": state}, contrastive_alpha=alpha if without else 0.0,
                        contrastive_prompts=without, **sampling)

    def without_media(self, prompts: Sequence[Sequence[int]]) -> list[list[int]] | None:
        """The prompts with every media placeholder removed, or None when no prompt holds one.

        Raises:
            MediaMismatchError: a prompt is nothing but media (contrastive decoding needs text to fall back on).
        """
        ph = set(self.placeholder_ids.values())
        if not any(i in ph for p in prompts for i in p):
            return None
        out = [[i for i in p if i not in ph] for p in prompts]
        for b, p in enumerate(out):
            if not p:
                raise MediaMismatchError(f"prompt {b} holds only media: contrastive decoding needs text besides them")
        return out

    def preprocess(self, modality: str, raw: Sequence[Any]) -> list[torch.Tensor]:
        """The encoder's preprocessing of raw items (paths, arrays, tensors)."""
        if modality not in self.encoders:
            raise MediaMismatchError(f"{modality} input but no {modality} encoder is composed")
        encoder = self.encoders[modality]
        return [encoder.preprocess(Path(r) if isinstance(r, str) else r) for r in raw]


def describe_adapter(adapter: nn.Module) -> str:
    """How errors name an adapter: its folder when it was loaded from one."""
    source = getattr(adapter, "source", None)
    return str(source) if source is not None else f"the {adapter.modality} adapter ({type(adapter).__name__})"


def media_dim(adapter: nn.Module) -> int | None:
    """Width of the encoder features an adapter reads (None when it does not say)."""
    perceiver = getattr(adapter, "perceiver_config", None)
    if perceiver is not None:
        return perceiver.media_dim
    return getattr(getattr(adapter, "config", None), "media_dim", None)


def _sharded(module: nn.Module) -> bool:
    """Whether ``module`` holds FSDP units: their forwards gather parameters from every rank, so an extra pass
    on one rank (a shared prefix that another rank's batch does not have) would leave the ranks waiting."""
    from torch.distributed import fsdp

    kinds = tuple(k for k in (getattr(fsdp, "FullyShardedDataParallel", None), getattr(fsdp, "FSDPModule", None)) if k)
    return any(isinstance(m, kinds) for m in module.modules())


def shared_prefix_length(tokens: torch.Tensor, labels: torch.Tensor, placeholder_ids: Iterable[int]) -> int:
    """How many leading positions of ``tokens`` ``(B, T)`` every row shares, with no placeholder among them
    and no label up to one past them (the last shared position predicts no target): the prefix a loss can
    take from one row's keys and values without changing its value or gradients. Leaves at least one
    position after it."""
    T = tokens.shape[1]
    same = (tokens == tokens[:1]).all(0) & ~torch.isin(tokens[0], torch.tensor(list(placeholder_ids), device=tokens.device))
    unlabelled = (labels == -100).all(0)
    ok = same & torch.cat([unlabelled[1:], unlabelled.new_zeros(1)])  # position t shares and t + 1 has no label
    return min(int(ok.long().cumprod(0).sum()), T - 1)


def check_media_scope(scope: str) -> str:
    if scope not in MEDIA_SCOPES:
        raise ValueError(f"media_scope must be one of {', '.join(MEDIA_SCOPES)}, got {scope!r}")
    return scope


def other_media_start(tokens: torch.Tensor, placeholder_ids: Mapping[str, int], modality: str,
                      slots: torch.Tensor) -> torch.Tensor:
    """For ``modality`` items whose placeholders stand at ``slots`` ``(B, L)``: the slot where the next run of
    placeholders holding another modality's item begins (a run: placeholders side by side), after the
    item's own run; ``int64`` max where none follows."""
    B, T = tokens.shape
    big = torch.iinfo(torch.long).max
    pos = torch.arange(T, device=tokens.device).expand(B, T)
    ph = torch.isin(tokens, torch.tensor(list(placeholder_ids.values()), device=tokens.device))  # (B, T)
    other = ph & (tokens != placeholder_ids[modality])
    before, after = F.pad(ph[:, :-1], (1, 0)), F.pad(ph[:, 1:], (0, 1))
    run_start = torch.where(ph & ~before, pos, -1).cummax(-1).values  # (B, T) start of the run at or before t
    run_end = torch.where(ph & ~after, pos, big).flip(-1).cummin(-1).values.flip(-1)  # end of the run at or after t
    next_other = torch.where(other, pos, big).flip(-1).cummin(-1).values.flip(-1)  # (B, T)
    next_other = torch.cat([next_other, next_other.new_full((B, 1), big)], 1)  # (B, T + 1): none past the end
    last = run_end.gather(1, slots.clamp(max=T - 1)).clamp(max=T - 1)  # (B, L) last slot of each item's run
    nxt = next_other.gather(1, last + 1)  # first other-modality placeholder after it
    return torch.where(nxt < big, run_start.gather(1, nxt.clamp(max=T - 1)), big)


def prepare_media(adapters: Mapping[str, nn.Module], encoders: Mapping[str, nn.Module], placeholder_ids: Mapping[str, int],
                  tokens: torch.Tensor, media: Mapping[str, Mapping[str, Any]] | None, *, dim: int,
                  owner: str, no_encoder: str = "no {modality} encoder", scope: str = "current") -> dict[str, Any]:
    """Encode and project ``media`` for ``tokens`` ``(B, T)``: per modality, cross-attention inputs
    (:class:`MediaInputs`) or splice embeddings ``(positions, dim)``. ``owner`` words the errors
    ("no image adapter is composed" / "is attached"); ``no_encoder`` is the message for raw media without
    an encoder; ``scope`` is the media scope (module docstring).

    Raises:
        MediaMismatchError: a modality has no adapter, or placeholder counts differ from item counts.
    """
    state: dict[str, Any] = {}
    present = {m for m, i in placeholder_ids.items() if bool((tokens == i).any())}
    for modality in sorted(present - set(media or {})):
        raise MediaMismatchError(f"the text holds <|{modality}|> placeholders but no {modality} media was given")
    for modality, entry in (media or {}).items():
        if modality not in adapters:
            raise MediaMismatchError(f"{modality} media given but no {modality} adapter is {owner}")
        adapter = adapters[modality]
        counts = torch.as_tensor(entry["counts"], device=tokens.device).long()  # (B,)
        is_ph = tokens == placeholder_ids[modality]  # (B, T)
        if int(counts.sum()) == 0:
            if bool(is_ph.any()):
                raise MediaMismatchError(f"<|{modality}|> placeholders in the text but no {modality} item given")
            continue  # no item of this modality in the batch: its blocks are skipped
        variable = getattr(adapter, "variable_length", False)
        if not variable:  # fixed positions per item: check before encoding
            per_item = torch.full_like(counts, adapter.tokens_per_item).repeat_interleave(counts)
            ComposedModel._check_positions(modality, is_ph, counts, per_item)
        feats = encode_entry(encoders, modality, entry, missing=no_encoder)  # (I, N, D) + mask
        if variable:
            emb, valid = adapter(feats.values, feats.mask)  # (I, N', dim), (I, N')
            ComposedModel._check_positions(modality, is_ph, counts, valid.sum(-1))
            state[modality] = emb[valid]  # (sum of positions, dim), items in order
            continue
        values = feats.values
        if hasattr(adapter, "resample"):
            values = adapter.resample(values)  # video: frames merged into latents (I, N', D')
        if adapter.blocks:
            state[modality] = ComposedModel._cross_attention_inputs(adapter, values, counts, is_ph)
        else:
            state[modality] = adapter(values).reshape(-1, dim)  # (I*N, dim)
    if check_media_scope(scope) != "all" and len(present) > 1:
        for modality, inputs in state.items():
            if isinstance(inputs, MediaInputs):
                end = other_media_start(tokens, placeholder_ids, modality, inputs.token_slot)
                if scope == "until_other":
                    inputs.token_end = end
                else:  # "current": an item whose window has ended acts on no position at all
                    inputs.token_valid = inputs.token_valid & (end == torch.iinfo(torch.long).max)
    return state


def embed_with_media(embed: nn.Module, vocab: int, adapters: Mapping[str, nn.Module], placeholder_ids: Mapping[str, int],
                     tokens: torch.Tensor, state: Mapping[str, Any], *, owner: str) -> torch.Tensor:
    """Token embeddings ``(B, T, dim)`` from ``embed``, with placeholder positions filled in: a cross-attention
    adapter's placeholder embedding, or a splice adapter's prepared embeddings from ``state``."""
    is_ph = tokens >= vocab
    x = embed(tokens.masked_fill(is_ph, 0))  # (B, T, dim)
    if not bool(is_ph.any()):
        return x
    for modality, ph in placeholder_ids.items():
        where = tokens == ph
        if not bool(where.any()):
            continue
        if modality not in adapters:
            raise MediaMismatchError(f"<|{modality}|> in the text but no {modality} adapter is {owner}")
        adapter = adapters[modality]
        if adapter.blocks:
            fill = adapter.placeholder_embedding.to(x.dtype).expand(int(where.sum()), -1)
        elif modality in state:
            fill = state[modality].to(x.dtype)
        else:
            raise MediaMismatchError(f"<|{modality}|> in the text but no prepared {modality} media")
        x = x.masked_scatter(where[..., None], fill)
    unknown = is_ph & ~torch.isin(tokens, torch.tensor(list(placeholder_ids.values()), device=tokens.device))
    if bool(unknown.any()):
        raise ValueError(f"token id {int(tokens[unknown][0])} is outside the vocabulary [0, {vocab})")
    return x


def encode_entry(encoders: Mapping[str, nn.Module], modality: str, entry: Mapping[str, Any], *,
                 missing: str = "no {modality} encoder") -> Features:
    """One modality's media entry as encoder tokens ``(I, N, D)`` with their mask: ``"features"`` as given
    (a list of different lengths is padded), or ``encoders[modality]`` run on ``"inputs"``."""
    if "features" in entry:
        feats = entry["features"]
        if isinstance(feats, torch.Tensor):
            return Features(feats, torch.ones(feats.shape[:2], dtype=torch.bool, device=feats.device))
        lengths = torch.tensor([f.shape[0] for f in feats], device=feats[0].device)
        padded = nn.utils.rnn.pad_sequence(list(feats), batch_first=True)  # (I, N, D)
        return Features(padded, torch.arange(padded.shape[1], device=padded.device)[None] < lengths[:, None])
    if modality not in encoders:
        raise MediaMismatchError(f"raw {modality} input but " + missing.format(modality=modality))
    encoder = encoders[modality]
    grad = any(p.requires_grad for p in encoder.parameters())
    with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
        return encoder(entry["inputs"])


def stack_items(items: list[torch.Tensor]) -> torch.Tensor | list[torch.Tensor]:
    """One tensor when the items share a shape, else the list (variable-length media)."""
    return torch.stack(items) if len({tuple(x.shape) for x in items}) == 1 else items


def compose(
    backbone: Llama,
    adapters: Sequence[nn.Module | str | Path],
    *,
    tokenizer: Tokenizer | None = None,
    strict: bool = False,
    media_scope: str = "current",
) -> ComposedModel:
    """One model from a backbone and trained adapters (modules or adapter folders).

    Adapter folders are checked against the backbone (shapes must match; a weight-hash mismatch warns,
    or fails with ``strict=True``) and bring their encoders. Adapters trained separately on the same
    backbone combine without retraining: each sees only its own media.

    Args:
        backbone: the frozen language model (its layers get the adapters' blocks).
        adapters: adapter modules or folders, at most one per modality.
        tokenizer: needed for :meth:`ComposedModel.generate`.
        strict: refuse a backbone whose embedding weights differ from the adapter's (else a warning).
        media_scope: ``"current"`` (default), ``"until_other"`` or ``"all"``: how long text sees a medium
            (module docstring).

    Raises:
        AdapterMismatchError: an adapter does not fit the backbone or its encoder (the error names its folder).
        AdapterError: a folder is malformed.
        MediaMismatchError: two adapters of one modality.
    """
    from sensorium.adapters.artifact import load_adapter, load_encoder

    modules, encoders = [], {}
    for a in adapters:
        if isinstance(a, (str, Path)):
            module = load_adapter(a, backbone=backbone, strict=strict)
            encoders[module.modality] = load_encoder(a)
        else:
            module = a
        modules.append(module)
    return ComposedModel(backbone, modules, encoders=encoders, tokenizer=tokenizer, media_scope=media_scope)


__all__ = ["MEDIA_SCOPES", "PART_TYPES", "ComposedModel", "MediaMismatchError", "compose", "describe_adapter", "lm_loss", "media_dim"]
