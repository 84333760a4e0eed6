"""Adapter folders: ``adapter.safetensors`` (trainable adapter weights only) + ``manifest.json``.

The manifest makes an adapter self-describing: format version, modality, kind, adapter config,
placement, encoder spec and preprocessing, a fingerprint of the backbone it was trained on, the prompt
format and the training recipe. Frozen encoder weights, when the adapter was trained with an encoder
that is not a published checkpoint, travel beside it as ``encoder.safetensors``.

Loading never unpickles. A backbone of another shape is refused with both shapes named; a backbone of
the same shape whose embedding weights differ (a fine-tuned twin) gives a warning, or an error with
``strict=True``.
"""

import ctypes
import datetime
import errno
import hashlib
import json
import os
import shutil
import sys
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sensorium.backbone.model import Llama
from sensorium.errors import CheckpointError, SensoriumError

FORMAT = "sensorium-adapter"
FORMAT_VERSION = 1
ADAPTER_FILE, MANIFEST_FILE, ENCODER_FILE = "adapter.safetensors", "manifest.json", "encoder.safetensors"
_SHAPE_KEYS = ("architecture", "dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "vocab_size")


class AdapterError(SensoriumError, ValueError):
    """An adapter folder is missing, malformed, of an unknown version, or does not fit the backbone."""


class AdapterMismatchError(AdapterError):
    """The adapter was trained for a backbone of another shape (or other weights, with ``strict``)."""


class AdapterHashWarning(UserWarning):
    """The backbone has the adapter's shape but different embedding weights."""


def backbone_fingerprint(backbone: Llama) -> dict[str, Any]:
    """Shape of ``backbone`` and a hash of its token embedding (bfloat16 bytes: dtype-independent)."""
    c = backbone.config
    emb = backbone.embed_tokens.weight.detach().to("cpu", torch.bfloat16).contiguous()
    digest = hashlib.sha256(emb.view(torch.int16).numpy().tobytes()).hexdigest()
    return {"architecture": "llama", "dim": c.dim, "n_layers": c.n_layers, "n_heads": c.n_heads,
            "n_kv_heads": c.n_kv_heads, "head_dim": c.head_dim, "vocab_size": c.vocab_size,
            "embedding_sha256": digest}


def check_backbone(fingerprint: dict[str, Any], backbone: Llama, *, strict: bool = False, source: str = "adapter") -> None:
    """Refuse a backbone of another shape; warn (or refuse with ``strict``) on different embedding weights."""
    have = backbone_fingerprint(backbone)
    if any(fingerprint.get(k) != have[k] for k in _SHAPE_KEYS):
        want = ", ".join(f"{k}={fingerprint.get(k)}" for k in _SHAPE_KEYS)
        got = ", ".join(f"{k}={have[k]}" for k in _SHAPE_KEYS)
        raise AdapterMismatchError(f"{source}: trained for a backbone with {want}; this backbone has {got}")
    if fingerprint.get("embedding_sha256") != have["embedding_sha256"]:
        msg = f"{source}: the backbone's embedding weights differ from those the adapter was trained with"
        if strict:
            raise AdapterMismatchError(msg)
        warnings.warn(msg + " (same shape: loading anyway)", AdapterHashWarning, stacklevel=3)


# ------------------------------------------------------------------------------------------ writing
def umask() -> int:
    """The process's file-creation mask (files made by ``mkstemp``/``mkdtemp`` are private; ours get the usual mode)."""
    try:  # Linux shows it without changing it (os.umask would, for a moment, for every thread)
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_save_safetensors(state: dict[str, torch.Tensor], path: Path, *, metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file through a temporary file and a rename, so a killed save leaves the old one."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, tmp, metadata=metadata)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~umask())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def exchange_paths(a: Path, b: Path) -> bool:
    """Swap two existing paths in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``).

    Returns False where the platform or the file system cannot, so the caller falls back to renames.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # a C library without the wrapper (glibc < 2.28, musl)
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def sibling_folder(folder: Path) -> Path:
    """A new empty folder beside ``folder`` (same file system, so it can be renamed into its place), with
    the usual permissions (``mkdtemp`` makes it private)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.", suffix=".tmp"))
    os.chmod(tmp, 0o777 & ~umask())
    return tmp


def replace_folder(new: Path, folder: Path) -> None:
    """Put the finished folder ``new`` (a sibling of ``folder``) in place of ``folder``.

    On Linux the two are exchanged in one atomic step, so a reader (or a process killed mid-save) always
    finds a complete folder at ``folder``. Elsewhere it takes two renames, and a process killed between
    them leaves the previous folder at ``.NAME.old-PID`` beside it.
    """
    if folder.exists() and exchange_paths(new, folder):
        shutil.rmtree(new, ignore_errors=True)  # ``new`` now holds the previous folder
        return
    old = None
    if folder.exists():
        old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
        os.replace(folder, old)
    os.replace(new, folder)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def trainable_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """The module's parameters that require gradients, by name."""
    return {k: p.detach() for k, p in module.named_parameters() if p.requires_grad}


def save_adapter(
    adapter: nn.Module,
    folder: str | Path,
    *,
    backbone: Llama,
    encoder: nn.Module | None = None,
    prompt: dict[str, Any] | None = None,
    recipe: dict[str, Any] | None = None,
) -> Path:
    """Write an adapter folder atomically (a killed save leaves the previous folder intact).

    Args:
        adapter: the trained adapter (its whole state dict is written: adapters hold trainable weights only).
        folder: destination folder (replaced if it exists).
        backbone: the backbone it was trained on (fingerprinted).
        encoder: its encoder; spec and preprocessing go into the manifest, weights into ``encoder.safetensors``.
        prompt: the prompt format used in training (system message, instruction), for generation.
        recipe: the training configuration, for reproducibility.
    """
    from sensorium import __version__

    folder = Path(folder)
    tmp = sibling_folder(folder)
    try:
        state = {k: v.detach() for k, v in adapter.state_dict().items()}
        atomic_save_safetensors(state, tmp / ADAPTER_FILE, metadata={"format": FORMAT})
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            **adapter.manifest(),
            "backbone": backbone_fingerprint(backbone),
            "encoder": None,
            "prompt": prompt or {},
            "recipe": recipe or {},
            "sensorium_version": __version__,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }
        if encoder is not None:  # its weights travel with the adapter (they may have been trained with it)
            spec = encoder.spec_dict()
            weights = {k: v.detach().contiguous() for k, v in encoder.weights().items()}
            atomic_save_safetensors(weights, tmp / ENCODER_FILE, metadata={"format": FORMAT})
            spec["weights"] = ENCODER_FILE
            manifest["encoder"] = spec
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, default=str), encoding="utf-8")
        replace_folder(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


# ------------------------------------------------------------------------------------------ reading
def read_manifest(folder: str | Path) -> dict[str, Any]:
    """The validated manifest of an adapter folder.

    Raises:
        AdapterError: missing folder or files, malformed JSON, another format or an unknown version.
    """
    folder = Path(folder)
    path = folder / MANIFEST_FILE
    if not folder.is_dir():
        raise AdapterError(f"{folder}: no such adapter folder")
    if not path.is_file():
        raise AdapterError(f"{folder}: no {MANIFEST_FILE} (not an adapter folder)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:  # ValueError: also integers past Python's digit limit
        raise AdapterError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise AdapterError(f"{path}: not a {FORMAT} manifest")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise AdapterError(f"{path}: format_version {version!r} is not supported (this sensorium reads {FORMAT_VERSION})")
    for key, kind in (("modality", str), ("kind", str), ("config", dict), ("backbone", dict)):
        if not isinstance(manifest.get(key), kind):
            raise AdapterError(f"{path}: '{key}' is missing or not a {kind.__name__}")
    return manifest


ADAPTER_BUILDERS: dict[str, Callable[[dict[str, Any], str], nn.Module]] = {}


def register_adapter_kind(kind: str, builder: Callable[[dict[str, Any], str], nn.Module]) -> None:
    """Make ``load_adapter`` able to rebuild adapters of ``kind`` from ``(config, modality)``."""
    ADAPTER_BUILDERS[kind] = builder


def _register_builtin_kinds() -> None:
    from sensorium.adapters.cross_attention import (
        CrossAttentionAdapter,
        CrossAttentionConfig,
        VideoCrossAttentionAdapter,
    )
    from sensorium.adapters.perceiver import PerceiverConfig
    from sensorium.adapters.projection import ProjectionAdapter, ProjectionConfig
    from sensorium.adapters.speech import SpeechAdapter, SpeechAdapterConfig

    register_adapter_kind("cross_attention", lambda c, m: CrossAttentionAdapter(CrossAttentionConfig(**c), modality=m))
    register_adapter_kind("video_cross_attention", lambda c, m: VideoCrossAttentionAdapter(
        CrossAttentionConfig(**c["cross_attention"]), PerceiverConfig(**c["perceiver"]), modality=m))
    register_adapter_kind("projection", lambda c, m: ProjectionAdapter(ProjectionConfig(**c), modality=m))
    register_adapter_kind("speech", lambda c, m: SpeechAdapter(SpeechAdapterConfig(**c), modality=m))


def load_adapter(folder: str | Path, backbone: Llama | None = None, *, strict: bool = False) -> nn.Module:
    """Rebuild an adapter from its folder; with ``backbone``, check that it fits.

    The returned module carries ``manifest_data`` (the manifest) and ``source`` (the folder).

    Raises:
        AdapterError: malformed folder, unknown kind or version, weights that do not match the config.
        AdapterMismatchError: the backbone has another shape (or other weights, with ``strict``).
    """
    from sensorium.backbone.checkpoint import read_safetensors

    folder = Path(folder)
    manifest = read_manifest(folder)
    if backbone is not None:
        check_backbone(manifest["backbone"], backbone, strict=strict, source=str(folder))
    if not ADAPTER_BUILDERS:
        _register_builtin_kinds()
    kind = manifest["kind"]
    if kind not in ADAPTER_BUILDERS:
        raise AdapterError(f"{folder}: unknown adapter kind {kind!r} (known: {', '.join(sorted(ADAPTER_BUILDERS))})")
    try:
        adapter = ADAPTER_BUILDERS[kind](manifest["config"], manifest["modality"])
    except (TypeError, AssertionError, ValueError, KeyError) as e:
        raise AdapterError(f"{folder}: adapter config does not build ({e})") from e
    try:
        state = read_safetensors(folder / ADAPTER_FILE)
    except CheckpointError as e:
        raise AdapterError(str(e)) from e
    own = adapter.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        raise AdapterError(f"{folder}: weights do not match the manifest (missing {missing[:3]}, unexpected {unexpected[:3]})")
    for k, v in state.items():
        if v.shape != own[k].shape:
            raise AdapterError(f"{folder}: {k} has shape {tuple(v.shape)}, the manifest's config needs {tuple(own[k].shape)}")
        if v.dtype != own[k].dtype and not v.is_floating_point():
            raise AdapterError(f"{folder}: {k} has dtype {v.dtype}, expected a floating dtype")
    adapter.load_state_dict(state)
    adapter.manifest_data = manifest
    adapter.source = folder
    return adapter


def load_encoder(folder: str | Path) -> nn.Module:
    """The frozen encoder an adapter folder names (its ``encoder.safetensors`` or its checkpoint path)."""
    from sensorium.encoders import build_encoder

    folder = Path(folder)
    spec = dict(read_manifest(folder).get("encoder") or {})
    if not spec:
        raise AdapterError(f"{folder}: the manifest names no encoder")
    weights = spec.pop("weights", None)
    if weights:
        spec["checkpoint"] = str(folder / weights)
    return build_encoder(spec)
