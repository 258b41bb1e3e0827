"""Long text for demos and evaluation: the shared essays when present, synthetic filler otherwise,
and needle-in-a-haystack prompts built from either."""
from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import lsa_env
from engine.errors import InvalidRequestError

_REPO = Path(__file__).resolve().parents[1]
DEFAULT_HAYSTACK = _REPO.parent / "shared" / "data" / "haystack"

_WORDS = ("the of and to in a is that for it as was with be by on not he this are or his from at which "
          "but have an they you were her she there been one all we their has would when if so no will more "
          "time people river market garden letter window morning history engine question village winter "
          "company number system water light story field paper teacher music island bridge evening").split()


@dataclass(frozen=True)
class Needle:
    needle: str  # the sentence hidden in the context
    question: str
    answer: str  # expected substring of the reply


BUILTIN_NEEDLES = (
    Needle("The secret passphrase for the archive is 'blue lantern'.",
           "What is the secret passphrase for the archive?", "blue lantern"),
    Needle("The best thing to do in San Francisco is eat a sandwich and sit in Dolores Park on a sunny day.",
           "What is the best thing to do in San Francisco?", "Dolores Park"),
    Needle("Maria's favourite fruit is the mango.", "What is Maria's favourite fruit?", "mango"),
    Needle("The lighthouse keeper's cat is named Pickles.", "What is the name of the lighthouse keeper's cat?",
           "Pickles"),
)


class HaystackNotFoundError(InvalidRequestError, FileNotFoundError):
    """A haystack directory that was asked for is missing or holds no ``.txt`` files."""


def haystack_dir() -> Path | None:
    """``LSA_HAYSTACK`` if set, else ../shared/data/haystack beside the repository, if present."""
    path = Path(lsa_env.haystack_dir()) if lsa_env.haystack_dir() else DEFAULT_HAYSTACK
    return path if path.is_dir() and any(path.glob("*.txt")) else None


def load_haystack(directory: str | Path | None = None, min_chars: int = 0, seed: int = 0) -> str:
    """The text files of ``directory`` (default: :func:`haystack_dir`) joined in name order,
    repeated up to ``min_chars``; deterministic synthetic filler if there is no directory."""
    path = Path(directory) if directory else haystack_dir()
    if path is not None and not path.is_dir():
        raise HaystackNotFoundError(f"haystack directory {path} does not exist: give a directory of .txt files, "
                                    f"or none for the default")
    if path is None:
        return synthetic_filler(max(min_chars, 20_000), seed)
    text = "\n\n".join(p.read_text(errors="replace").strip() for p in sorted(path.glob("*.txt")))
    if not text:
        raise HaystackNotFoundError(f"haystack directory {path} has no .txt files")
    while len(text) < min_chars:
        text += "\n\n" + text
    return text


def synthetic_filler(num_chars: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    sentences, size = [], 0
    while size < num_chars:
        words = [rng.choice(_WORDS) for _ in range(rng.randint(8, 18))]
        sentence = " ".join(words).capitalize() + "."
        sentences.append(sentence)
        size += len(sentence) + 1
    return " ".join(sentences)


def niah_prompt(tokenizer, haystack: str, needles: list[Needle] | tuple[Needle, ...], question: str,
                context_tokens: int, depth: float) -> list[int]:
    """Chat-formatted token ids: about ``context_tokens`` of haystack with the needles placed at
    ``depth`` (0 = start, 1 = end; several needles spread evenly from there), then the question."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    head = "Read the following document carefully and answer the question after it.\n\n<document>\n"
    tail = f"\n</document>\n\nQuestion: {question} Answer in one short sentence."
    budget = context_tokens - len(tokenizer.encode_chat([{"role": "user", "content": head + tail}]))
    budget -= sum(len(tokenizer.encode(" " + n.needle, add_special_tokens=False)) for n in needles)
    if budget < 16:
        raise ValueError(f"context_tokens={context_tokens} is too small for the question and needles")
    hay_ids = tokenizer.encode(haystack[: budget * 8], add_special_tokens=False)[:budget]
    pieces, prev = [], 0
    for i, needle in enumerate(needles):
        at = int(len(hay_ids) * min(1.0, depth + i * (1 - depth) / max(1, len(needles))))
        text = tokenizer.decode(hay_ids[prev:at])
        cut = text.rfind(". ")  # put the needle at a sentence boundary
        if cut > len(text) // 2:
            pieces.append(text[: cut + 1])
            carry = text[cut + 1:]
        else:
            pieces.append(text)
            carry = ""
        pieces.append(" " + needle.needle + " " + carry)
        prev = at
    pieces.append(tokenizer.decode(hay_ids[prev:]))
    document = "".join(pieces)
    return tokenizer.encode_chat([{"role": "user", "content": head + document + tail}])
