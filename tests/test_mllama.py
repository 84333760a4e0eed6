"""Mllama interop: a tiny random transformers MllamaForConditionalGeneration ↔ sensorium backbone + image adapter."""

import json
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from sensorium import ComposedModel, load_adapter, load_backbone
from sensorium.adapters import CrossAttentionAdapter, CrossAttentionConfig
from sensorium.interop import (
    MllamaConversionError,
    export_mllama,
    import_mllama,
    mllama_layer_mapping,
    mllama_media,
)
from sensorium.interop.mllama import _mllama_indices

IMAGE = 128  # image_token_index: the first of the 8 rows past the text vocabulary


def make_mllama(folder: Path, *, cross_attention_layers=(1, 3), num_hidden_layers=5, seed: int = 0):
    """Save a random ``MllamaForConditionalGeneration`` (tiny vision and text towers) to ``folder``; return it (eval).

    Every weight is random, norms around 1 and both gates of each cross-attention layer well away from 0, so a
    converter that drops or misplaces any of them cannot pass a parity test.
    """
    from transformers import MllamaConfig, MllamaForConditionalGeneration

    vision = dict(hidden_size=16, num_hidden_layers=1, num_global_layers=1, attention_heads=2, intermediate_size=32,
                  vision_output_dim=32, image_size=28, patch_size=14, max_num_tiles=2,
                  intermediate_layers_indices=[0], supported_aspect_ratios=[[1, 1], [1, 2], [2, 1]])
    text = dict(vocab_size=128, hidden_size=64, num_hidden_layers=num_hidden_layers, num_attention_heads=4,
                num_key_value_heads=2, intermediate_size=96, cross_attention_layers=list(cross_attention_layers),
                rms_norm_eps=1e-5, max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 32})
    config = MllamaConfig(vision_config=vision, text_config=text, image_token_index=IMAGE)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = MllamaForConditionalGeneration(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
            elif "gate" in name and p.numel() == 1:
                p.copy_(0.8 + 0.5 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.1)
    model.save_pretrained(folder)
    return model


@pytest.fixture(scope="module")
def mllama(tmp_path_factory):
    """(source folder, reference model, backbone dir, adapter dir) for the default [1, 3]-of-5 layout."""
    root = tmp_path_factory.mktemp("mllama")
    model = make_mllama(root / "src")
    (root / "src" / "tokenizer_config.json").write_text("{}", encoding="utf-8")
    backbone_dir, adapter_dir = import_mllama(root / "src", root / "out")
    return root / "src", model, backbone_dir, adapter_dir


def mllama_inputs(seed: int = 0):
    """Row 0: image, 5 tokens, image, 5 tokens; row 1: image then 11 tokens (its second image slot is padding)."""
    g = torch.Generator().manual_seed(seed)
    B, T = 2, 12
    ids = torch.randint(3, 128, (B, T), generator=g)
    ids[:, 0] = IMAGE
    ids[0, 6] = IMAGE
    pixels = torch.randn(B, 2, 2, 3, 28, 28, generator=g)  # (B, images, tiles, C, H, W)
    aspect_ids = torch.tensor([[2, 3], [2, 0]])  # [1, 2] and [2, 1]: both tiles real; 0 = no image
    aspect_mask = torch.tensor([[[1, 1], [1, 1]], [[1, 1], [0, 0]]])
    # What MllamaProcessor builds: text from an <|image|> up to the next one sees that image's tiles.
    xmask = torch.zeros(B, T, 2, 2, dtype=torch.long)
    xmask[0, :6, 0] = 1
    xmask[0, 6:, 1] = 1
    xmask[1, :, 0] = 1
    return dict(input_ids=ids, pixel_values=pixels, aspect_ratio_ids=aspect_ids, aspect_ratio_mask=aspect_mask,
                cross_attention_mask=xmask), [2, 1]


def sensorium_logits(backbone_dir, adapter_dir, model, inputs, num_images):
    """Our logits for the same prompt: the vision tower's output (before the projector) as the adapter's features."""
    bb = load_backbone(backbone_dir)
    composed = ComposedModel(bb, [load_adapter(adapter_dir, bb, strict=True)]).eval()
    vision = model.model.vision_model(pixel_values=inputs["pixel_values"], aspect_ratio_ids=inputs["aspect_ratio_ids"],
                                      aspect_ratio_mask=inputs["aspect_ratio_mask"]).last_hidden_state
    tokens = inputs["input_ids"].masked_fill(inputs["input_ids"] == IMAGE, composed.placeholder_ids["image"])
    return composed(tokens, media={"image": mllama_media(vision, num_images)})


# ---------------------------------------------------------------------------------------------- mapping
def test_layer_mapping():
    # Llama 3.2 11B Vision: 8 cross-attention layers among 40 → blocks before every 4th of 32 Llama layers.
    self_layers, blocks = mllama_layer_mapping(40, [3, 8, 13, 18, 23, 28, 33, 38])
    assert len(self_layers) == 32 and self_layers[:4] == [0, 1, 2, 4]
    assert blocks == [3, 7, 11, 15, 19, 23, 27, 31]
    # A first-position and two consecutive cross-attention layers: two blocks in front of one layer.
    self_layers, blocks = mllama_layer_mapping(6, [0, 2, 3])
    assert self_layers == [1, 4, 5] and blocks == [0, 1, 1]
    assert _mllama_indices(3, blocks) == ([1, 4, 5], [0, 2, 3])
    assert _mllama_indices(32, [3, 7, 11, 15, 19, 23, 27, 31])[1] == [3, 8, 13, 18, 23, 28, 33, 38]
    with pytest.raises(MllamaConversionError, match="cross-attention layer 4 is the last of 5"):
        mllama_layer_mapping(5, [1, 4])
    with pytest.raises(MllamaConversionError, match=r"\[7\] are outside the 5 text layers"):
        mllama_layer_mapping(5, [1, 7])


# ---------------------------------------------------------------------------------------------- parity
@torch.no_grad()
def test_logits_equal_transformers_with_the_image_first(mllama):
    src, model, backbone_dir, adapter_dir = mllama
    inputs, num_images = mllama_inputs()
    ref = model(**inputs).logits
    ours = sensorium_logits(backbone_dir, adapter_dir, model, inputs, num_images)
    diff = (ours - ref).abs().max().item()
    assert diff <= 1e-4, f"max logit difference {diff}"
    # Text only: Mllama skips its cross-attention layers, sensorium runs the bare backbone.
    text = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(1))
    bb = load_backbone(backbone_dir)
    assert (bb(text) - model(input_ids=text).logits).abs().max().item() <= 1e-4


