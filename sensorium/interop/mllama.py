"""Mllama (Llama 3.2 Vision) checkpoints ↔ a sensorium backbone folder plus an image cross-attention adapter.

::

    backbone_dir, adapter_dir = import_mllama("Llama-3.2-11B-Vision", "converted")
    export_mllama(backbone_dir, adapter_dir, "back-to-mllama", vision="Llama-3.2-11B-Vision")

**Layers.** transformers' ``MllamaForConditionalGeneration`` keeps one text decoder whose
``num_hidden_layers`` layers *include* the cross-attention layers: each index of
``text_config.cross_attention_layers`` holds a ``MllamaCrossAttentionDecoderLayer`` instead of a
self-attention layer. sensorium keeps the plain Llama and runs gated blocks in front of its layers, so the
backbone has ``num_hidden_layers - len(cross_attention_layers)`` layers and (:func:`mllama_layer_mapping`)

- Mllama self-attention layer ``j`` becomes Llama layer ``j - #{c in cross_attention_layers : c < j}``;
- the ``k``-th cross-attention layer ``c_k`` (counting from 0 in increasing order) becomes adapter block ``k``,
  placed in front of Llama layer ``c_k - k``: the self-attention layer that follows it in Mllama. Llama 3.2
  11B's ``[3, 8, 13, ..., 38]`` of 40 layers become blocks in front of layers ``[3, 7, 11, ..., 31]`` of 32.
  Consecutive cross-attention layers put several blocks in front of one layer (run in order); a
  cross-attention layer in last position has no layer after it and is refused.

**Weights.** Block parameters carry Mllama's names, so a cross-attention layer's keys map one to one onto a
block's (``layers.{c_k}.cross_attn.q_proj.weight`` → ``blocks.{k}.cross_attn.q_proj.weight``). Mllama's
embedding has ``vocab_size + 8`` rows: the backbone keeps the first ``vocab_size`` (the rows ``lm_head``
predicts) and the ``<|image|>`` row (``image_token_index``, the first extra row) becomes the adapter's
``placeholder_embedding``, the vector sensorium puts at each image placeholder — exactly what Mllama's
embedding lookup gives there. The 7 other extra rows are reserved, never produced by the Llama 3.2
tokenizer; they are dropped (export writes zeros). ``multi_modal_projector`` (one Linear with bias, no norm,
no activation) is the adapter's ``media_proj`` with ``media_norm=False``. Tokenizer files are copied into the
backbone folder; sensorium's own ``<|image|>`` placeholder id (past the tokenizer's vocabulary) replaces the
tokenizer's ``<|image|>`` id, and the adapter's placeholder embedding stands in for its row.

**Media.** The adapter's ``features`` for one image are the vision tower's output *before* the projector,
``vision_model(...).last_hidden_state[b, i]`` flattened to ``(tiles * patches, vision_output_dim)``
(:func:`mllama_media`); Mllama's ``cross_attention_states`` are the projector applied to that tensor,
flattened per text row over (image, tile, patch). The vision tower itself stays in transformers: the
adapter's manifest names no encoder.

**Differences** between Mllama's cross-attention layers and sensorium's blocks:

- identical: RMSNorm (input, post-attention, q/k norms over ``head_dim``) with ``rms_norm_eps``; grouped-query
  attention with ``head_dim = hidden_size // num_attention_heads`` and scale ``head_dim ** -0.5``; no
  positional encoding on media; SwiGLU MLP of ``intermediate_size``; ``tanh`` gates of shape ``(1,)`` on both
  residual branches. Another ``hidden_act`` than ``silu`` is refused.
- which images a text position sees: Mllama's processor lets text see the *latest* image (from an
  ``<|image|>`` up to the next one), so imported adapters use ``attend="last"``; after several *consecutive*
  ``<|image|>`` tokens Mllama's processor lets text see all of them, sensorium the latest only.
- rows that see no image (text before the first ``<|image|>``): sensorium zeroes both residual branches, as
  Meta's reference implementation does (it multiplies the attention output by
  ``full_text_row_masked_out_mask``); transformers masks the MLP branch only, so those rows receive
  ``tanh(g_attn) * o_proj(mean of the vision values)`` (transformers issue #39379). Logits equal
  transformers' when every text position follows an image (prompts that start with the image) and Meta's
  reference semantics otherwise.
- tiles: Mllama masks the padding tiles of an image with fewer than ``max_num_tiles`` tiles; sensorium has no
  per-token media mask, so give only the real tiles' tokens (items of one call then need equal tile counts).
"""

