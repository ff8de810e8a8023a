"""Closed answer vocabularies as data: one versioned JSON per dataset in ``vocabularies/``.

A vocabulary file holds::

    {"name": "endovis18-vqa", "version": "1.0", "answers": [...], "aliases": {"spelling": "answer"},
     "unknown_policy": "error" | "unknown" | "skip", "source": "where the list comes from", "notes": "..."}

``answers`` keep the published order, so answer indices match the published loaders. Every answer and alias is
normalised (``normalize_answer``): Unicode NFC, lower case, ``_``/``-`` -> space, whitespace collapsed, so
``Tissue_Manipulation``, ``tissue manipulation`` and ``Tissue Manipulation`` are one answer. Aliases map further
spellings (``CalotTriangleDissection``) onto an answer.

Answers outside the vocabulary follow ``unknown_policy``: ``"error"`` raises ``UnknownAnswerError`` naming the answer,
``"unknown"`` maps it to the reserved ``<unk>`` index (``len(answers)``, the last one), ``"skip"`` makes loaders drop
the sample (counted in their ``LoadReport``).
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any, Literal

UnknownPolicy = Literal["error", "unknown", "skip"]
POLICIES: tuple[str, ...] = ("error", "unknown", "skip")
UNK = "<unk>"
_SPACE = re.compile(r"\s+")


class UnknownAnswerError(ValueError):
    """An answer outside a closed vocabulary (policy ``"error"``)."""


def normalize_answer(text: str) -> str:
    """Canonical spelling of an answer: NFC, lower case, ``_``/``-`` -> space, whitespace collapsed.

    >>> normalize_answer(" Tissue_Manipulation ")
    'tissue manipulation'
    """
    if not isinstance(text, str):
        raise TypeError(f"an answer must be a string, got {type(text).__name__}: {text!r}")
    s = unicodedata.normalize("NFC", text).strip().lower().replace("_", " ").replace("-", " ")
    return _SPACE.sub(" ", s).strip()


@dataclass(frozen=True)
class AnswerVocab:
    """A closed answer set with normalisation, aliases and an unknown-answer policy.

    Attributes:
        name: vocabulary name ("endovis18-vqa").
        answers: canonical (normalised) answers; index i is the class id.
        aliases: normalised spelling -> canonical answer.
        unknown_policy: "error", "unknown" or "skip".
        version: version string of the answer list.
        source: where the list comes from.
        notes: anything a user should know (unconfirmed parts, spelling variants).
    """

    name: str
    answers: tuple[str, ...]
    aliases: Mapping[str, str] = field(default_factory=dict)
    unknown_policy: UnknownPolicy = "error"
    version: str = "1.0"
    source: str = ""
    notes: str = ""

    def __post_init__(self) -> None:
        if self.unknown_policy not in POLICIES:
            raise ValueError(f"vocabulary {self.name!r}: unknown_policy must be one of {POLICIES}, "
                             f"got {self.unknown_policy!r}")
        canon: list[str] = []
        seen: dict[str, str] = {}
        for raw in self.answers:
            a = normalize_answer(raw)
            if not a:
                raise ValueError(f"vocabulary {self.name!r}: empty answer {raw!r}")
            if a == UNK:
                raise ValueError(f"vocabulary {self.name!r}: {UNK!r} is reserved for unknown answers")
            if a in seen:
                raise ValueError(f"vocabulary {self.name!r}: answers {seen[a]!r} and {raw!r} normalise to the same "
                                 f"answer {a!r}")
            seen[a] = raw
            canon.append(a)
        aliases: dict[str, str] = {}
        for k, v in dict(self.aliases).items():
            target = normalize_answer(v)
            if target not in seen:
                raise ValueError(f"vocabulary {self.name!r}: alias {k!r} points to {v!r}, which is not an answer")
            aliases[normalize_answer(k)] = target
        object.__setattr__(self, "answers", tuple(canon))
        object.__setattr__(self, "aliases", aliases)
        object.__setattr__(self, "_index", {a: i for i, a in enumerate(canon)})

    # ---- lookup -------------------------------------------------------------------------------------------------
    def normalize(self, answer: str) -> str:
        """Canonical spelling of ``answer`` (text normalisation, then aliases). Does not check membership."""
        a = normalize_answer(answer)
        return self.aliases.get(a, a)

    def __contains__(self, answer: object) -> bool:
        return isinstance(answer, str) and self.normalize(answer) in self._index  # type: ignore[attr-defined]

    @property
    def unk_index(self) -> int | None:
        """The reserved ``<unk>`` index (``len(answers)``) under policy "unknown", else None."""
        return len(self.answers) if self.unknown_policy == "unknown" else None

    def resolve(self, answer: str) -> int | None:
        """Index of ``answer``; for an unknown answer: ``<unk>`` ("unknown"), None ("skip"), or raise ("error")."""
        i = self._index.get(self.normalize(answer))  # type: ignore[attr-defined]
        if i is not None:
            return i
        if self.unknown_policy == "unknown":
            return len(self.answers)
        if self.unknown_policy == "skip":
            return None
        raise UnknownAnswerError(self._unknown_message(answer))

    def index(self, answer: str) -> int:
        """Index of ``answer`` (``<unk>`` index for unknown answers under policy "unknown").

        Raises:
            UnknownAnswerError: ``answer`` is not in the vocabulary and the policy is "error" or "skip".
        """
        i = self.resolve(answer)
        if i is None:
            raise UnknownAnswerError(self._unknown_message(answer) + " (policy 'skip': loaders drop such samples)")
        return i

    def _unknown_message(self, answer: str) -> str:
        close = [a for a in self.answers if a.startswith(self.normalize(answer)[:3])][:5]
        hint = f" Similar answers: {close}." if close else ""
        return (f"answer {answer!r} (normalised {self.normalize(answer)!r}) is not in vocabulary {self.name!r} "
                f"v{self.version} ({len(self.answers)} answers).{hint} Use unknown_policy='unknown' or 'skip', add an "
                "alias, or build a vocabulary from your data with AnswerVocab.from_answers.")

    def answer(self, i: int) -> str:
        """Canonical answer for index ``i`` (``"<unk>"`` for the reserved index)."""
        if 0 <= i < len(self.answers):
            return self.answers[i]
        if i == self.unk_index:
            return UNK
        raise IndexError(f"answer index {i} out of range for vocabulary {self.name!r} ({len(self)} entries)")

    def __len__(self) -> int:
        """Number of classes a model predicts: the answers, plus ``<unk>`` under policy "unknown"."""
        return len(self.answers) + (1 if self.unknown_policy == "unknown" else 0)

    def __iter__(self) -> Iterator[str]:
        return iter(self.answers)

    # ---- variants -----------------------------------------------------------------------------------------------
    def with_policy(self, unknown_policy: UnknownPolicy) -> AnswerVocab:
        """The same vocabulary with another unknown-answer policy."""
        return replace(self, unknown_policy=unknown_policy)

    def with_answers(self, extra: Iterable[str], name: str | None = None) -> AnswerVocab:
        """This vocabulary plus ``extra`` answers (appended, duplicates and aliases ignored), same policy."""
        answers = list(self.answers)
        for a in extra:
            if a not in self:
                n = normalize_answer(a)
                if n not in answers:
                    answers.append(n)
        return replace(self, name=name or self.name, answers=tuple(answers))

    # ---- building and files -------------------------------------------------------------------------------------
    @classmethod
    def from_answers(cls, answers: Iterable[str], name: str = "custom", min_count: int = 1,
                     unknown_policy: UnknownPolicy = "unknown", version: str = "1.0") -> AnswerVocab:
        """Build a vocabulary from training answers: normalised, most frequent first (ties alphabetical),
        answers seen fewer than ``min_count`` times left out (they become unknown answers)."""
        counts = Counter(normalize_answer(a) for a in answers)
        kept = sorted((a for a, n in counts.items() if n >= min_count and a != UNK), key=lambda a: (-counts[a], a))
        if not kept:
            raise ValueError(f"from_answers({name!r}): no answer seen at least {min_count} times")
        return cls(name=name, answers=tuple(kept), unknown_policy=unknown_policy, version=version,
                   source=f"built from {sum(counts.values())} answers with AnswerVocab.from_answers")

    @classmethod
    def from_json(cls, data: str | Path | Mapping[str, Any]) -> AnswerVocab:
        """From a JSON file path, a JSON string, or an already-parsed dict.

        Raises:
            ValueError: unreadable JSON, missing ``name``/``answers``, or unknown keys (naming the file).
        """
        where = "<dict>"
        if isinstance(data, Mapping):
            d = dict(data)
        else:
            text, where = str(data), "<string>"
            if not text.lstrip().startswith("{"):
                p = Path(text)
                if not p.is_file():
                    raise ValueError(f"vocabulary file not found: {p}")
                text, where = p.read_text(encoding="utf-8"), str(p)
            try:
                d = json.loads(text)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not valid JSON ({e})") from e
        if not isinstance(d, dict):
            raise ValueError(f"{where}: a vocabulary is a JSON object, got {type(d).__name__}")  # noqa: TRY004
        missing = [k for k in ("name", "answers") if k not in d]
        if missing:
            raise ValueError(f"{where}: vocabulary is missing {missing}")
        known = {"name", "version", "answers", "aliases", "unknown_policy", "source", "notes"}
        extra = sorted(set(d) - known)
        if extra:
            raise ValueError(f"{where}: unknown vocabulary keys {extra}; allowed: {sorted(known)}")
        if not isinstance(d["answers"], list) or not all(isinstance(a, str) for a in d["answers"]):
            raise ValueError(f"{where}: 'answers' must be a list of strings")
        try:
            return cls(name=str(d["name"]), answers=tuple(d["answers"]), aliases=dict(d.get("aliases") or {}),
                       unknown_policy=d.get("unknown_policy", "error"), version=str(d.get("version", "1.0")),
                       source=str(d.get("source", "")), notes=str(d.get("notes", "")))
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from e

    def to_json(self, path: str | Path | None = None) -> str:
        """The vocabulary as a JSON string (normalised answers); written to ``path`` when given."""
        d = {"name": self.name, "version": self.version, "answers": list(self.answers),
             "aliases": dict(self.aliases), "unknown_policy": self.unknown_policy, "source": self.source,
             "notes": self.notes}
        text = json.dumps(d, indent=2, ensure_ascii=False) + "\n"
        if path is not None:
            Path(path).write_text(text, encoding="utf-8")
        return text

    @classmethod
    def load(cls, name: str) -> AnswerVocab:
        """A packaged vocabulary by name (see ``list_vocabularies()``).

        Raises:
            KeyError: unknown name, listing the available ones.
        """
        available = list_vocabularies()
        if name not in available:
            import difflib

            close = difflib.get_close_matches(name, available, n=3)
            raise KeyError(f"Unknown answer vocabulary {name!r}. Available: {available}"
                           + (f". Did you mean {close}?" if close else ""))
        text = resources.files(__package__).joinpath("vocabularies").joinpath(f"{name}.json").read_text(encoding="utf-8")
        return cls.from_json(text)


def list_vocabularies() -> list[str]:
    """Names of the packaged vocabularies (``vocabularies/<name>.json``)."""
    folder = resources.files(__package__).joinpath("vocabularies")
    return sorted(p.name[: -len(".json")] for p in folder.iterdir() if p.name.endswith(".json"))


__all__ = [
    "POLICIES",
    "UNK",
    "AnswerVocab",
    "UnknownAnswerError",
    "UnknownPolicy",
    "list_vocabularies",
    "normalize_answer",
]
