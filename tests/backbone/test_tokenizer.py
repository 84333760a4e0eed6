"""Tokenizer: placeholders outside the vocabulary, chat formats, tokenizer.json folders."""

import json

import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, pre_tokenizers

from sensorium import load_tokenizer
from sensorium.backbone.tokenizer import PLACEHOLDERS, Tokenizer, content_text
from sensorium.errors import TokenizerError


def test_placeholders_sit_past_the_vocabulary(smollm2_tokenizer):
    tok = smollm2_tokenizer
    ids = tok.placeholder_ids
    assert sorted(ids.values()) == [49152, 49153, 49154] and tok.vocab_size == 49152
    encoded = tok.encode("a <|image|> b <|video|><|speech|>")
    assert [i for i in encoded if i >= tok.vocab_size] == [49152, 49153, 49154]
    assert tok.decode(encoded) == "a  b "
    assert tok.decode(encoded, skip_special=False) == "a <|image|> b <|video|><|speech|>"


def test_message_parts_become_placeholders():
    parts = [{"type": "image"}, {"type": "text", "text": "What is this?"}, {"type": "audio"}, {"type": "video"}]
    assert content_text(parts) == "<|image|>What is this?<|speech|><|video|>"
    with pytest.raises(TokenizerError, match="unknown message part"):
        content_text([{"type": "smell"}])


def _word_tokenizer(tmp_path, specials, template):
    vocab = {w: i for i, w in enumerate(["[UNK]", "hello", "world", "Paris", *specials])}
    tok = HFTokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(specials)
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": template,
                                                                "eos_token": specials[-1]}))
    return load_tokenizer(tmp_path)


def test_llama3_format_from_folder(tmp_path):
    specials = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    tok = _word_tokenizer(tmp_path, specials, "{{ '<|start_header_id|>' }}")
    assert tok.chat_format.name == "llama3"
    text = tok.render_chat([{"role": "user", "content": "hello"}])
    assert text == ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhello<|eot_id|>"
                    "<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert tok.tok.token_to_id("<|eot_id|>") in tok.stop_ids


def test_llama2_format():
    from sensorium.backbone.tokenizer import Llama2Chat

    text = Llama2Chat().render([
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"},
    ])
    assert text == "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST] Hello! </s><s>[INST] Bye [/INST]"


def test_chatml_without_default_system():
    from sensorium.backbone.tokenizer import ChatML

    assert ChatML().render([{"role": "user", "content": "Hi"}]) == (
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )


def test_bad_tokenizer_paths(tmp_path):
    with pytest.raises(TokenizerError, match="no such file"):
        load_tokenizer(tmp_path / "missing")
    with pytest.raises(TokenizerError, match="no tokenizer.json"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="cannot read tokenizer"):
        load_tokenizer(tmp_path)


def test_placeholder_ids_follow_the_tokenizer(tmp_path):
    tok = _word_tokenizer(tmp_path, ["<|im_start|>", "<|im_end|>"], "<|im_start|>")
    assert isinstance(tok, Tokenizer) and tok.chat_format.name == "chatml"
    assert [tok.placeholder_ids[p] for p in PLACEHOLDERS] == [6, 7, 8]
    assert tok.encode("hello <|speech|> world") == [1, 8, 2]
