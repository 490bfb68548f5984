from gpt2_common.tokenizer import EOT_TOKEN, decode, encode_document, get_tokenizer


def test_gpt2_ids():
    enc = get_tokenizer()
    assert enc.n_vocab == 50257
    assert enc.encode("Hello world") == [15496, 995]
    assert enc.encode(" the") == [262]
    assert enc.encode("<|endoftext|>", allowed_special="all") == [50256]


def test_unicode_round_trip():
    text = "Ünïcödé — 日本語のテキスト, emoji 🤖🎭 and\ttabs\n\nnew lines  "
    assert decode(get_tokenizer().encode_ordinary(text)) == text


def test_document_ends_with_eot_and_special_text_stays_plain():
    tokens = encode_document("a <|endoftext|> b")
    assert tokens[-1] == EOT_TOKEN
    assert tokens.count(EOT_TOKEN) == 1
