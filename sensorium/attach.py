"""Attaching trained sensorium adapters to a decoder that is not sensorium's (first: transformers' Llama).

::

    handle = sensorium.attach(hf_model, adapter)  # a module, an adapter folder, or a list of them
    out = handle(input_ids, media={"image": {"features": feats, "counts": counts}}, attention_mask=mask)
    out.logits                                     # whatever the model returns (HF: a ModelOutput)
    handle.detach()                                # the model is exactly as it was

**Finding the decoder.** :data:`LAYOUTS` lists known attribute paths of the decoder-layer
``nn.ModuleList`` and the token embedding (``model.layers`` / ``model.embed_tokens`` for
``LlamaForCausalLM`` and HF decoders laid out like it, sensorium's own :class:`~sensorium.backbone.Llama`
included; ``layers`` / ``embed_tokens`` for a bare ``LlamaModel``). A model that matches none is refused,
unless ``layout=`` names its paths. No class is patched: the layers an adapter names are replaced, in
their ``ModuleList``, by an :class:`AttachedLayer` that runs the adapter's gated blocks on
``hidden_states`` and then calls the original layer with every argument unchanged (so a layer may take
any keyword arguments and return a tensor or a tuple). The wrapper hides itself from ``state_dict()``
(keys and values stay those of the bare model) and :meth:`AttachedModel.detach` puts the original layer
objects back. Adapter weights stay in the handle, never in the model.

**Shapes.** The model's layer count, hidden width (embedding columns) and vocabulary (embedding rows)
must fit the adapter: against the backbone fingerprint of its manifest (adapters loaded with
:func:`~sensorium.adapters.artifact.load_adapter` carry ``manifest_data``) and against its ``.config``
(width; layer indices of its blocks). A mismatch raises :class:`AdapterMismatchError` naming what differs;
other embedding weights of the same shape warn (an error with ``strict=True``), as ``load_adapter`` does.

**Media: the handle's own forward.** ``handle(input_ids, media=...)`` (a) encodes and projects the media,
(b) builds ``inputs_embeds`` from the model's embedding table, with each placeholder position filled by
the cross-attention adapter's ``placeholder_embedding`` or by the projection adapter's output, (c) stores
the prepared cross-attention inputs on the handle — in a ``threading.local``, so only the calling thread
sees them — for the duration of one call ``model(inputs_embeds=..., attention_mask=..., **kwargs)``, and
clears them afterwards (also on error). Nothing is global: several attached models in one process, and
several threads calling one handle, do not see each other's media. Calling the model directly (not
through the handle) runs it with no media, exactly as the bare model on the same embeddings. The model
call must happen in the thread that called the handle (true for a plain forward; not for
``nn.DataParallel``, which runs replicas in worker threads).

Placeholder ids are those of sensorium: ``vocab + 0/1/2`` for image/video/speech, ``vocab`` being the
rows of the model's embedding (:attr:`AttachedModel.placeholder_ids`). Media come as in
:mod:`sensorium.compose`: per modality ``{"features": (I, N, D), "counts": (B,)}`` (encoder outputs; a list
of ``(N_i, D)`` for variable-length items), or ``{"inputs": ..., "counts": ...}`` with an encoder given to
:func:`attach` (adapter folders bring theirs).

**Incremental decoding.** ``state = handle.prepare(prompt, media)``, then ``handle(prompt,
media_state=state, use_cache=True)`` and ``handle(next_ids, media_state=state, cache=out.cache)``: the
cache slot of the first new position is read from the ``cache`` / ``past_key_values`` argument (or given
as ``start=``), so text after an image keeps seeing it. ``model.generate`` itself is not wired.
"""

import hashlib
import threading
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sensorium.adapters.artifact import AdapterHashWarning, AdapterMismatchError
from sensorium.adapters.cross_attention import MediaInputs
from sensorium.adapters.fusion import _add_layer_prefix, _strip_layer_prefix
from sensorium.backbone.model import DecoderContext, Llama
from sensorium.compose import MODALITIES, embed_with_media, encode_entry, prepare_media
from sensorium.encoders.base import Features
from sensorium.errors import SensoriumError