import dataclasses
import json
import os
import re
import shutil
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from sensorium.adapters.artifact import atomic_save_safetensors, replace_folder, save_adapter, sibling_folder
from sensorium.adapters.cross_attention import CrossAttentionAdapter, CrossAttentionConfig
from sensorium.backbone.config import LlamaConfig
from sensorium.backbone.model import Llama
from sensorium.errors import CheckpointError, UnsupportedCheckpointError

PathLike = str | Path

EXTRA_ROWS = 8  # Mllama's text embedding has vocab_size + 8 rows; the first extra one is <|image|>
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "chat_template.json", "chat_template.jinja")
DEFAULT_MAX_SHARD_BYTES = 5 * 2**30

# MllamaTextConfig / MllamaConfig defaults (transformers 5), for config.json files that omit a field.
_TEXT_DEFAULTS: dict[str, Any] = {
    "vocab_size": 128256, "hidden_size": 4096, "hidden_act": "silu", "num_hidden_layers": 40,
    "num_attention_heads": 32, "num_key_value_heads": 8, "intermediate_size": 14336, "rms_norm_eps": 1e-5,
    "max_position_embeddings": 131072, "tie_word_embeddings": False,
    "cross_attention_layers": [3, 8, 13, 18, 23, 28, 33, 38], "bos_token_id": 128000, "eos_token_id": 128001,
    "pad_token_id": 128004,
}
_DEFAULT_ROPE_THETA = 500000.0
_DEFAULT_IMAGE_TOKEN_INDEX = 128256
_DEFAULT_VISION_OUTPUT_DIM = 7680


class MllamaConversionError(UnsupportedCheckpointError):
    """A folder is not a Mllama checkpoint this converter reads, or a backbone/adapter does not fit Mllama's layout."""


@dataclass(frozen=True)
class _Layout:
    """Key prefixes of one way of writing a Mllama checkpoint."""

    name: str
    text: str  # the text decoder: embed_tokens, layers, norm
    head: str  # the output head's weight
    projector: str  # multi_modal_projector
    vision: str  # the vision tower


_LAYOUTS = (
    # what MllamaForConditionalGeneration.save_pretrained writes (and the published checkpoints hold)
    _Layout("save_pretrained", "language_model.model.", "language_model.lm_head.weight", "multi_modal_projector.",
            "vision_model."),
    # the module's own state_dict names (transformers >= 4.52)
    _Layout("module", "model.language_model.", "lm_head.weight", "model.multi_modal_projector.", "model.vision_model."),
)
_WRITE = _LAYOUTS[0]


# --------------------------------------------------------------------------------------- layer indices
def mllama_layer_mapping(num_hidden_layers: int, cross_attention_layers: Iterable[int]) -> tuple[list[int], list[int]]:
    """Where Mllama's text layers go in sensorium.

    Args:
        num_hidden_layers: Mllama's ``text_config.num_hidden_layers`` (self- and cross-attention layers together).
        cross_attention_layers: the indices holding cross-attention layers.

    Returns:
        ``(self_layers, block_layers)``: ``self_layers[i]`` is the Mllama index of Llama layer ``i``;
        ``block_layers[k]`` is the Llama layer in front of which the ``k``-th cross-attention layer (in increasing
        Mllama index) is placed.

    Raises:
        MllamaConversionError: an index out of range, or a cross-attention layer in last position.
    """
    cross = sorted(set(int(c) for c in cross_attention_layers))
    out = [c for c in cross if not 0 <= c < num_hidden_layers]
    if out:
        raise MllamaConversionError(f"cross_attention_layers {out} are outside the {num_hidden_layers} text layers")
    if cross and cross[-1] == num_hidden_layers - 1:
        raise MllamaConversionError(
            f"cross-attention layer {cross[-1]} is the last of {num_hidden_layers} text layers: a sensorium block runs "
            "in front of a decoder layer and none follows it")
    taken = set(cross)
    self_layers = [j for j in range(num_hidden_layers) if j not in taken]
    return self_layers, [c - k for k, c in enumerate(cross)]


