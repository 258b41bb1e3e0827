"""Tokenizer and chat template through transformers (from a HF directory or from the GGUF)."""
from __future__ import annotations

import logging

from engine.errors import InvalidRequestError, ModelFormatError
from engine.weights import ModelSource


class Tokenizer:
    def __init__(self, source: ModelSource):
        from transformers import AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        logging.getLogger("transformers").setLevel(logging.ERROR)
        try:
            if source.kind == "gguf":
                self._tok = AutoTokenizer.from_pretrained(str(source.path.parent), gguf_file=source.path.name)
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
