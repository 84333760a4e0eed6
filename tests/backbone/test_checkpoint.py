"""Parity of load_backbone with transformers' LlamaForCausalLM on the same tiny weights."""

import json

import pytest
import torch

from sensorium import load_backbone
from sensorium.errors import CheckpointError, CheckpointNotFoundError, UnsupportedCheckpointError
from tests.conftest import make_hf_llama

VARIANTS = {
    "gqa-tied": {},
    "untied-llama3-rope-odd": dict(
        vocab_size=97, hidden_size=48, intermediate_size=100, num_hidden_layers=3, num_attention_heads=6,
        num_key_value_heads=3, tie_word_embeddings=False,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 32},
    ),
    "mha-head-dim": dict(hidden_size=40, num_attention_heads=4, num_key_value_heads=4, head_dim=12,
                         tie_word_embeddings=False),
    "mqa": dict(num_attention_heads=8, num_key_value_heads=1, rope_theta=500000.0),
}


def _tokens(vocab: int, length: int = 45, batch: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, vocab, (batch, length), generator=g)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_hf_folder_logits_match_transformers(tmp_path, variant):
    hf = make_hf_llama(tmp_path, **VARIANTS[variant])
    ours = load_backbone(tmp_path)
    tokens = _tokens(hf.config.vocab_size)
    with torch.no_grad():
        expected = hf(tokens).logits
        got = ours(tokens)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    assert ours.config.tie_word_embeddings == hf.config.tie_word_embeddings
    if ours.config.tie_word_embeddings:
        assert ours.lm_head.weight is ours.embed_tokens.weight


def test_llama3_rope_scaling_changes_logits(tmp_path):
    """The scaled variant must differ from plain RoPE, or the parity test above would not test scaling."""
    cfg = VARIANTS["untied-llama3-rope-odd"]
    make_hf_llama(tmp_path / "a", **cfg)
    make_hf_llama(tmp_path / "b", **{k: v for k, v in cfg.items() if k != "rope_scaling"})
    tokens = _tokens(97)
    with torch.no_grad():
        a, b = load_backbone(tmp_path / "a")(tokens), load_backbone(tmp_path / "b")(tokens)
    assert (a - b).abs().max() > 1e-3


def test_sharded_hf_folder(tmp_path):
    hf = make_hf_llama(tmp_path, max_shard_size="40KB", tie_word_embeddings=False)
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    tokens = _tokens(128)
    with torch.no_grad():
        torch.testing.assert_close(load_backbone(tmp_path)(tokens), hf(tokens).logits, atol=1e-4, rtol=0)