def _mllama_indices(n_layers: int, block_layers: Sequence[int]) -> tuple[list[int], list[int]]:
    """Inverse of :func:`mllama_layer_mapping`: the Mllama index of each Llama layer and of each block (adapter order)."""
    order = sorted(range(len(block_layers)), key=lambda k: block_layers[k])  # stable: blocks of one layer keep order
    block_at = [0] * len(block_layers)
    for rank, k in enumerate(order):
        block_at[k] = block_layers[k] + rank
    self_at = [i + sum(1 for layer in block_layers if layer <= i) for i in range(n_layers)]
    return self_at, block_at


# ------------------------------------------------------------------------------------------- reading
class _Weights:
    """Lazy access to the tensors of a safetensors checkpoint folder (one file, several, or an index of shards)."""

    def __init__(self, folder: Path) -> None:
        from safetensors import safe_open

        index = folder / "model.safetensors.index.json"
        if index.is_file():
            weight_map = _read_json(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{index}: no 'weight_map' object")
            files = sorted({folder / str(name) for name in weight_map.values()})
        else:
            files = sorted(folder.glob("*.safetensors"))
        if not files:
            raise MllamaConversionError(f"{folder}: config.json but no *.safetensors weights")
        self._where: dict[str, Any] = {}
        for f in files:
            if not f.is_file():
                raise CheckpointError(f"{f}: listed in the index but missing")
            try:
                handle = safe_open(str(f), framework="pt")
            except Exception as e:  # safetensors raises its own error types on truncated or malformed files
                raise CheckpointError(f"{f}: cannot read safetensors ({e})") from e
            for key in handle.keys():
                self._where[key] = handle

    def keys(self) -> list[str]:
        return list(self._where)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._where[key].get_slice(key).get_shape())

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def __getitem__(self, key: str) -> torch.Tensor:
        return self._where[key].get_tensor(key)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:  # ValueError: malformed, or huge integers
        raise CheckpointError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


def _read_mllama_config(folder: Path) -> dict[str, Any]:
    """The folder's config.json, checked to describe a Mllama model that sensorium's blocks can hold."""
    if not folder.is_dir():
        raise MllamaConversionError(f"{folder}: no such folder (expected a MllamaForConditionalGeneration checkpoint)")
    path = folder / "config.json"
    if not path.is_file():
        raise MllamaConversionError(f"{folder}: no config.json (expected a folder written by "
                                    "MllamaForConditionalGeneration.save_pretrained)")
    config = _read_json(path)
    model_type, archs = config.get("model_type"), config.get("architectures")
    if model_type != "mllama" or not isinstance(config.get("text_config"), dict):
        raise MllamaConversionError(
            f"{path}: model_type {model_type!r} (architectures {archs}) is not a Mllama checkpoint: expected "
            "model_type 'mllama' with a text_config, as MllamaForConditionalGeneration.save_pretrained writes")
    text = {**_TEXT_DEFAULTS, **config["text_config"]}
    if text["hidden_act"] != "silu":
        raise MllamaConversionError(f"{path}: text_config.hidden_act {text['hidden_act']!r} is not supported "
                                    "(sensorium's MLPs are SwiGLU with silu)")
    if text["hidden_size"] % text["num_attention_heads"]:
        raise MllamaConversionError(f"{path}: hidden_size {text['hidden_size']} is not a multiple of "
                                    f"num_attention_heads {text['num_attention_heads']}")
    config["text_config"] = text
    return config


def _detect_layout(weights: _Weights, folder: Path) -> _Layout:
    for layout in _LAYOUTS:
        if layout.text + "embed_tokens.weight" in weights:
            return layout
    sample = ", ".join(sorted(weights.keys())[:4])
    wanted = " or ".join(repr(layout.text + "embed_tokens.weight") for layout in _LAYOUTS)
    raise MllamaConversionError(f"{folder}: unknown weight layout: no {wanted} (found e.g. {sample})")


