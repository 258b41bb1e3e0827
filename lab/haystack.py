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


# facts for the session task: one document holds five of them, one question a turn
SESSION_FACTS = BUILTIN_NEEDLES + (
    Needle("The meeting with the architects will take place in Lisbon.",
           "In which city will the meeting with the architects take place?", "Lisbon"),
    Needle("The password to the garden shed is 'copper kettle'.", "What is the password to the garden shed?",
           "copper kettle"),
    Needle("Captain Ortega's ship is called the Silver Heron.", "What is Captain Ortega's ship called?",
           "Silver Heron"),
    Needle("The museum's oldest clock was built in 1642.", "In which year was the museum's oldest clock built?",
           "1642"),
    Needle("Doctor Alvarez keeps her spare keys inside a green teapot.",
           "Where does Doctor Alvarez keep her spare keys?", "teapot"),
    Needle("The winning horse of the autumn race was named Thunderbolt.",
           "What was the name of the winning horse of the autumn race?", "Thunderbolt"),
)

# the texts ``lsa eval --texts`` knows by name (any other value is a file path)
TEXT_NAMES = ("essays", "pydoc")


def load_text(name: str, haystack_directory: str | Path | None = None, min_chars: int = 0, seed: int = 0) -> str:
    """Long text by name: ``essays`` (the haystack: the shared essays, else synthetic filler),
    ``pydoc`` (technical prose: the Python reference topics of the running interpreter's
    ``pydoc_data.topics``, joined in name order), or the contents of a file."""
    if name == "essays":
        return load_haystack(haystack_directory, min_chars=min_chars, seed=seed)
    if name == "pydoc":
        try:
            from pydoc_data.topics import topics
        except ImportError as exc:
            raise InvalidRequestError(f"this Python has no pydoc_data.topics ({exc}): give a text file instead") \
                from exc
        return "\n\n".join(topics[key].strip() for key in sorted(topics))
    path = Path(name)
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise InvalidRequestError(f"cannot read the evaluation text {name!r} (not {' or '.join(TEXT_NAMES)}, "
                                  f"nor a readable file): {exc.strerror or exc}") from exc
    if not text.strip():
        raise InvalidRequestError(f"text file {name} is empty")
    return text


def text_label(name: str) -> str:
    """How a text is named in records and tables: its name, or a file's stem."""
    return name if name in TEXT_NAMES else Path(name).stem


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


def place_needles(tokenizer, haystack: str, needles: list[Needle] | tuple[Needle, ...], budget: int,
                  depth: float) -> str:
    """About ``budget`` tokens of haystack with the needles put in at sentence boundaries, the
    first at ``depth`` (0 = start, 1 = end), the others spread evenly from there to the end."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
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
    return "".join(pieces)


def needle_tokens(tokenizer, needles) -> int:
    return sum(len(tokenizer.encode(" " + n.needle, add_special_tokens=False)) for n in needles)


def niah_prompt(tokenizer, haystack: str, needles: list[Needle] | tuple[Needle, ...], question: str,
                context_tokens: int, depth: float) -> list[int]:
    """Chat-formatted token ids: about ``context_tokens`` of haystack with the needles placed at
    ``depth`` (0 = start, 1 = end; several needles spread evenly from there), then the question."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    head = "Read the following document carefully and answer the question after it.\n\n<document>\n"
    tail = f"\n</document>\n\nQuestion: {question} Answer in one short sentence."
    budget = context_tokens - len(tokenizer.encode_chat([{"role": "user", "content": head + tail}]))
    budget -= needle_tokens(tokenizer, needles)
    if budget < 16:
        raise ValueError(f"context_tokens={context_tokens} is too small for the question and needles")
    document = place_needles(tokenizer, haystack, needles, budget, depth)
    return tokenizer.encode_chat([{"role": "user", "content": head + document + tail}])


# A session as the served API builds one (cluster/sessions_api.py; tests/test_eval_session.py checks
# they agree): the context is the chat prompt up to the end of the document, each question the
# rest of a user turn; the two together are the chat prompt of the document and the question.
SESSION_DOC_HEAD = "Read the following document carefully and answer the questions after it.\n\n<document>\n"
SESSION_DOC_TAIL = "\n</document>\n\n"
SESSION_QUESTION = "Question: {question} Answer in one short sentence."
_SPLIT = "\x00LSA-SPLIT\x00"


def session_context_ids(tokenizer, document: str) -> list[int]:
    text = tokenizer.chat_prompt([{"role": "user", "content": SESSION_DOC_HEAD + document + SESSION_DOC_TAIL + _SPLIT}])
    return tokenizer.encode(text.split(_SPLIT)[0], add_special_tokens=False)


def session_question_ids(tokenizer, question: str) -> list[int]:
    suffix = tokenizer.chat_prompt([{"role": "user", "content": _SPLIT}]).split(_SPLIT)[1]
    return tokenizer.encode(SESSION_QUESTION.format(question=question.strip()) + suffix, add_special_tokens=False)