def _hf_to_meta(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of transformers' convert_llama_weights_to_hf permute: half-split rows → interleaved pairs."""
    rows, cols = w.shape
    return w.view(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def _rope_theta(c) -> float:
    params = getattr(c, "rope_parameters", None) or {}
    return float(params.get("rope_theta", getattr(c, "rope_theta", 10000.0)))


def _write_meta(folder, hf, n_shards: int = 1):
    c = hf.config
    sd = hf.state_dict()
    names = {
        "model.embed_tokens.weight": "tok_embeddings.weight", "model.norm.weight": "norm.weight",
        "lm_head.weight": "output.weight",
    }
    out = {}
    for key, value in sd.items():
        if key == "lm_head.weight" and c.tie_word_embeddings:
            continue
        if key in names:
            out[names[key]] = value
            continue
        i = key.split(".")[2]
        leaf = key.split(".", 3)[3]
        meta_leaf = {
            "self_attn.q_proj.weight": "attention.wq.weight", "self_attn.k_proj.weight": "attention.wk.weight",
            "self_attn.v_proj.weight": "attention.wv.weight", "self_attn.o_proj.weight": "attention.wo.weight",
            "mlp.gate_proj.weight": "feed_forward.w1.weight", "mlp.up_proj.weight": "feed_forward.w3.weight",
            "mlp.down_proj.weight": "feed_forward.w2.weight", "input_layernorm.weight": "attention_norm.weight",
            "post_attention_layernorm.weight": "ffn_norm.weight",
        }[leaf]
        if leaf == "self_attn.q_proj.weight":
            value = _hf_to_meta(value, c.num_attention_heads)
        elif leaf == "self_attn.k_proj.weight":
            value = _hf_to_meta(value, c.num_key_value_heads)
        out[f"layers.{i}.{meta_leaf}"] = value
    folder.mkdir(parents=True)
    params = {"dim": c.hidden_size, "n_layers": c.num_hidden_layers, "n_heads": c.num_attention_heads,
              "n_kv_heads": c.num_key_value_heads, "vocab_size": c.vocab_size, "norm_eps": c.rms_norm_eps,
              "rope_theta": _rope_theta(c), "multiple_of": 32}
    (folder / "params.json").write_text(json.dumps(params))
    if n_shards == 1:
        torch.save(out, folder / "consolidated.00.pth")
        return
    # Model-parallel shards as Meta's reference code writes them (Llama 2: embedding split on dim 1).
    for s in range(n_shards):
        shard = {}
        for key, value in out.items():
            if "norm" in key:
                shard[key] = value
            elif key.endswith(("wo.weight", "w2.weight", "tok_embeddings.weight")):
                shard[key] = value.chunk(n_shards, dim=1)[s].clone()
            else:
                shard[key] = value.chunk(n_shards, dim=0)[s].clone()
        torch.save(shard, folder / f"consolidated.{s:02d}.pth")


@pytest.mark.parametrize("variant,n_shards", [("gqa-tied", 1), ("untied-llama3-rope-odd", 1), ("mqa", 1),
                                              ("mha-head-dim", 2)])
def test_meta_folder_matches_hf_folder(tmp_path, variant, n_shards):
    cfg = {k: v for k, v in VARIANTS[variant].items() if k not in ("rope_scaling", "head_dim")}
    if variant == "mha-head-dim":
        cfg["hidden_size"] = 48
    hf = make_hf_llama(tmp_path / "hf", **cfg)
    _write_meta(tmp_path / "meta", hf, n_shards)
    tokens = _tokens(hf.config.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(load_backbone(tmp_path / "meta")(tokens), hf(tokens).logits, atol=1e-4, rtol=0)


def test_dtype_option(tmp_path):
    make_hf_llama(tmp_path)
    model = load_backbone(tmp_path, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model(_tokens(128)).dtype == torch.bfloat16


# ------------------------------------------------------------------------------------------ bad input
def test_missing_path(tmp_path):
    with pytest.raises(CheckpointNotFoundError, match="no such file"):
        load_backbone(tmp_path / "nope")


def test_folder_that_is_no_checkpoint(tmp_path):
    (tmp_path / "readme.txt").write_text("hello")
    with pytest.raises(CheckpointNotFoundError, match="not a checkpoint folder"):
        load_backbone(tmp_path)


def test_truncated_safetensors(tmp_path):
    make_hf_llama(tmp_path)
    f = tmp_path / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="cannot read safetensors"):
        load_backbone(tmp_path)


def test_unknown_rope_type(tmp_path):
    make_hf_llama(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["rope_scaling"] = {"rope_type": "yarn", "factor": 4.0}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedCheckpointError, match="rope type 'yarn'"):
        load_backbone(tmp_path)


def test_weights_that_do_not_fit_the_config(tmp_path):
    make_hf_llama(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["intermediate_size"] = 100
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"mlp\.\w+_proj\.weight has shape .* config implies"):
        load_backbone(tmp_path)


def test_other_architecture_in_config(tmp_path):
    make_hf_llama(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["model_type"] = "mistral"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedCheckpointError, match="model_type 'mistral'"):
        load_backbone(tmp_path)


def test_gguf_of_another_architecture(tmp_path):
    import gguf
    import numpy as np

    path = tmp_path / "gpt2.gguf"
    w = gguf.GGUFWriter(str(path), "gpt2")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(UnsupportedCheckpointError, match="GGUF architecture 'gpt2'"):
        load_backbone(path)


def test_garbage_gguf(tmp_path):
    path = tmp_path / "bad.gguf"
    path.write_bytes(b"GGUF" + b"\x00" * 7)
    with pytest.raises(CheckpointError, match="not a readable GGUF"):
        load_backbone(path)
