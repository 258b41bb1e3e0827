"""Tokenizer and chat template through transformers (from a HF directory or from the GGUF).

A GGUF's tokenizer is converted by transformers from the file's vocabulary and merges (~15 s on a
small CPU, at every model load); the converted tokenizer is kept on disk (``LSA_CACHE_DIR``,
default ``~/.cache/lsa-serve``), keyed by the file (path, size, modification time) and the
transformers version, and loaded from there in a fraction of that. Where the cache cannot be
written, every load converts."""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
from pathlib import Path

import lsa_env
from engine.errors import InvalidRequestError, ModelFormatError
from engine.weights import ModelSource

log = logging.getLogger(__name__)


def _gguf_tokenizer(path: Path):
    """The GGUF's tokenizer: from the cache where converted before, else converted and cached."""
    import transformers
    from transformers import AutoTokenizer

    path = path.resolve()
    stat = path.stat()
    key = hashlib.sha1(f"{path}|{stat.st_size}|{stat.st_mtime_ns}|{transformers.__version__}".encode()).hexdigest()
    folder = Path(lsa_env.cache_dir()) / "tokenizers" / key[:20]
    if (folder / "tokenizer_config.json").is_file():
        try:
            return AutoTokenizer.from_pretrained(str(folder))
        except Exception as exc:  # a damaged cache entry: convert again, replace it
            log.warning("cached tokenizer %s unreadable (%s): converting the GGUF's again", folder, exc)
            shutil.rmtree(folder, ignore_errors=True)
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".new-", dir=folder.parent))
        tok.save_pretrained(str(staging))
        try:
            os.rename(staging, folder)  # whole or not at all; another process may have put it there first
        except OSError:
            shutil.rmtree(staging, ignore_errors=True)
    except Exception as exc:  # the cache is an optimisation: never a reason to fail the load
        log.info("tokenizer cache %s not written (%s): the GGUF's tokenizer is converted at each load", folder, exc)
    return tok


class Tokenizer:
    def __init__(self, source: ModelSource):
        from transformers import AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        logging.getLogger("transformers").setLevel(logging.ERROR)
        try:
            if source.kind == "gguf":
                self._tok = _gguf_tokenizer(source.path)
            else:
                self._tok = AutoTokenizer.from_pretrained(str(source.path))
        except Exception as exc:  # transformers raises many kinds here
            raise ModelFormatError(f"cannot load the tokenizer of {source.path}: {exc}") from exc

    @property
    def eos_token_id(self) -> int | None:
        return self._tok.eos_token_id

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self._tok, "chat_template", None))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=add_special_tokens))

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def chat_prompt(self, messages: list[dict]) -> str:
        """Messages ``[{"role": ..., "content": ...}]`` -> prompt text ready for generation."""
        if not self.has_chat_template:
            raise InvalidRequestError("this model has no chat template; send a plain prompt instead")
        for m in messages:
            if not isinstance(m, dict) or "role" not in m or not isinstance(m.get("content"), str):
                raise InvalidRequestError("each chat message needs a 'role' and a string 'content'")
        return self._tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def encode_chat(self, messages: list[dict]) -> list[int]:
        return self.encode(self.chat_prompt(messages), add_special_tokens=False)