@torch.no_grad()
def test_first_and_consecutive_cross_attention_layers(tmp_path):
    """[0, 2, 3] of 6: a block in front of layer 0 and two blocks in front of layer 1, run in order."""
    model = make_mllama(tmp_path / "src", cross_attention_layers=(0, 2, 3), num_hidden_layers=6, seed=3)
    backbone_dir, adapter_dir = import_mllama(tmp_path / "src", tmp_path / "out")
    assert load_backbone(backbone_dir).config.n_layers == 3
    assert json.loads((adapter_dir / "manifest.json").read_text())["placement"]["layers"] == [0, 1, 1]
    inputs, num_images = mllama_inputs(seed=2)
    diff = (sensorium_logits(backbone_dir, adapter_dir, model, inputs, num_images) - model(**inputs).logits).abs().max()
    assert diff.item() <= 1e-4, f"max logit difference {diff.item()}"


@torch.no_grad()
def test_text_before_the_image_follows_metas_reference(mllama, monkeypatch):
    """Rows before the first image: sensorium zeroes both branches (Meta's reference); transformers only the MLP."""
    from transformers.models.mllama import modeling_mllama

    src, model, backbone_dir, adapter_dir = mllama
    inputs, _ = mllama_inputs()
    ids = inputs["input_ids"][1:].clone()
    ids[0, 0] = 5
    ids[0, 4] = IMAGE  # four text tokens, then the image
    xmask = torch.zeros(1, 12, 1, 2, dtype=torch.long)
    xmask[0, 4:] = 1
    inputs = dict(input_ids=ids, pixel_values=inputs["pixel_values"][1:, :1],
                  aspect_ratio_ids=inputs["aspect_ratio_ids"][1:, :1],
                  aspect_ratio_mask=inputs["aspect_ratio_mask"][1:, :1], cross_attention_mask=xmask)
    ours = sensorium_logits(backbone_dir, adapter_dir, model, inputs, [1])
    assert (ours - model(**inputs).logits).abs().max().item() > 1e-2  # transformers issue #39379

    def reference_forward(self, hidden_states, cross_attention_states, cross_attention_mask, attention_mask,
                          full_text_row_masked_out_mask, **kwargs):
        rows = full_text_row_masked_out_mask[:, 0]  # (B, T, 1)
        attn, _ = self.cross_attn(hidden_states=self.input_layernorm(hidden_states), attention_mask=cross_attention_mask,
                                  cross_attention_states=cross_attention_states, **kwargs)
        h = hidden_states + self.cross_attn_attn_gate.tanh() * rows * attn
        return h + self.cross_attn_mlp_gate.tanh() * rows * self.mlp(self.post_attention_layernorm(h))

    monkeypatch.setattr(modeling_mllama.MllamaCrossAttentionDecoderLayer, "forward", reference_forward)
    assert (ours - model(**inputs).logits).abs().max().item() <= 1e-4