NO_ENCODER = "no {modality} encoder was given to attach"


class AttachError(SensoriumError, ValueError):
    """The model's layout is unknown, it already has adapters attached, or the handle is detached."""


@dataclass(frozen=True)
class Layout:
    """Where a decoder keeps its layers and its token embedding (dotted attribute paths from the model).

    Args:
        layers: path of the ``nn.ModuleList`` of decoder layers.
        embed: path of the token ``nn.Embedding``.
    """

    layers: str
    embed: str


LAYOUTS: tuple[Layout, ...] = (
    Layout("model.layers", "model.embed_tokens"),  # HF *ForCausalLM (Llama, Mistral, Qwen2, ...); sensorium Llama
    Layout("layers", "embed_tokens"),  # a bare HF LlamaModel
    Layout("model.language_model.layers", "model.language_model.embed_tokens"),  # HF composite models' text part
)


def _resolve(root: nn.Module, path: str) -> Any:
    obj: Any = root
    for name in path.split("."):
        obj = getattr(obj, name, None)
        if obj is None:
            return None
    return obj


def find_layout(model: nn.Module, layout: Layout | None = None) -> tuple[Layout, nn.ModuleList, nn.Embedding]:
    """The first layout (``layout`` alone when given, else :data:`LAYOUTS`) whose paths hold a
    ``nn.ModuleList`` and an ``nn.Embedding`` in ``model``.

    Raises:
        AttachError: no layout matches; the message names each path tried and what was found there.
    """
    tried = []
    for candidate in (layout,) if layout is not None else LAYOUTS:
        layers, embed = _resolve(model, candidate.layers), _resolve(model, candidate.embed)
        if isinstance(layers, nn.ModuleList) and len(layers) > 0 and isinstance(embed, nn.Embedding):
            return candidate, layers, embed
        tried.append(f"{candidate.layers} ({type(layers).__name__ if layers is not None else 'missing'}) / "
                     f"{candidate.embed} ({type(embed).__name__ if embed is not None else 'missing'})")
    raise AttachError(
        f"cannot find the decoder layers of {type(model).__name__}: tried {'; '.join(tried)} — expected a "
        "non-empty nn.ModuleList and an nn.Embedding (pass layout=Layout(layers=..., embed=...) for another layout)"
    )


class _MediaSlot(threading.local):
    """The decoder context of the call in progress, per thread (None: no call through the handle)."""

    ctx: DecoderContext | None = None

    def __reduce__(self) -> tuple[type, tuple[()]]:
        # A copy (deepcopy, pickle) of an attached model gets a slot of its own that no handle feeds:
        # its wrappers then run the original layers only.
        return (_MediaSlot, ())


class AttachedLayer(nn.Module):
    """A decoder layer of a foreign model with adapter blocks run on its ``hidden_states`` first.

    All arguments reach the original layer unchanged (``hidden_states`` transformed), and its output is
    returned as it is. The state dict hides the wrapper (keys as the bare layer's); attribute reads that
    the wrapper does not have fall through to the original layer (HF models read e.g. ``attention_type``).

    Args:
        layer: the original decoder layer.
        slot: where the owning handle keeps the media of the call in progress.
    """

    def __init__(self, layer: nn.Module, slot: _MediaSlot) -> None:
        super().__init__()
        self.layer = layer
        self.slot = slot
        self.blocks: list[tuple[str, nn.Module]] = []  # plain list: the blocks belong to their adapter
        self._register_state_dict_hook(_strip_layer_prefix)
        self._register_load_state_dict_pre_hook(_add_layer_prefix)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "layer":
                raise
            return getattr(super().__getattr__("layer"), name)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        ctx = self.slot.ctx
        if ctx is None or not self.blocks:
            return self.layer(*args, **kwargs)
        by_keyword = not args
        if by_keyword:
            if "hidden_states" not in kwargs:
                raise TypeError(f"{type(self.layer).__name__} called without hidden states (first argument or "
                                "hidden_states=)")
            hidden = kwargs.pop("hidden_states")
        else:
            hidden, args = args[0], args[1:]
        dtype = hidden.dtype
        for modality, block in self.blocks:
            media = ctx.extras.get(modality)
            if media is not None:
                hidden = block(hidden, media, ctx).to(dtype)  # keep the model's dtype whatever the adapter's
        return self.layer(hidden_states=hidden, **kwargs) if by_keyword else self.layer(hidden, *args, **kwargs)


