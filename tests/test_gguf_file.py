"""The embedded model's load path without the slow parts: engine/gguf_file.py reads what the gguf
package's reader reads (every field, every tensor's bytes), and a GGUF's converted tokenizer is
cached on disk and behaves as the one converted from the file."""
import numpy as np
import pytest

from engine.errors import ModelFormatError, ModelNotFoundError
from engine.weights import load_config, resolve_model


@pytest.fixture(scope="module")
def source():
    try:
        return resolve_model("smollm2-135m")
    except ModelNotFoundError:
        pytest.skip("embedded model not installed")


def test_the_reader_reads_what_the_gguf_package_reads(source):
    from gguf import GGUFReader

    from engine.gguf_file import GGUFFile

    ours, theirs = GGUFFile(source.path), GGUFReader(str(source.path))
    keys = {k for k in theirs.fields if not k.startswith("GGUF.")}  # the package adds the header as fields
    assert set(ours.fields) == keys and len(keys) > 20
    for key in keys:
        want, got = theirs.fields[key].contents(), ours.fields[key]
        got = got.tolist() if hasattr(got, "tolist") else got
        if isinstance(want, float):
            assert got == pytest.approx(want, rel=1e-7), key
        else:
            assert got == want, key
    assert len(ours.fields["tokenizer.ggml.tokens"]) == len(theirs.fields["tokenizer.ggml.tokens"].contents()) > 40000
    assert [t.name for t in ours.tensors] == [t.name for t in theirs.tensors]
    for mine, ref in zip(ours.tensors, theirs.tensors):
        assert mine.tensor_type == ref.tensor_type and mine.shape == tuple(int(d) for d in ref.shape), mine.name
        assert mine.data.dtype == ref.data.dtype and np.array_equal(mine.data, ref.data), mine.name


@pytest.mark.parametrize("cut", [3, 40, 1000, 900_000])
def test_a_file_cut_anywhere_is_a_format_error(source, tmp_path, cut):
    """Inside the magic, the header, a key, the vocabulary: a clear error, never a crash."""
    bad = tmp_path / "cut.gguf"
    with open(source.path, "rb") as f:
        bad.write_bytes(f.read(cut))
    with pytest.raises(ModelFormatError, match="re-copy or reinstall"):
        load_config(resolve_model(str(bad)))


def test_the_tokenizer_is_converted_once_then_loaded_from_the_cache(source, tmp_path, monkeypatch):
    from engine import tokenizer as tokenizer_module
    from engine.tokenizer import Tokenizer

    monkeypatch.setenv("LSA_CACHE_DIR", str(tmp_path / "cache"))
    converted = Tokenizer(source)
    (entry,) = (tmp_path / "cache" / "tokenizers").iterdir()
    assert (entry / "tokenizer.json").is_file()
    conversions = []
    real = tokenizer_module._gguf_tokenizer

    def counted(path):
        tok = real(path)
        conversions.append(getattr(tok, "name_or_path", ""))
        return tok
    monkeypatch.setattr(tokenizer_module, "_gguf_tokenizer", counted)
    cached = Tokenizer(source)
    assert conversions == [str(entry)]  # loaded from the cache entry, not from the GGUF
    texts = ["Hello world!", "  spaces\tand\nnewlines  ", "naive cafe \u2014 \u6771\u4eac \U0001f642",
             "def f(x):\n    return x ** 2", "The lighthouse keeper's cat is called Pickles."]
    for text in texts:
        assert cached.encode(text) == converted.encode(text)
        assert cached.encode(text, add_special_tokens=False) == converted.encode(text, add_special_tokens=False)
        ids = converted.encode(text)
        assert cached.decode(ids) == converted.decode(ids) and cached.decode(ids, False) == converted.decode(ids, False)
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 2?"}]
    assert cached.chat_prompt(chat) == converted.chat_prompt(chat) and cached.has_chat_template
    assert cached.eos_token_id == converted.eos_token_id is not None
    # a damaged entry is converted again and replaced
    (entry / "tokenizer.json").write_text("{not json")
    again = Tokenizer(source)
    assert again.encode(texts[2]) == converted.encode(texts[2])
    assert (entry / "tokenizer.json").read_text().startswith("{") and Tokenizer(source).encode("ok") == converted.encode("ok")


def test_an_unwritable_cache_only_costs_time(source, tmp_path, monkeypatch):
    """LSA_CACHE_DIR under a plain file: nothing can be cached, the tokenizer still loads."""
    from engine.tokenizer import Tokenizer

    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("LSA_CACHE_DIR", str(blocker / "cache"))
    tok = Tokenizer(source)
    assert tok.encode("Hello", add_special_tokens=False) and tok.has_chat_template
