"""The embedded SmolLM2-135M-Instruct GGUF: logits and tokenizer against transformers' GGUF loaders."""

import pytest
import torch

SENTENCES = [
    "The capital of France is Paris, and 12345 apples cost 6.78 euros.",
    "  Leading spaces\n\nand blank lines\tand tabs!!  ",
    "naïve café — 東京 🙂 Ünïcödé",
    "<|im_start|>user\nhi there<|im_end|>\n",
    "It's 3.14159 o'clock, isn't it?   CRLF\r\nend",
]


@pytest.fixture(scope="module")
def hf_gguf(smollm2_gguf):
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name, dtype=torch.float32
    ).eval()
    tok = transformers.AutoTokenizer.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name)
    return model, tok


def test_config_from_gguf(smollm2):
    c = smollm2.config
    assert (c.vocab_size, c.dim, c.n_layers, c.n_heads, c.n_kv_heads, c.intermediate_size) == (
        49152, 576, 30, 9, 3, 1536,
    )
    assert c.tie_word_embeddings and c.rope_theta == 100000.0


def test_logits_match_transformers_gguf_loader(smollm2, smollm2_tokenizer, hf_gguf):
    hf, _ = hf_gguf
    tokens = torch.tensor([smollm2_tokenizer.encode(SENTENCES[0] + " " + SENTENCES[4])])
    with torch.no_grad():
        ours, theirs = smollm2(tokens), hf(tokens).logits
    torch.testing.assert_close(ours, theirs, atol=1e-3, rtol=0)


@pytest.mark.parametrize("text", SENTENCES)
def test_tokenizer_matches_transformers(smollm2_tokenizer, hf_gguf, text):
    _, hf_tok = hf_gguf
    ids = smollm2_tokenizer.encode(text)
    assert ids == hf_tok.encode(text, add_special_tokens=False)
    assert smollm2_tokenizer.decode(ids, skip_special=False) == text


def test_chat_template_matches_transformers(smollm2_tokenizer, hf_gguf):
    _, hf_tok = hf_gguf
    chats = [
        [{"role": "user", "content": "What is the capital of France?"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
         {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Name a colour."}],
    ]
    for messages in chats:
        expected = hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        expected = expected["input_ids"] if isinstance(expected, dict) or hasattr(expected, "keys") else expected
        assert smollm2_tokenizer.apply_chat_template(messages) == list(expected)


def test_chat_answers_a_factual_question(smollm2_gguf, capsys):
    from sensorium.cli import main

    rc = main(["generate", "--backbone", str(smollm2_gguf), "--chat", "--prompt", "What is the capital of France?",
               "--max-new-tokens", "24"])
    assert rc == 0
    assert "Paris" in capsys.readouterr().out