def _llama_config(text: Mapping[str, Any], n_layers: int, source: str) -> LlamaConfig:
    """The backbone's shape: Mllama's text config with the self-attention layers only."""
    params = text.get("rope_parameters") or {}
    theta = text.get("rope_theta") or params.get("rope_theta") or _DEFAULT_ROPE_THETA
    hf = {
        "model_type": "llama", "vocab_size": text["vocab_size"], "hidden_size": text["hidden_size"],
        "num_hidden_layers": n_layers, "num_attention_heads": text["num_attention_heads"],
        "num_key_value_heads": text["num_key_value_heads"], "intermediate_size": text["intermediate_size"],
        "rms_norm_eps": text["rms_norm_eps"], "rope_theta": theta,
        "rope_scaling": text.get("rope_scaling") or text.get("rope_parameters"),
        "max_position_embeddings": text["max_position_embeddings"], "bos_token_id": text.get("bos_token_id"),
        "eos_token_id": text.get("eos_token_id"),
    }
    return LlamaConfig.from_hf(hf, source=source)


# --------------------------------------------------------------------------------------------- import
def import_mllama(src_folder: PathLike, out_folder: PathLike, *,
                  max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> tuple[Path, Path]:
    """Convert a transformers ``MllamaForConditionalGeneration`` folder into a backbone and an image adapter.

    Args:
        src_folder: a folder written by ``save_pretrained`` (``config.json`` + ``*.safetensors``, sharded or not;
            either key layout: ``language_model.model.*`` or ``model.language_model.*``).
        out_folder: receives ``backbone/`` (a HF Llama folder: ``config.json`` + safetensors + tokenizer files)
            and ``adapter/`` (a sensorium adapter folder); existing ones are replaced.
        max_shard_bytes: largest backbone safetensors file; bigger backbones are sharded with an index.

    Returns:
        ``(backbone_dir, adapter_dir)``.

    Raises:
        MllamaConversionError: not a Mllama checkpoint, unknown keys, missing weights or shapes that do not fit
            the config (the message names the weight and both shapes).
    """
    src, out = Path(src_folder).expanduser(), Path(out_folder).expanduser()
    config = _read_mllama_config(src)
    text, vision_config = config["text_config"], dict(config.get("vision_config") or {})
    weights = _Weights(src)
    layout = _detect_layout(weights, src)
    n_total = int(text["num_hidden_layers"])
    listed = text["cross_attention_layers"]
    cross = sorted(set(int(c) for c in (_TEXT_DEFAULTS["cross_attention_layers"] if listed is None else listed)))
    if not cross:
        raise MllamaConversionError(f"{src}/config.json: no cross_attention_layers: nothing to convert into an adapter")
    self_layers, block_layers = mllama_layer_mapping(n_total, cross)
    bb_config = _llama_config(text, len(self_layers), str(src / "config.json"))
    V, dim = bb_config.vocab_size, bb_config.dim

    proj_key = layout.projector + "weight"
    if proj_key not in weights:
        raise MllamaConversionError(f"{src}: no {proj_key} (the multi-modal projector)")
    media_dim = weights.shape(proj_key)[1]
    declared = vision_config.get("vision_output_dim", _DEFAULT_VISION_OUTPUT_DIM)
    if declared != media_dim:
        raise MllamaConversionError(f"{src}: {proj_key} has shape {weights.shape(proj_key)}, but "
                                    f"vision_config.vision_output_dim is {declared}")
    x_config = CrossAttentionConfig(
        dim=dim, media_dim=media_dim, n_heads=bb_config.n_heads, n_kv_heads=bb_config.n_kv_heads,
        head_dim=bb_config.head_dim, mlp_hidden=bb_config.intermediate_size, layers=block_layers,
        norm_eps=bb_config.norm_eps, media_norm=False, attend="last")

    # Plan: every Mllama text/projector weight → a backbone key or an adapter key.
    block_of = {c: k for k, c in enumerate(cross)}
    llama_of = {j: i for i, j in enumerate(self_layers)}
    bb_src: dict[str, str] = {}
    ad_src: dict[str, str] = {}
    emb_key = layout.text + "embed_tokens.weight"
    unknown = []
    for key in weights.keys():
        if key.startswith(layout.vision) or key == emb_key:
            continue
        if key == layout.head:
            bb_src["lm_head.weight"] = key
        elif key == layout.text + "norm.weight":
            bb_src["model.norm.weight"] = key
        elif key.startswith(layout.projector):
            ad_src["media_proj." + key[len(layout.projector):]] = key
        elif m := re.fullmatch(re.escape(layout.text) + r"layers\.(\d+)\.(.+)", key):
            j, rest = int(m.group(1)), m.group(2)
            if j in block_of:
                ad_src[f"blocks.{block_of[j]}.{rest}"] = key
            elif j in llama_of:
                bb_src[f"model.layers.{llama_of[j]}.{rest}"] = key
            else:
                unknown.append(key)
        else:
            unknown.append(key)

    with torch.device("meta"):
        bb_expected = {k: tuple(v.shape) for k, v in Llama(bb_config).state_dict().items() if k != "model.embed_tokens.weight"}
        ad_expected = {k: tuple(v.shape) for k, v in CrossAttentionAdapter(x_config).state_dict().items()
                       if k != "placeholder_embedding"}
    tied = "lm_head.weight" not in bb_src and bool(text.get("tie_word_embeddings"))
    if tied:
        bb_expected.pop("lm_head.weight")
        bb_config = dataclasses.replace(bb_config, tie_word_embeddings=True)

    def mllama_name(target: str) -> str:  # the Mllama key a missing target weight would have had
        if m := re.fullmatch(r"model\.layers\.(\d+)\.(.+)", target):
            return f"{layout.text}layers.{self_layers[int(m.group(1))]}.{m.group(2)}"
        if m := re.fullmatch(r"blocks\.(\d+)\.(.+)", target):
            return f"{layout.text}layers.{cross[int(m.group(1))]}.{m.group(2)}"
        return {"lm_head.weight": layout.head, "model.norm.weight": layout.text + "norm.weight"}.get(
            target, layout.projector + target.removeprefix("media_proj."))

    missing = [mllama_name(t) for t in [*bb_expected, *ad_expected] if t not in bb_src and t not in ad_src]
    unknown += [bb_src[t] for t in bb_src if t not in bb_expected] + [ad_src[t] for t in ad_src if t not in ad_expected]
    if missing or unknown:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} weight(s) the config implies (e.g. {', '.join(missing[:3])})")
        if unknown:
            parts.append(f"{len(unknown)} weight(s) with no place in a Llama + gated cross-attention model "
                         f"(e.g. {', '.join(sorted(unknown)[:3])})")
        raise MllamaConversionError(f"{src}: {'; '.join(parts)}")
    for targets, expected in ((bb_src, bb_expected), (ad_src, ad_expected)):
        for target, key in targets.items():
            if weights.shape(key) != expected[target]:
                raise MllamaConversionError(f"{src}: {key} has shape {weights.shape(key)}, the config implies "
                                            f"{expected[target]}")

    image_index = int(config.get("image_token_index", _DEFAULT_IMAGE_TOKEN_INDEX))
    rows, width = weights.shape(emb_key)
    if width != dim or rows < V or not 0 <= image_index < rows:
        raise MllamaConversionError(
            f"{src}: {emb_key} has shape {(rows, width)}; expected ({V} + {EXTRA_ROWS}, {dim}) holding the text "
            f"vocabulary ({V} rows) and the <|image|> row image_token_index={image_index}")
    embedding = weights[emb_key]
    text_embedding = embedding[:V].clone()

    # (a) the backbone: the self-attention layers, the text rows of the embedding, the head.
    def backbone_tensors() -> Iterator[tuple[str, torch.Tensor]]:
        yield "model.embed_tokens.weight", text_embedding
        for target in bb_expected:
            yield target, weights[bb_src[target]]

    backbone_dir, adapter_dir = out / "backbone", out / "adapter"
    copies = [src / name for name in TOKENIZER_FILES if (src / name).is_file()]
    _write_folder(backbone_dir, bb_config.to_hf(), backbone_tensors(), max_shard_bytes=max_shard_bytes, copies=copies)

    # (b) the adapter: cross-attention layers as blocks, the projector, the <|image|> row as placeholder.
    state = {target: weights[key] for target, key in ad_src.items()}
    state["placeholder_embedding"] = embedding[image_index].clone()
    with torch.device("meta"):
        adapter = CrossAttentionAdapter(x_config, modality="image")
    adapter.load_state_dict(state, assign=True)
    provenance = {
        "format": "mllama", "source": str(src), "layout": layout.name, "num_hidden_layers": n_total,
        "cross_attention_layers": cross, "image_token_index": image_index,
        "text_config": config["text_config"], "vision_config": vision_config,
        "features": "MllamaVisionModel last_hidden_state per image, flattened to (tiles * patches, "
                    "vision_output_dim), before multi_modal_projector",
    }
    # backbone_fingerprint reads only the config and the embedding: no need to materialise the whole decoder.
    fingerprint_source = SimpleNamespace(config=bb_config, embed_tokens=SimpleNamespace(weight=text_embedding))
    save_adapter(adapter, adapter_dir, backbone=fingerprint_source, recipe={"imported_from": provenance})
    return backbone_dir, adapter_dir


