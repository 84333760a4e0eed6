"""Decoding: KV cache equals recomputation, batching with left padding, sampling, streaming."""

import torch

from sensorium.backbone import TextStreamer, generate, sample_next
from tests.tiny import tiny_backbone


def _tiny(seed: int = 0):
    return tiny_backbone(seed, std=0.3)


PROMPTS = [[5, 17, 99, 3, 250, 7], [42], [8, 9, 10, 11]]


def test_greedy_with_cache_equals_recomputation():
    model = _tiny()
    for prompt in PROMPTS:
        cached = generate(model, [prompt], max_new_tokens=24)
        full = generate(model, [prompt], max_new_tokens=24, use_cache=False)
        assert cached == full and len(cached[0]) == 24


def test_batched_left_padding_equals_one_at_a_time():
    model = _tiny(1)
    batched = generate(model, PROMPTS, max_new_tokens=16)
    single = [generate(model, [p], max_new_tokens=16)[0] for p in PROMPTS]
    assert batched == single
    assert generate(model, PROMPTS, max_new_tokens=16, use_cache=False) == single


def test_cached_logits_match_full_forward():
    model = _tiny(2)
    tokens = torch.randint(0, 512, (2, 20))
    with torch.no_grad():
        full = model(tokens)
        model.setup_caches(2, 32)
        first = model(tokens[:, :13])
        chunk = model(tokens[:, 13:17], start=13)
        step = model(tokens[:, 17:18], start=17)
        model.clear_caches()
    torch.testing.assert_close(torch.cat([first, chunk, step], 1), full[:, :18], atol=1e-5, rtol=0)


def test_stop_tokens_end_each_row():
    model = _tiny(3)
    free = generate(model, PROMPTS, max_new_tokens=12)
    stop = free[0][4]
    stopped = generate(model, PROMPTS, max_new_tokens=12, stop_ids=[stop])
    for row_free, row_stopped in zip(free, stopped, strict=True):
        cut = row_free.index(stop) if stop in row_free else len(row_free)
        assert row_stopped == row_free[:cut]


def test_sampling_is_seeded_and_top_p_tiny_is_greedy():
    model = _tiny(4)
    a = generate(model, PROMPTS, max_new_tokens=10, temperature=1.0, seed=7)
    b = generate(model, PROMPTS, max_new_tokens=10, temperature=1.0, seed=7)
    c = generate(model, PROMPTS, max_new_tokens=10, temperature=1.0, seed=8)
    assert a == b and a != c
    greedy = generate(model, PROMPTS, max_new_tokens=10)
    assert generate(model, PROMPTS, max_new_tokens=10, temperature=1.0, top_p=1e-6, seed=1) == greedy


def test_sample_next_top_p_keeps_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    seen = {int(sample_next(logits, temperature=1.0, top_p=0.7, generator=g)) for _ in range(300)}
    assert seen == {0, 1}


def test_streamer_prints_whole_characters():
    pieces = []
    table = {1: b"caf", 2: b"\xc3", 3: b"\xa9!"}
    streamer = TextStreamer(lambda ids: b"".join(table[i] for i in ids).decode("utf-8", "replace"), pieces.append)
    for t in (1, 2, 3):
        streamer(0, t)
    assert pieces == ["caf", "é!"]
