"""Scores of one answer against the expected one: exact, format match, chrF, stop, check.

The format match asks "does the answer have the expected answer's shape, whatever the
content words?". The rule, in three parts:

* **Literals.** If the expected answer is a JSON or Python container (a list, tuple, set or
  dict), the answer must parse to one of the same kind with the same number of items, the
  same item types and the same dict keys: `['Oak', 'Birch', 'Pine']` matches
  `["Ash", "Elm", "Yew"]` and not `['Oak', 'Birch']`.
* **Skeleton.** Otherwise both texts become a skeleton: punctuation and numbers are kept as
  they are, whitespace and case are ignored, and each run of words becomes one slot. The
  skeletons must be equal, slot by slot, where two slots agree when their word counts are
  close (within 2 words, or within half of the longer one): "Ginger" and "sea salt" fill the
  same slot; "Mars" and "Mars is the fourth planet" do not.
* **Fixed words.** Words that (nearly) every answer of a family repeats are part of the shape,
  not content: "Hocus", "Esotericus", "Alohomora" in the spells. They are learned from the
  data's examples: answers with the same skeleton form a family, and a word found in at least
  75% of a family of three or more is fixed, unless it was taken from the instruction (in
  "Make a command from 'to water the plants'", "the" is content copied from the instruction).
  Fixed words must appear in the answer where the expected answer has them, and nowhere else.
* **Prose.** An expected answer of 15 words or more without fixed words is free prose: its
  commas and number of sentences are content. The answer matches if it is prose too, half
  to twice as long, one paragraph or several like the expected one, ending with a sentence
  mark if the expected one does.
"""

from __future__ import annotations

import ast
import json
import re
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass
from typing import Any, Iterable

from instructlm.data.formats import Check, Example

# A run of letters, a run of digits, or one other visible character.
_TOKEN = re.compile(r"[^\W\d_]+|\d+|[^\w\s]|_")
_FAMILY_MIN = 3         # a family needs this many distinct answers to have fixed words
_FIXED_SHARE = 0.75     # ... and a fixed word must be in this share of them
_PROSE_WORDS = 15       # an expected answer this long, without fixed words, is free prose
_NOT_A_LITERAL = object()