def _embedding_digest(weight: torch.Tensor) -> str:
    """sha256 of the embedding as bfloat16 bytes (as :func:`~sensorium.adapters.artifact.backbone_fingerprint`)."""
    emb = weight.detach().to("cpu", torch.bfloat16).contiguous()
    return hashlib.sha256(emb.view(torch.int16).numpy().tobytes()).hexdigest()


def _describe(adapter: nn.Module) -> str:
    source = getattr(adapter, "source", None)
    kind = getattr(adapter, "kind", type(adapter).__name__)
    return f"{adapter.modality} adapter ({kind}{f', {source}' if source else ''})"


def check_fit(adapter: nn.Module, model: nn.Module, layers: nn.ModuleList, embed: nn.Embedding, *,
              strict: bool = False) -> None:
    """Refuse an adapter whose manifest or config does not fit the model's layers and embedding.

    Raises:
        AdapterMismatchError: layer count, width or vocabulary differ (or, with ``strict``, the embedding weights).
        AttachError: the adapter has neither a manifest nor a config.
    """
    have = {"n_layers": len(layers), "dim": embed.embedding_dim, "vocab_size": embed.num_embeddings}
    where = type(model).__name__
    manifest = getattr(adapter, "manifest_data", None)
    config = getattr(adapter, "config", None)
    if manifest is None and config is None:
        raise AttachError(f"{_describe(adapter)} has neither manifest_data (load_adapter) nor a .config to check")
    if manifest is not None:
        want = {k: manifest.get("backbone", {}).get(k) for k in have}
        bad = [k for k in have if want[k] != have[k]]
        if bad:
            raise AdapterMismatchError(
                f"{_describe(adapter)} was trained for a backbone with "
                f"{', '.join(f'{k}={want[k]}' for k in have)}; {where} has "
                f"{', '.join(f'{k}={have[k]}' for k in have)} ({', '.join(bad)} {'differs' if len(bad) == 1 else 'differ'})"
            )
        digest = manifest.get("backbone", {}).get("embedding_sha256")
        if digest is not None and digest != _embedding_digest(embed.weight):
            msg = f"{_describe(adapter)}: {where}'s embedding weights differ from those the adapter was trained with"
            if strict:
                raise AdapterMismatchError(msg)
            warnings.warn(msg + " (same shape: attaching anyway)", AdapterHashWarning, stacklevel=3)
    if config is not None and getattr(config, "dim", have["dim"]) != have["dim"]:
        raise AdapterMismatchError(
            f"{_describe(adapter)} has width dim={config.dim}; {where} has hidden width {have['dim']} (dim differs)"
        )
    out = [i for i in getattr(adapter, "layers", []) if not 0 <= i < have["n_layers"]]
    if out:
        raise AdapterMismatchError(
            f"{_describe(adapter)} places blocks at layer(s) {out}; {where} has n_layers={have['n_layers']}"
        )