# ---------------------------------------------------------------------------------------------- files
def test_imported_folders(mllama):
    src, model, backbone_dir, adapter_dir = mllama
    config = json.loads((backbone_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["num_hidden_layers"] == 3
    assert (backbone_dir / "tokenizer_config.json").is_file()
    manifest = json.loads((adapter_dir / "manifest.json").read_text())
    assert manifest["kind"] == "cross_attention" and manifest["modality"] == "image"
    assert manifest["config"]["media_norm"] is False and manifest["config"]["attend"] == "last"
    assert manifest["backbone"]["n_layers"] == 3 and manifest["backbone"]["vocab_size"] == 128
    assert manifest["recipe"]["imported_from"]["cross_attention_layers"] == [1, 3]
    sd = model.state_dict()
    adapter = load_file(adapter_dir / "adapter.safetensors")
    assert torch.equal(adapter["placeholder_embedding"], sd["model.language_model.embed_tokens.weight"][IMAGE])
    assert torch.equal(adapter["media_proj.weight"], sd["model.multi_modal_projector.weight"])
    assert torch.equal(adapter["blocks.1.cross_attn.k_norm.weight"],
                       sd["model.language_model.layers.3.cross_attn.k_norm.weight"])
    backbone = load_file(backbone_dir / "model.safetensors")
    assert torch.equal(backbone["model.layers.2.self_attn.q_proj.weight"],
                       sd["model.language_model.layers.4.self_attn.q_proj.weight"])


def test_sharded_backbone(mllama, tmp_path):
    src, _, backbone_dir, _ = mllama
    sharded, _ = import_mllama(src, tmp_path / "out", max_shard_bytes=60_000)
    assert (sharded / "model.safetensors.index.json").is_file() and len(list(sharded.glob("model-*.safetensors"))) > 1
    a, b = load_backbone(backbone_dir).state_dict(), load_backbone(sharded).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_export_then_import_round_trips_bit_exactly(mllama, tmp_path):
    from transformers import MllamaForConditionalGeneration

    src, model, backbone_dir, adapter_dir = mllama
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a same-layout adapter exports without any warning
        exported = export_mllama(backbone_dir, adapter_dir, tmp_path / "mllama", vision=src)
    again_backbone, again_adapter = import_mllama(exported, tmp_path / "again")
    for first, second in ((backbone_dir / "model.safetensors", again_backbone / "model.safetensors"),
                          (adapter_dir / "adapter.safetensors", again_adapter / "adapter.safetensors")):
        a, b = load_file(first), load_file(second)
        assert a.keys() == b.keys()
        for k in a:
            assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    assert (backbone_dir / "config.json").read_text() == (again_backbone / "config.json").read_text()
    manifests = [json.loads((d / "manifest.json").read_text()) for d in (adapter_dir, again_adapter)]
    assert manifests[0]["config"] == manifests[1]["config"] and manifests[0]["backbone"] == manifests[1]["backbone"]
    # transformers reads the export back as the original model; only the 7 reserved embedding rows are zero.
    reloaded = MllamaForConditionalGeneration.from_pretrained(exported).state_dict()
    original = model.state_dict()
    assert reloaded.keys() == original.keys()
    emb = "model.language_model.embed_tokens.weight"
    for k in original:
        if k != emb:
            assert torch.equal(reloaded[k], original[k]), k
    assert torch.equal(reloaded[emb][: IMAGE + 1], original[emb][: IMAGE + 1])
    assert not reloaded[emb][IMAGE + 1 :].any()


def test_export_without_vision_tower(mllama, tmp_path):
    src, _, backbone_dir, adapter_dir = mllama
    with pytest.warns(UserWarning, match="no vision tower"):
        exported = export_mllama(backbone_dir, adapter_dir, tmp_path / "mllama")
    config = json.loads((exported / "config.json").read_text())
    assert config["vision_config"]["vision_output_dim"] == 32  # the vision config recorded at import
    assert not any(k.startswith("vision_model.") for k in load_file(exported / "model.safetensors"))
    _, again = import_mllama(exported, tmp_path / "again")
    assert load_file(again / "adapter.safetensors").keys() == load_file(adapter_dir / "adapter.safetensors").keys()


# ---------------------------------------------------------------------------------------------- errors
def test_a_plain_llama_folder_is_refused(tmp_path):
    from tests.conftest import make_hf_llama

    make_hf_llama(tmp_path / "llama")
    with pytest.raises(MllamaConversionError, match=r"model_type 'llama' .*LlamaForCausalLM.* not a Mllama checkpoint"):
        import_mllama(tmp_path / "llama", tmp_path / "out")
    with pytest.raises(MllamaConversionError, match="no config.json"):
        import_mllama(tmp_path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_wrong_or_missing_weights_are_named(mllama, tmp_path):
    src, *_ = mllama
    state = load_file(src / "model.safetensors")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text((src / "config.json").read_text())
    key = "language_model.model.layers.3.cross_attn.k_proj.weight"
    save_file({**state, key: torch.zeros(48, 64)}, bad / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(MllamaConversionError, match=rf"{key} has shape \(48, 64\), the config implies \(32, 64\)"):
        import_mllama(bad, tmp_path / "out")
    key = "language_model.model.layers.1.cross_attn.q_norm.weight"
    save_file({k: v for k, v in state.items() if k != key}, bad / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(MllamaConversionError, match=rf"missing 1 weight.*{key}"):
        import_mllama(bad, tmp_path / "out")
    save_file({**state, "language_model.model.layers.1.cross_attn.q_proj.bias": torch.zeros(64)},
              bad / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(MllamaConversionError, match=r"no place .*layers\.1\.cross_attn\.q_proj\.bias"):
        import_mllama(bad, tmp_path / "out")
    save_file({"foo." + k: v for k, v in state.items()}, bad / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(MllamaConversionError, match="unknown weight layout: no 'language_model.model.embed_tokens"):
        import_mllama(bad, tmp_path / "out")
    config = json.loads((src / "config.json").read_text())
    config["text_config"]["cross_attention_layers"] = [1, 4]
    save_file(state, bad / "model.safetensors", metadata={"format": "pt"})
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(MllamaConversionError, match="is the last of 5"):
        import_mllama(bad, tmp_path / "out")


def test_export_refuses_adapters_that_do_not_fit(mllama, tmp_path):
    src, _, backbone_dir, _ = mllama
    bb = load_backbone(backbone_dir)
    shaped = CrossAttentionConfig.for_backbone(bb.config, 32, every=2, mlp_hidden=80)  # media_norm=True by default
    with pytest.raises(MllamaConversionError, match=r"mlp_hidden=80.*96.*media_norm=True"):
        export_mllama(bb, CrossAttentionAdapter(shaped), tmp_path / "x")
    ok = CrossAttentionConfig.for_backbone(bb.config, 32, every=2, media_norm=False, attend="last")
    with pytest.raises(MllamaConversionError, match="vision_output_dim 32 does not match the adapter's media_dim 48"):
        export_mllama(bb, CrossAttentionAdapter(CrossAttentionConfig(**{**ok.__dict__, "media_dim": 48})),
                      tmp_path / "x", vision=src)
    from sensorium.adapters import ProjectionAdapter, ProjectionConfig

    with pytest.raises(MllamaConversionError, match="kind 'projection' is not 'cross_attention'"):
        export_mllama(bb, ProjectionAdapter(ProjectionConfig.for_backbone(bb.config, 32, tokens_per_item=4)), tmp_path / "x")
    assert not (tmp_path / "x").exists()


# ---------------------------------------------------------------------------------------------- CLI
def test_cli_import(mllama, tmp_path, capsys):
    from sensorium.cli import main

    src, *_ = mllama
    assert main(["import", "mllama", str(src), "--out", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "backbone" / "config.json").is_file()
    assert (tmp_path / "out" / "adapter" / "manifest.json").is_file()
    assert main(["import", "mllama", str(tmp_path / "out" / "backbone"), "--out", str(tmp_path / "x")]) == 2
    assert "not a Mllama checkpoint" in capsys.readouterr().err
