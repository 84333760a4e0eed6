"""attach(): sensorium adapters inside a transformers LlamaForCausalLM give the logits of compose()."""

import copy
import threading
import warnings

import pytest
import torch

import sensorium
from sensorium import attach, compose, detach, load_adapter, load_backbone, save_adapter
from sensorium.adapters import (
    AdapterHashWarning,
    AdapterMismatchError,
    CrossAttentionAdapter,
    CrossAttentionConfig,
    ProjectionAdapter,
    ProjectionConfig,
)
from sensorium.adapters.cross_attention import VideoCrossAttentionAdapter
from sensorium.adapters.perceiver import PerceiverConfig
from sensorium.attach import AttachedLayer, AttachError, Layout
from sensorium.compose import MediaMismatchError
from tests.conftest import make_hf_llama
from tests.tiny import randomise

MEDIA_DIM, TOKENS_PER_ITEM, ATOL = 16, 3, 1e-4


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf-llama")
    make_hf_llama(path)  # vocab 128, width 64, 2 layers, 4 heads / 2 KV heads, tied embeddings
    return path


@pytest.fixture
def hf(folder):
    import transformers

    return transformers.LlamaForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()


@pytest.fixture(scope="module")
def ours(folder):
    return load_backbone(folder)


def xattn_adapter(config, seed: int = 2) -> CrossAttentionAdapter:
    """Blocks in front of both layers, every weight (gates and placeholder embedding included) non-trivial."""
    return randomise(CrossAttentionAdapter(CrossAttentionConfig.for_backbone(config, MEDIA_DIM, every=1)), seed)


def proj_adapter(config) -> ProjectionAdapter:
    return randomise(ProjectionAdapter(ProjectionConfig.for_backbone(config, MEDIA_DIM, tokens_per_item=TOKENS_PER_ITEM)))