@dataclass(frozen=True)
class Slot:
    """A run of content words in a skeleton."""

    words: int

    def fits(self, other: "Slot") -> bool:
        gap = abs(self.words - other.words)
        return gap <= max(2, max(self.words, other.words) // 2)


Skeleton = tuple[Any, ...]  # str literals (punctuation, numbers, fixed words) and Slots


def skeleton(text: str, fixed: frozenset[str] = frozenset()) -> Skeleton:
    """The shape of `text`: punctuation, numbers and fixed words as they are; word runs as slots."""
    out: list[Any] = []
    for token in _TOKEN.findall(text.lower()):
        if token.isdigit():
            out.append("0")  # any number fills a number's place
        elif not token[0].isalpha() or token in fixed:
            out.append(token)
        elif out and isinstance(out[-1], Slot):
            out[-1] = Slot(out[-1].words + 1)
        else:
            out.append(Slot(1))
    return tuple(out)


def _family(text: str) -> tuple[str, ...]:
    """Skeleton without slot sizes: the key that puts answers of one family together."""
    return tuple("…" if isinstance(x, Slot) else x for x in skeleton(text))


def _fits(expected: Skeleton, answer: Skeleton) -> bool:
    if len(expected) != len(answer):
        return False
    for e, a in zip(expected, answer):
        if isinstance(e, Slot) and isinstance(a, Slot):
            if not e.fits(a):
                return False
        elif e != a:
            return False
    return True


def _word_count(shape: Skeleton) -> int:
    return sum(x.words if isinstance(x, Slot) else x[0].isalpha() for x in shape)


def _lines(text: str) -> int:
    return sum(1 for line in text.strip().splitlines() if line.strip())


def _prose_fits(expected: str, answer: str, shape: Skeleton, got: Skeleton) -> bool:
    """Free prose has the same form when it is prose too: not a literal, about as long (half
    to twice the words), one paragraph or several like the expected one, and ending the same
    way (a sentence mark or none). Its commas and sentence count are its content."""
    if isinstance(parse_literal(answer), (list, tuple, set, frozenset, dict)) or not got:
        return False
    words, got_words = _word_count(shape), _word_count(got)
    ends = [isinstance(x[-1], str) and x[-1] in ".!?" for x in (shape, got)]
    return (words / 2 <= got_words <= words * 2 and ends[0] == ends[1]
            and (_lines(expected) > 1) == (_lines(answer) > 1))


def parse_literal(text: str) -> Any:
    """The value of a JSON or Python literal, or _NOT_A_LITERAL."""
    text = text.strip()
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        pass
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return _NOT_A_LITERAL


def _literal_shape(value: Any) -> Any:
    if isinstance(value, (list, tuple, set, frozenset)):
        return (type(value).__name__, tuple(_literal_shape(v) for v in value))
    if isinstance(value, dict):
        return ("dict", tuple(sorted((str(k), _literal_shape(v)) for k, v in value.items())))
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return "number"
    return type(value).__name__  # str, bool, NoneType


def _words(text: str) -> set[str]:
    return {t for t in _TOKEN.findall(text.lower()) if t[0].isalpha()}


class FormatJudge:
    """Decides whether answers have their expected answer's shape.

    `references` are all the examples the data knows (training and evaluation): the families
    and their fixed words are learned from them.
    """

    def __init__(self, references: Iterable[Example] = ()) -> None:
        families: dict[tuple[str, ...], dict[str, set[str]]] = defaultdict(dict)
        for ex in references:
            own = _words(ex.response) - _words(f"{ex.instruction} {ex.input}")
            families[_family(ex.response)].setdefault(ex.response, own)
        self._fixed: dict[tuple[str, ...], frozenset[str]] = {}
        for key, members in families.items():
            if len(members) >= _FAMILY_MIN:
                counts = Counter(word for words in members.values() for word in words)
                self._fixed[key] = frozenset(
                    w for w, c in counts.items() if c >= _FIXED_SHARE * len(members))

    def fixed_words(self, expected: str, instruction: str = "") -> frozenset[str]:
        return self._fixed.get(_family(expected), frozenset()) - _words(instruction)

    def match(self, expected: str, answer: str, instruction: str = "") -> bool:
        """Whether `answer` has the shape of `expected` (the answer to `instruction`)."""
        wanted = parse_literal(expected)
        if isinstance(wanted, (list, tuple, set, frozenset, dict)):
            got = parse_literal(answer)
            return got is not _NOT_A_LITERAL and _literal_shape(got) == _literal_shape(wanted)
        fixed = self.fixed_words(expected, instruction)
        shape, got_shape = skeleton(expected, fixed), skeleton(answer, fixed)
        if not fixed and _word_count(shape) >= _PROSE_WORDS:
            return _prose_fits(expected, answer, shape, got_shape)
        return _fits(shape, got_shape)


def passes_check(check: Check, answer: str) -> bool:
    if check.kind == "regex":
        return re.fullmatch(str(check.value), answer.strip(), re.DOTALL) is not None
    value = parse_literal(answer)
    return isinstance(value, list) and len(value) == check.value


_chrf: Any = None


def chrf(answer: str, expected: str) -> float:
    """Character n-gram F-score (sacrebleu's chrF, 0-100): how close the characters are."""
    global _chrf
    if _chrf is None:
        from sacrebleu.metrics import CHRF

        _chrf = CHRF()
    return round(_chrf.sentence_score(answer, [expected]).score, 2)


@dataclass(frozen=True)
class Score:
    exact: bool
    format: bool
    stopped: bool
    chrf: float
    check: bool | None  # None: the example has no check
    # A taught answer repeated word for word where another was expected: in the taught
    # format, but nothing learned beyond the examples. None: nothing was taught (a base model).
    copied: bool | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def taught_answers(examples: Iterable[Example]) -> frozenset[str]:
    """The answers a model was taught, as `score_answer` compares them."""
    return frozenset(ex.response.strip() for ex in examples)


def score_answer(judge: FormatJudge, example: Example, answer: str,
                 finish_reason: str, taught: frozenset[str] | None = None) -> Score:
    """`answer`'s scores against `example`; `taught`: the answers the model was trained on
    (taught_answers), to tell a copied one."""
    expected = example.response
    exact = answer.strip() == expected.strip()
    return Score(exact=exact,
                 format=judge.match(expected, answer, f"{example.instruction} {example.input}"),
                 stopped=finish_reason == "stop",
                 chrf=chrf(answer, expected),
                 check=passes_check(example.check, answer) if example.check else None,
                 copied=None if taught is None else not exact and answer.strip() in taught)


def summarize(scores: list[Score]) -> dict[str, Any]:
    """Shares of exact, format, stopped and copied answers, mean chrF, share of checks passed."""
    n = len(scores)
    checked = [s.check for s in scores if s.check is not None]

    def share(values: list[bool]) -> float | None:
        return round(sum(values) / len(values), 4) if values else None

    return {"n": n,
            "format": share([s.format for s in scores]),
            "exact": share([s.exact for s in scores]),
            "stopped": share([s.stopped for s in scores]),
            "copied": share([s.copied for s in scores if s.copied is not None]),
            "chrf": round(sum(s.chrf for s in scores) / n, 2) if n else None,
            "check": share(checked), "n_checked": len(checked)}


def fraction(summary: dict[str, Any], key: str, of: str = "n") -> str:
    """A share of a summary as a count, '5/6'; empty where there is nothing to count."""
    n = summary[of]
    return "" if summary.get(key) is None or not n else f"{round(summary[key] * n)}/{n}"


def describe_summary(summary: dict[str, Any]) -> str:
    """One line for people: 'format 5/6, exact 1/6, stopped 6/6, chrF 71.2', with 'copied
    2/6' before chrF where taught answers came back for new instructions."""
    if not summary["n"]:
        return "no examples"
    parts = [f"format {fraction(summary, 'format')}", f"exact {fraction(summary, 'exact')}",
             f"stopped {fraction(summary, 'stopped')}", f"chrF {summary['chrf']:.1f}"]
    if summary.get("copied"):  # said only when it happened
        parts.insert(3, f"copied {fraction(summary, 'copied')}")
    if summary.get("n_checked"):
        parts.append(f"checks {fraction(summary, 'check', 'n_checked')}")
    return ", ".join(parts)