# --------------------------------------------------------------------------------------------- export
def _export_problems(config: LlamaConfig, adapter: nn.Module) -> list[str]:
    """What keeps ``adapter`` on a backbone of ``config`` from being written as Mllama cross-attention layers."""
    kind = getattr(adapter, "kind", None)
    if kind != "cross_attention" or not isinstance(adapter, CrossAttentionAdapter):
        return [f"adapter kind {kind!r} is not 'cross_attention' (Mllama has image cross-attention layers only)"]
    c, problems = adapter.config, []
    if adapter.modality != "image":
        problems.append(f"modality {adapter.modality!r} is not 'image'")
    if config.head_dim * config.n_heads != config.dim:
        problems.append(f"the backbone's head_dim {config.head_dim} x n_heads {config.n_heads} != dim {config.dim} "
                        "(Mllama derives head_dim = hidden_size // num_attention_heads)")
    for name, want in (("dim", config.dim), ("n_heads", config.n_heads), ("n_kv_heads", config.n_kv_heads),
                       ("head_dim", config.head_dim), ("mlp_hidden", config.intermediate_size),
                       ("norm_eps", config.norm_eps)):
        have = getattr(c, name)
        if have != want:
            problems.append(f"adapter {name}={have}, Mllama's cross-attention layers need the backbone's {want}")
    if c.media_norm:
        problems.append("adapter media_norm=True: Mllama's projector is a single Linear with no LayerNorm before it")
    out = [i for i in c.layers if not 0 <= i < config.n_layers]
    if out:
        problems.append(f"adapter places blocks at layer(s) {out}, the backbone has {config.n_layers} layers")
    if not c.layers:
        problems.append("the adapter has no blocks")
    return problems


