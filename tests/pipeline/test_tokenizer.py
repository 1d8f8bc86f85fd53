import pytest
from tokenizers import Tokenizer

from pipeline.errors import DataError
from pipeline.tokenizer import EOT_TOKEN, new_tokenizer, train_tokenizer
from tests.conftest import STDLIB


@pytest.fixture(scope="module")
def texts() -> list[str]:
    files = sorted((STDLIB / "json").glob("*.py")) + sorted((STDLIB / "html").glob("*.py"))
    return [f.read_text(encoding="utf-8") for f in files]


def test_exact_size_with_end_of_text_last(texts):
    tok = train_tokenizer(texts, vocab_size=400, required_tokens=[], progress=False)
    assert tok.get_vocab_size() == 400
    assert tok.token_to_id(EOT_TOKEN) == 399


def test_required_tokens_become_single_tokens_at_the_same_size(texts):
    required = ["]]\n", "]]]]\n", "')\n"]
    plain = train_tokenizer(texts, vocab_size=400, required_tokens=[], progress=False)
    assert len(plain.encode("]]]]\n").ids) > 1  # the corpus alone does not learn it
    tok = train_tokenizer(texts, vocab_size=400, required_tokens=required, progress=False)
    assert tok.get_vocab_size() == 400
    for text in required:
        assert len(tok.encode(text).ids) == 1, text
    # only the rarest learned merges made room: the common tokens keep their ids
    for token in ("ĠĠĠĠ", "self", "Ġ=", "):Ċ"):
        assert tok.token_to_id(token) == plain.token_to_id(token)


def test_required_tokens_do_not_change_the_regex_split(texts):
    tok = train_tokenizer(texts, vocab_size=400, required_tokens=["]]\n"], progress=False)
    sample = "x = [[1, 2]]\nprint(x[0]) # done\n\tif a:\n        return ']]'\n"
    pieces = [p for p, _ in tok.pre_tokenizer.pre_tokenize_str(sample)]
    assert pieces == [p for p, _ in new_tokenizer().pre_tokenizer.pre_tokenize_str(sample)]
    assert "".join(tok.encode(sample).tokens) == "".join(pieces)


def test_round_trip_decode(texts):
    tok = train_tokenizer(texts, vocab_size=400, required_tokens=["]]\n"], progress=False)
    sample = texts[0][:2000] + "\n# unicode: naïve café ü 你好\n"
    assert tok.decode(tok.encode(sample).ids) == sample


def test_regex_keeps_punctuation_runs_with_their_newline():
    pieces = [p for p, _ in new_tokenizer().pre_tokenizer.pre_tokenize_str('f("a")\nx = [[1]]\n')]
    assert '("' in pieces and "]]Ċ" in pieces and '")Ċ' in pieces


def test_required_token_the_regex_splits_is_refused(texts):
    with pytest.raises(DataError, match="split by the pre-tokenization regex"):
        train_tokenizer(texts, vocab_size=400, required_tokens=["a b"], progress=False)


def test_corpus_too_small_for_the_vocab_is_a_user_error():
    with pytest.raises(DataError, match="data.vocab_size"):
        train_tokenizer(["x = 1\n"], vocab_size=2048, required_tokens=[], progress=False)


def test_saved_tokenizer_loads_on_its_own(texts, tmp_path):
    tok = train_tokenizer(texts, vocab_size=400, required_tokens=["]]\n"], progress=False)
    tok.save(str(tmp_path / "tokenizer.json"))
    loaded = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    assert loaded.encode("a = [[b]]\n").ids == tok.encode("a = [[b]]\n").ids