class AttachedModel(nn.Module):
    """A foreign decoder with sensorium adapters attached; made by :func:`attach`.

    ``handle(input_ids, media=...)`` runs the model with the media (see the module docstring);
    :meth:`detach` restores the model. The model and the adapters are submodules, so ``handle.to(...)``
    moves both; the adapters' parameters are ``handle.adapters.parameters()``.

    Attributes:
        model: the attached model.
        adapters: the adapters by modality.
        encoders: encoders by modality (for raw media).
        layout: where the layers and the embedding were found.
        placeholder_ids: modality → placeholder token id (``vocab + 0/1/2``).
    """

    def __init__(self, model: nn.Module, adapters: Sequence[nn.Module], *, layout: Layout, layers: nn.ModuleList,
                 embed: nn.Embedding, encoders: Mapping[str, nn.Module] | None = None) -> None:
        super().__init__()
        self.model = model
        self.adapters = nn.ModuleDict({a.modality: a for a in adapters})
        self.encoders = nn.ModuleDict(dict(encoders or {}))
        self.layout = layout
        self.placeholder_ids = {m: embed.num_embeddings + i for i, m in enumerate(MODALITIES)}
        self._layers = [layers]  # lists: not submodules a second time (they live inside ``model``)
        self._embed = [embed]
        self._slot = _MediaSlot()
        self._wrapped: dict[int, AttachedLayer] = {}
        self.attached = True
        for adapter in adapters:
            for index, block in zip(adapter.layers, adapter.blocks, strict=True):
                if index not in self._wrapped:
                    self._wrapped[index] = AttachedLayer(layers[index], self._slot)
                self._wrapped[index].blocks.append((adapter.modality, block))
        for index, wrapper in self._wrapped.items():
            layers[index] = wrapper

    # ------------------------------------------------------------------------------------------ detach
    def detach(self) -> nn.Module:
        """Put the original layers back; the model's keys, values and outputs are those before attach.

        Raises:
            AttachError: a wrapped layer was replaced by someone else meanwhile (nothing is changed then).
        """
        if not self.attached:
            return self.model
        layers = self._layers[0]
        moved = [i for i, w in self._wrapped.items() if layers[i] is not w]
        if moved:
            raise AttachError(f"layer(s) {moved} of {self.layout.layers} were replaced since attach; cannot detach")
        for index, wrapper in self._wrapped.items():
            layers[index] = wrapper.layer
        self._wrapped.clear()
        self.attached = False
        return self.model

    def _check_attached(self) -> None:
        if not self.attached:
            raise AttachError("this handle was detached; attach the adapters again")

    # ------------------------------------------------------------------------------------------- media
    def encode(self, modality: str, entry: Mapping[str, Any]) -> Features:
        """Encoder tokens ``(I, N, D)`` and their mask (``"features"`` as given, or the encoder run on ``"inputs"``)."""
        return encode_entry(self.encoders, modality, entry, missing=NO_ENCODER)

    def prepare(self, input_ids: torch.Tensor, media: Mapping[str, Mapping[str, Any]] | None) -> dict[str, Any]:
        """Encode and project ``media`` for ``input_ids`` ``(B, T)``: cross-attention inputs or splice embeddings.

        Raises:
            MediaMismatchError: a modality has no adapter, or placeholder counts differ from item counts.
        """
        self._check_attached()
        return prepare_media(self.adapters, self.encoders, self.placeholder_ids, input_ids, media,
                             dim=self._embed[0].embedding_dim, owner="attached", no_encoder=NO_ENCODER)

    def embed(self, input_ids: torch.Tensor, state: Mapping[str, Any]) -> torch.Tensor:
        """``inputs_embeds`` ``(B, T, dim)`` from the model's embedding table, placeholder positions filled in."""
        embed = self._embed[0]
        return embed_with_media(embed, embed.num_embeddings, self.adapters, self.placeholder_ids, input_ids, state,
                                owner="attached")

    # ----------------------------------------------------------------------------------------- forward
    def forward(
        self,
        input_ids: torch.Tensor,
        *,
        media: Mapping[str, Mapping[str, Any]] | None = None,
        media_state: Mapping[str, Any] | None = None,
        attention_mask: torch.Tensor | None = None,
        start: int | None = None,
        **model_kwargs: Any,
    ) -> Any:
        """Run the model on ``input_ids`` with their media; returns what the model returns.

        Args:
            input_ids: ``(B, T)`` ids with placeholders.
            media: per modality, the items for the placeholders (see the module docstring).
            media_state: the result of :meth:`prepare`, to reuse encoded media across decoding steps.
            attention_mask: passed to the model (sensorium's Llama: as ``pad_mask``).
            start: cache slot of the first position; read from a ``cache`` / ``past_key_values`` argument
                when not given, else 0.
            **model_kwargs: passed to the model unchanged (``use_cache``, ``cache``, ``labels``, ...).
        """
        self._check_attached()
        if start is None:
            start = _cache_length(model_kwargs)
        state = media_state if media_state is not None else self.prepare(input_ids, media)
        embeds = self.embed(input_ids, state if start == 0 else {})
        extras = {m: s for m, s in state.items() if isinstance(s, MediaInputs)}
        none = embeds.new_empty(0)
        ctx = DecoderContext(cos=none, sin=none, mask=None, is_causal=True, start=start, extras=extras)
        previous, self._slot.ctx = self._slot.ctx, ctx
        try:
            if isinstance(self.model, Llama):
                return self.model(embeds=embeds, pad_mask=attention_mask, start=start, **model_kwargs)
            return self.model(inputs_embeds=embeds, attention_mask=attention_mask, **model_kwargs)
        finally:
            self._slot.ctx = previous