def batch(counts, *, ph: int = 128, per_item: int = 1, T: int = 14, seed: int = 3, tokens_per_feature: int = 5):
    """Random text with each row's items' placeholders (``per_item`` positions each) and random features."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 128, (len(counts), T), generator=g)
    for b, n in enumerate(counts):
        for k in range(n):
            tokens[b, 2 + 5 * k : 2 + 5 * k + per_item] = ph
    feats = torch.randn(sum(counts), tokens_per_feature, MEDIA_DIM, generator=g)
    return tokens, {"image": {"features": feats, "counts": torch.tensor(counts)}}


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, f"{tuple(a.shape)} vs {tuple(b.shape)}"
    return float((a - b).abs().max())


@pytest.mark.parametrize("counts", [(1, 1), (1, 0), (2, 1), (0, 0)], ids=["both", "one-row-without", "two-items", "none"])
def test_cross_attention_logits_match_compose(hf, ours, counts):
    adapter = xattn_adapter(ours.config)
    composed = compose(ours, [adapter])
    handle = attach(hf, adapter)
    tokens, media = batch(counts)
    with torch.no_grad():
        expected = composed(tokens, media=media)
        got = handle(tokens, media=media).logits
        bare = hf(inputs_embeds=handle.embed(tokens, {})).logits  # same embeddings, no blocks
    assert max_diff(got, expected) <= ATOL
    for b, n in enumerate(counts):
        if n == 0:  # a row without an image is the bare model's row, exactly
            assert torch.equal(got[b], bare[b])
        else:  # the adapter changes what follows the placeholder
            assert max_diff(got[b, 3:], bare[b, 3:]) > 1e-2
    composed.remove_adapter("image")


def test_text_only_batch_without_media(hf, ours):
    adapter = xattn_adapter(ours.config)
    composed = compose(ours, [adapter])
    handle = attach(hf, adapter)
    tokens, _ = batch((0, 0))
    with torch.no_grad():
        got = handle(tokens).logits
        assert max_diff(got, composed(tokens)) <= ATOL
        assert torch.equal(got, hf(tokens).logits)
    composed.remove_adapter("image")


def test_projection_logits_match_compose(hf, ours):
    adapter = proj_adapter(ours.config)
    composed = compose(ours, [adapter])
    handle = attach(hf, adapter)
    tokens, media = batch((1, 0), per_item=TOKENS_PER_ITEM, tokens_per_feature=TOKENS_PER_ITEM)
    with torch.no_grad():
        got = handle(tokens, media=media).logits
        assert max_diff(got, composed(tokens, media=media)) <= ATOL
        assert torch.equal(got[1], hf(tokens[1:]).logits[0])  # the row without an image: the bare model
    assert not any(isinstance(layer, AttachedLayer) for layer in hf.model.layers)  # splice only: no wrapper


def test_video_and_image_adapters_together(hf, ours):
    perceiver = PerceiverConfig(media_dim=MEDIA_DIM, dim=32, num_latents=4, num_frames=4, group=2, depth=1, n_heads=4)
    video = randomise(VideoCrossAttentionAdapter(CrossAttentionConfig.for_backbone(ours.config, 32, offset=1, every=1),
                                                 perceiver), seed=5)
    image = xattn_adapter(ours.config)
    composed = compose(ours, [image, video])
    handle = attach(hf, [image, video])
    tokens, media = batch((1, 1))
    tokens[0, 9] = 129  # a clip in row 0, after its image
    media["video"] = {"features": torch.randn(1, 4 * 2, MEDIA_DIM), "counts": torch.tensor([1, 0])}
    with torch.no_grad():
        assert max_diff(handle(tokens, media=media).logits, composed(tokens, media=media)) <= ATOL
    for m in ("image", "video"):
        composed.remove_adapter(m)


def test_variable_length_speech_splice_matches_compose(hf, ours):
    from sensorium.adapters.speech import SpeechAdapter, SpeechAdapterConfig

    adapter = randomise(SpeechAdapter(SpeechAdapterConfig.for_backbone(ours.config, MEDIA_DIM, hidden=32, n_heads=4)))
    composed = compose(ours, [adapter])
    handle = attach(hf, adapter)
    g = torch.Generator().manual_seed(6)
    feats = [torch.randn(9, MEDIA_DIM, generator=g), torch.randn(6, MEDIA_DIM, generator=g)]  # items of two lengths
    tokens = torch.randint(0, 128, (2, 14), generator=g)
    tokens[0, 2 : 2 + adapter.output_length(9)] = 130
    tokens[1, 3 : 3 + adapter.output_length(6)] = 130
    media = {"speech": {"features": feats, "counts": [1, 1]}}
    with torch.no_grad():
        assert max_diff(handle(tokens, media=media).logits, composed(tokens, media=media)) <= ATOL


def test_incremental_decoding_with_an_hf_cache(hf, ours):
    handle = attach(hf, xattn_adapter(ours.config))
    tokens, media = batch((1, 1))
    with torch.no_grad():
        full = handle(tokens, media=media).logits
        state = handle.prepare(tokens[:, :-1], media)
        out = handle(tokens[:, :-1], media_state=state, use_cache=True)
        cache = getattr(out, "cache", None) or out.past_key_values
        kw = {"cache": cache} if hasattr(out, "cache") else {"past_key_values": cache}
        step = handle(tokens[:, -1:], media_state=state, use_cache=True, **kw).logits
    assert max_diff(step[:, -1], full[:, -1]) <= ATOL


def test_detach_restores_keys_values_and_outputs_exactly(hf, ours):
    tokens, media = batch((1, 0))
    before = {k: v.clone() for k, v in hf.state_dict().items()}
    layers_before, names_before = list(hf.model.layers), [n for n, _ in hf.named_modules()]
    text = tokens.masked_fill(tokens >= 128, 7)
    with torch.no_grad():
        out_before = hf(text).logits
        handle = attach(hf, xattn_adapter(ours.config))
        assert all(isinstance(layer, AttachedLayer) for layer in hf.model.layers)
        assert hf.model.layers[0].self_attn is layers_before[0].self_attn  # attributes read through the wrapper
        attached_sd = hf.state_dict()
        assert list(attached_sd) == list(before)  # the wrapper hides itself
        assert all(torch.equal(attached_sd[k], v) for k, v in before.items())
        assert torch.equal(hf(text).logits, out_before)  # called directly: no media, the bare model
        assert not torch.equal(handle(tokens, media=media).logits[0, 3:], hf(inputs_embeds=handle.embed(tokens, {})).logits[0, 3:])
        twin = copy.deepcopy(hf)  # a copy made while attached runs without media (no handle feeds it)
        assert torch.equal(twin(text).logits, out_before)
        assert detach(handle) is hf
        out_after = hf(text).logits
    after = hf.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert all(a is b for a, b in zip(hf.model.layers, layers_before, strict=True))
    assert [n for n, _ in hf.named_modules()] == names_before
    assert torch.equal(out_after, out_before)
    with pytest.raises(AttachError, match="detached"):
        handle(tokens, media=media)
    attach(hf, xattn_adapter(ours.config)).detach()  # attach again after detach works


def test_two_models_and_threads_do_not_share_media(folder, ours):
    import transformers

    models = [transformers.LlamaForCausalLM.from_pretrained(folder, attn_implementation="eager").eval() for _ in range(2)]
    handles = [attach(m, xattn_adapter(ours.config, seed=s)) for m, s in zip(models, (2, 7), strict=True)]
    inputs = [batch((1, 1), seed=s) for s in (3, 4)]
    with torch.no_grad():
        refs = {(h, i): handles[h](*inputs[i][:1], media=inputs[i][1]).logits for h in range(2) for i in range(2)}
        # interleaved in one thread: each model sees only its own handle's media
        for h, i in [(0, 0), (1, 1), (0, 1), (1, 0)]:
            assert torch.equal(handles[h](inputs[i][0], media=inputs[i][1]).logits, refs[h, i])
        assert torch.equal(models[0](inputs[0][0][:, :2]).logits, models[1](inputs[0][0][:, :2]).logits)
    errors: list[str] = []

    def run(h: int, i: int) -> None:
        with torch.no_grad():
            for _ in range(4):
                if not torch.equal(handles[h](inputs[i][0], media=inputs[i][1]).logits, refs[h, i]):
                    errors.append(f"handle {h} with media {i}")

    threads = [threading.Thread(target=run, args=(h, i)) for h in range(2) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


def test_sensorium_llama_and_bare_hf_decoder_layouts(folder, hf, ours):
    adapter = xattn_adapter(ours.config)
    composed = compose(ours, [adapter])
    tokens, media = batch((1, 0))
    with torch.no_grad():
        expected = composed(tokens, media=media)
        own = load_backbone(folder)
        assert max_diff(attach(own, adapter)(tokens, media=media), expected) <= ATOL
        handle = attach(hf.model, adapter)  # a bare LlamaModel: layers / embed_tokens
        assert handle.layout == Layout("layers", "embed_tokens")
        hidden = handle(tokens, media=media).last_hidden_state
        assert max_diff(hf.lm_head(hidden), expected) <= ATOL
    composed.remove_adapter("image")


def test_adapter_folder_checks_the_manifest(tmp_path, folder, hf, ours):
    adapter = xattn_adapter(ours.config)
    save_adapter(adapter, tmp_path / "a", backbone=ours)
    loaded = load_adapter(tmp_path / "a")
    tokens, media = batch((1, 1))
    with torch.no_grad():
        expected = attach(hf, adapter)(tokens, media=media).logits
        assert hf.model.layers[0].slot.ctx is None  # nothing is left set between calls
    hf2 = make_hf_llama(tmp_path / "same", seed=0)  # same weights: no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.no_grad():
            assert torch.equal(attach(hf2, tmp_path / "a")(tokens, media=media).logits, expected)
    twin = make_hf_llama(tmp_path / "twin", seed=1)  # same shape, other weights
    with pytest.warns(AdapterHashWarning, match="embedding weights differ"):
        attach(twin, loaded).detach()
    with pytest.raises(AdapterMismatchError, match="embedding weights differ"):
        attach(twin, loaded, strict=True)
    deeper = make_hf_llama(tmp_path / "deeper", num_hidden_layers=3)
    with pytest.raises(AdapterMismatchError, match=r"with n_layers=2, .*has n_layers=3, .*\(n_layers differs\)"):
        attach(deeper, loaded)
    wider_vocab = make_hf_llama(tmp_path / "vocab", vocab_size=100)
    with pytest.raises(AdapterMismatchError, match=r"vocab_size=128; .*vocab_size=100 \(vocab_size differs\)"):
        attach(wider_vocab, loaded)
    assert not any(isinstance(layer, AttachedLayer) for m in (deeper, wider_vocab) for layer in m.model.layers)


def test_shape_and_layout_errors_name_what_did_not_match(tmp_path, hf, ours):
    narrow = make_hf_llama(tmp_path, hidden_size=48)
    with pytest.raises(AdapterMismatchError, match="dim=64; LlamaForCausalLM has hidden width 48"):
        attach(narrow, xattn_adapter(ours.config))
    shallow = make_hf_llama(tmp_path / "shallow", num_hidden_layers=1)
    with pytest.raises(AdapterMismatchError, match=r"layer\(s\) \[1\]; LlamaForCausalLM has n_layers=1"):
        attach(shallow, xattn_adapter(ours.config))
    with pytest.raises(AttachError, match=r"cannot find the decoder layers of Sequential: tried model\.layers"):
        attach(torch.nn.Sequential(torch.nn.Linear(4, 4)), xattn_adapter(ours.config))
    with pytest.raises(AttachError, match=r"tried decoder\.blocks \(missing\)"):
        attach(hf, xattn_adapter(ours.config), layout=("decoder.blocks", "model.embed_tokens"))
    handle = attach(hf, xattn_adapter(ours.config))
    with pytest.raises(AttachError, match="already has sensorium adapters attached"):
        attach(hf, xattn_adapter(ours.config))
    tokens, media = batch((1, 0))
    media["image"]["counts"] = torch.tensor([0, 1])
    with pytest.raises(MediaMismatchError, match="sample 0: 1 <\\|image\\|> positions in the text, but 0"):
        handle(tokens, media=media)
    with pytest.raises(MediaMismatchError, match="no image media was given"):
        handle(tokens)
    assert sensorium.detach is detach