def _rope_parameters(config: LlamaConfig) -> dict[str, Any]:
    if config.rope_scaling is None:
        return {"rope_type": "default", "rope_theta": config.rope_theta}
    return {"rope_type": "llama3", "rope_theta": config.rope_theta, **asdict(config.rope_scaling)}


def export_mllama(
    backbone: Llama | PathLike,
    adapter: nn.Module | PathLike,
    out_folder: PathLike,
    *,
    vision: PathLike | None = None,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> Path:
    """Write a backbone and an image cross-attention adapter as a ``MllamaForConditionalGeneration`` folder.

    The inverse of :func:`import_mllama`: block ``k`` becomes the cross-attention layer inserted in front of its
    Llama layer, the placeholder embedding becomes the ``<|image|>`` row (``image_token_index = vocab_size``; the
    7 other extra rows are zero), ``media_proj`` becomes ``multi_modal_projector``. Keys are written as
    ``save_pretrained`` writes them (``language_model.model.*``).

    Args:
        backbone: the backbone, or its checkpoint path (tokenizer files in its folder are copied).
        adapter: the adapter, or its folder (checked against the backbone).
        out_folder: the Mllama folder to write (replaced if it exists).
        vision: a Mllama folder whose vision tower (``vision_config`` and ``vision_model.*`` weights) to include.
            Without it the folder holds the language model and the projector only (transformers then
            initialises the vision tower randomly), with the vision config recorded at import if any.
        dtype: dtype of the written weights (default: the backbone's).
        max_shard_bytes: largest safetensors file; bigger models are sharded with an index.

    Raises:
        MllamaConversionError: the adapter's shape does not fit Mllama's layout (the message names each field
            that does not match), or ``vision`` is not a Mllama folder of the adapter's feature width.
    """
    from sensorium.adapters.artifact import load_adapter
    from sensorium.backbone.checkpoint import load_backbone

    copies: list[Path] = []
    if isinstance(backbone, (str, Path)):
        path = Path(backbone).expanduser()
        folder = path if path.is_dir() else path.parent
        copies = [folder / name for name in TOKENIZER_FILES if (folder / name).is_file()]
        backbone = load_backbone(path)
    if isinstance(adapter, (str, Path)):
        adapter = load_adapter(adapter, backbone)
    config = backbone.config
    problems = _export_problems(config, adapter)
    if problems:
        raise MllamaConversionError(f"cannot write {type(adapter).__name__} as Mllama layers: {'; '.join(problems)}")
    c = adapter.config
    if c.attend != "last":
        warnings.warn(f"the adapter was trained with attend={c.attend!r}; Mllama's processor lets text see the latest "
                      "image only", UserWarning, stacklevel=2)
    dtype = dtype or backbone.embed_tokens.weight.dtype
    recorded = ((getattr(adapter, "manifest_data", None) or {}).get("recipe") or {}).get("imported_from") or {}

    vision_config: dict[str, Any]
    vision_weights: _Weights | None = None
    vision_prefix = ""
    if vision is not None:
        vsrc = Path(vision).expanduser()
        vision_config = dict(_read_mllama_config(vsrc).get("vision_config") or {})
        vision_weights = _Weights(vsrc)
        vision_prefix = _detect_layout(vision_weights, vsrc).vision
        if not any(k.startswith(vision_prefix) for k in vision_weights.keys()):
            raise MllamaConversionError(f"{vsrc}: no {vision_prefix}* weights (no vision tower to copy)")
    else:
        vision_config = dict(recorded.get("vision_config") or {})
        warnings.warn("no vision= folder: the Mllama folder gets no vision tower weights", UserWarning, stacklevel=2)
    width = vision_config.get("vision_output_dim", _DEFAULT_VISION_OUTPUT_DIM)
    if vision is None and width != c.media_dim:
        vision_config = {"vision_output_dim": c.media_dim}
    elif width != c.media_dim:
        raise MllamaConversionError(f"{vision}: vision_output_dim {width} does not match the adapter's media_dim "
                                    f"{c.media_dim}")

    V, dim = config.vocab_size, config.dim
    self_at, block_at = _mllama_indices(config.n_layers, c.layers)
    prefix = _WRITE.text

    def tensors() -> Iterator[tuple[str, torch.Tensor]]:
        emb = torch.zeros(V + EXTRA_ROWS, dim, dtype=dtype)  # (V + 8, dim)
        emb[:V] = backbone.embed_tokens.weight.detach().to(dtype)
        emb[V] = adapter.placeholder_embedding.detach().to(dtype)
        yield prefix + "embed_tokens.weight", emb
        layers: dict[int, nn.Module] = {j: backbone.layers[i] for i, j in enumerate(self_at)}
        layers.update({j: adapter.blocks[k] for k, j in enumerate(block_at)})
        for j in sorted(layers):
            for name, t in layers[j].state_dict().items():  # a fused layer's state dict hides its wrapper
                yield f"{prefix}layers.{j}.{name}", t.detach().to(dtype)
        yield prefix + "norm.weight", backbone.model.norm.weight.detach().to(dtype)
        yield _WRITE.head, backbone.lm_head.weight.detach().to(dtype).clone()
        yield _WRITE.projector + "weight", adapter.media_proj.weight.detach().to(dtype)
        yield _WRITE.projector + "bias", adapter.media_proj.bias.detach().to(dtype)
        if vision_weights is not None:
            for key in vision_weights.keys():
                if key.startswith(vision_prefix):
                    yield _WRITE.vision + key[len(vision_prefix):], vision_weights[key].to(dtype)

    pad = (recorded.get("text_config") or {}).get("pad_token_id")
    text_config: dict[str, Any] = {
        "model_type": "mllama_text_model", "vocab_size": V, "hidden_size": dim, "hidden_act": "silu",
        "num_hidden_layers": config.n_layers + len(block_at), "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.n_kv_heads, "intermediate_size": config.intermediate_size,
        "rms_norm_eps": config.norm_eps, "max_position_embeddings": config.max_seq_len,
        "rope_parameters": _rope_parameters(config),
        # Always untied: Mllama's embedding has 8 rows more than its head.
        "tie_word_embeddings": False, "cross_attention_layers": sorted(block_at), "dropout": 0.0,
        "pad_token_id": pad if isinstance(pad, int) and 0 <= pad < V + EXTRA_ROWS else None,
    }
    if config.bos_token_id is not None:
        text_config["bos_token_id"] = config.bos_token_id
    if config.eos_token_ids:
        eos = list(config.eos_token_ids)
        text_config["eos_token_id"] = eos if len(eos) > 1 else eos[0]
    hf_config = {
        "architectures": ["MllamaForConditionalGeneration"], "model_type": "mllama", "image_token_index": V,
        "dtype": str(dtype).removeprefix("torch."), "text_config": text_config, "vision_config": vision_config,
    }
    out = Path(out_folder).expanduser()
    _write_folder(out, hf_config, tensors(), max_shard_bytes=max_shard_bytes, copies=copies)
    return out


# --------------------------------------------------------------------------------------------- media
def mllama_media(vision_states: torch.Tensor, num_images: Sequence[int] | torch.Tensor,
                 *, num_tiles: int | None = None) -> dict[str, torch.Tensor]:
    """The ``media["image"]`` entry for an imported adapter, from Mllama's vision tower output.

    Args:
        vision_states: ``MllamaVisionModel(...).last_hidden_state`` ``(B, max_images, max_tiles, patches, D)``,
            before ``multi_modal_projector``.
        num_images: real images per row (each row's first ones; the others are padding).
        num_tiles: keep each image's first ``num_tiles`` tiles (default: all); sensorium has no tile mask, so
            padding tiles must not be passed.

    Returns:
        ``{"features": (I, tiles * patches, D), "counts": (B,)}``, items in reading order.
    """
    B, M, tiles, P, D = vision_states.shape
    counts = torch.as_tensor(num_images, device=vision_states.device).long()  # (B,)
    assert counts.shape == (B,), f"num_images has shape {tuple(counts.shape)}, expected ({B},)"
    assert int(counts.max()) <= M, f"{int(counts.max())} images in a row, the vision output holds {M}"
    tiles = tiles if num_tiles is None else num_tiles
    real = torch.arange(M, device=counts.device)[None] < counts[:, None]  # (B, M)
    feats = vision_states[:, :, :tiles][real]  # (I, tiles, P, D)
    return {"features": feats.reshape(feats.shape[0], tiles * P, D), "counts": counts}  # (I, tiles*P, D)


# --------------------------------------------------------------------------------------------- writing
def _write_folder(folder: Path, config: dict[str, Any], tensors: Iterable[tuple[str, torch.Tensor]], *,
                  max_shard_bytes: int, copies: Sequence[Path] = ()) -> None:
    """Write ``config.json`` + safetensors (sharded past ``max_shard_bytes``) + copied files, replacing ``folder``.

    The folder is built beside its destination and renamed into place, so a killed conversion leaves no
    half-written checkpoint; one shard at a time is held in memory.
    """
    tmp = sibling_folder(folder)
    try:
        shards: list[list[str]] = []
        shard: dict[str, torch.Tensor] = {}
        size = total = 0

        def flush() -> None:
            nonlocal shard, size
            if shard:
                atomic_save_safetensors(shard, tmp / f"shard-{len(shards):05d}", metadata={"format": "pt"})
                shards.append(list(shard))
                shard, size = {}, 0

        for key, t in tensors:
            nbytes = t.numel() * t.element_size()
            if shard and size + nbytes > max_shard_bytes:
                flush()
            shard[key] = t.contiguous()
            size += nbytes
            total += nbytes
        flush()
        if len(shards) == 1:
            os.replace(tmp / "shard-00000", tmp / "model.safetensors")
        else:
            weight_map = {}
            for i, keys in enumerate(shards):
                name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                os.replace(tmp / f"shard-{i:05d}", tmp / name)
                weight_map.update(dict.fromkeys(keys, name))
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2), encoding="utf-8")
        (tmp / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
        for f in copies:
            shutil.copy2(f, tmp / f.name)
        replace_folder(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


__all__ = ["MllamaConversionError", "export_mllama", "import_mllama", "mllama_layer_mapping", "mllama_media"]