def _cache_length(kwargs: Mapping[str, Any]) -> int:
    """Positions already in an HF cache argument (``cache`` or ``past_key_values``), else 0."""
    for name in ("cache", "past_key_values"):
        cache = kwargs.get(name)
        if cache is not None and hasattr(cache, "get_seq_length"):
            return int(cache.get_seq_length())
    return 0


def attach(
    model: nn.Module,
    adapters: nn.Module | str | Path | Sequence[nn.Module | str | Path],
    *,
    encoders: Mapping[str, nn.Module] | None = None,
    layout: Layout | tuple[str, str] | None = None,
    strict: bool = False,
) -> AttachedModel:
    """Put trained sensorium adapters (cross-attention or splice) into a decoder that is not sensorium's.

    Args:
        model: an HF ``LlamaForCausalLM`` (or a decoder laid out like it; see :data:`LAYOUTS`).
        adapters: adapter modules or adapter folders (folders bring their encoders), at most one per modality.
        encoders: encoders by modality, for raw media inputs.
        layout: the model's layer and embedding paths, when it is not in :data:`LAYOUTS`.
        strict: refuse (rather than warn about) embedding weights that differ from the adapter's backbone.

    Returns:
        The handle: call it with ``input_ids`` and ``media``; :meth:`AttachedModel.detach` undoes the attach.

    Raises:
        AttachError: unknown layout, adapters already attached to the model, two adapters of one modality.
        AdapterMismatchError: the model's layer count, width or vocabulary do not fit an adapter.
    """
    from sensorium.adapters.artifact import load_adapter, load_encoder, read_manifest

    if isinstance(layout, tuple):
        layout = Layout(*layout)
    found, layers, embed = find_layout(model, layout)
    if any(isinstance(layer, AttachedLayer) for layer in layers):
        raise AttachError(f"{type(model).__name__} already has sensorium adapters attached; detach that handle first "
                          "(or attach all adapters in one call)")
    if isinstance(adapters, (nn.Module, str, Path)):
        adapters = [adapters]
    modules, found_encoders = [], dict(encoders or {})
    for a in adapters:
        if isinstance(a, (str, Path)):
            module = load_adapter(a)
            if read_manifest(a).get("encoder") and module.modality not in found_encoders:
                found_encoders[module.modality] = load_encoder(a)
            a = module
        if getattr(a, "modality", None) not in MODALITIES:
            raise AttachError(f"{type(a).__name__} is not a sensorium adapter (modality must be one of {MODALITIES})")
        if any(m.modality == a.modality for m in modules):
            raise AttachError(f"two {a.modality} adapters given; one per modality")
        if a.blocks and not hasattr(a, "placeholder_embedding"):
            raise AttachError(f"{_describe(a)} has blocks but no placeholder_embedding")
        check_fit(a, model, layers, embed, strict=strict)
        modules.append(a)
    return AttachedModel(model, modules, layout=found, layers=layers, embed=embed, encoders=found_encoders)


def detach(handle: AttachedModel) -> nn.Module:
    """Restore the model of ``handle`` (see :meth:`AttachedModel.detach`) and return it."""
    return handle.detach()


__all__ = ["LAYOUTS", "AttachError", "AttachedLayer", "AttachedModel", "Layout", "attach", "check_fit", "detach",
           "find_layout"]
