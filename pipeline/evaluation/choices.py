"""Multiple-choice options: read them from a question, find the one an answer picked.

Questions list options as upper-case letters followed by text, one per line or inline (DriveBench /
DriveLM style: "... options: A. Going ahead. B. Turn left. C. Turn right."). Markers may be written
"A.", "A)", "A:" or "(A)".

Answers are free text from a model, so `extract_choice` reads the letter the way a person would and
returns None rather than guess:
- a letter after an answer cue ("Answer: D", "The answer is C.", "Final: {A. ...}") beats a letter
  that starts the answer or is bracketed ("C. The ego ...", "(B)", "option B"), which beats any
  other stand-alone letter ("... so B.");
- a letter only counts when it stands alone: followed by the end, punctuation, a dash, or a
  connective word ("A because ..."), so the article in "a car" / "A car is parked" is not option A;
- object references such as `<c1,CAM_FRONT,0.46,0.67>` are removed before reading, so the `c` of
  `<c1,` is never option C;
- two different letters at the strongest level found ("A or B", "Answer: A and C") is ambiguous;
- with no letter, an answer whose text equals exactly one option's text picks that option.
"""

from __future__ import annotations

import re

DEFAULT_LETTERS = "ABCDEF"
"""Letters `extract_choice` accepts when it is not given the question's options."""

_OPTION_MARKER = re.compile(r"(?:^|(?<=[\s:]))(?:\((?P<paren>[A-Z])\)|(?P<plain>[A-Z])[.):])(?=\s)", re.M)
_OBJECT_REF = re.compile(r"<[^<>\n]*,[^<>\n]*>")
_EMPHASIS = re.compile(r"[*_`]+")
_CONNECTIVES = r"because|since|as|is|was|which|would|should|or|and|seems|appears"
_LETTER = re.compile(
    r"(?<![\w<.])(?<!\w')"  # not inside a word, an object ref, an abbreviation ("e.g.") or "it's"
    r"(?P<open>[(\[{]\s*)?(?P<letter>[A-Za-z])(?P<close>\s*[)\]}])?"
    r"(?=[ \t]*(?:$|\n)|\.(?![A-Za-z])|[)\]},:;!?\"'/]|\s*[-\u2013\u2014]\s|\s+(?:" + _CONNECTIVES + r")\b)"
)
_ANSWER_CUE = re.compile(
    r"(?:\b(?:final\s+|correct\s+|best\s+)?answer(?:\s+(?:is|would\s+be|should\s+be))?"
    r"|\bfinal|\bcorrect\s+(?:option|choice)(?:\s+is)?"
    r"|\bi\s+(?:would\s+|will\s+)?(?:choose|select|pick|go\s+with))"
    r"\s*[:=\-]?\s*(?:(?:option|choice)\s*)?$",
    re.I,
)
_OPTION_CUE = re.compile(r"\b(?:option|choice)\s*$", re.I)
_CHAIN = re.compile(r"^\s*(?:,|/|\bor\b|\band\b)\s*$", re.I)
_LEADING_CUE = re.compile(r"^\s*(?:(?:the\s+)?(?:final\s+|correct\s+)?answer|final)\s*(?:is)?\s*[:=\-]?\s*", re.I)

_TIER_OTHER, _TIER_LEADING, _TIER_CUE = 1, 2, 3


def parse_options(question: str) -> dict[str, str]:
    """Options of a multiple-choice question, letter -> option text, in letter order.

    The options are the longest run of markers A, B, C, ... in order (a stray "Plan A. " in the
    question text does not start a competing run unless it is longer). Each option's text runs to
    the next option marker or the end of its line. Returns {} when there is no run of two or more.
    """
    best: list[re.Match[str]] = []
    run: list[re.Match[str]] = []
    for marker in _OPTION_MARKER.finditer(question):
        letter = marker.group("paren") or marker.group("plain")
        if letter == "A":
            if len(run) >= len(best):
                best = run
            run = [marker]
        elif run and ord(letter) == ord(_marker_letter(run[-1])) + 1:
            run.append(marker)
    if len(run) >= len(best):
        best = run
    if len(best) < 2:
        return {}
    options = {}
    for index, marker in enumerate(best):
        stop = best[index + 1].start() if index + 1 < len(best) else len(question)
        options[_marker_letter(marker)] = question[marker.end() : stop].split("\n", 1)[0].strip()
    return options


def _marker_letter(marker: re.Match[str]) -> str:
    return marker.group("paren") or marker.group("plain")


def is_multiple_choice(question: str) -> bool:
    """True when the question lists at least two lettered options (see `parse_options`)."""
    return len(parse_options(question)) >= 2


def extract_choice(answer: str, options: dict[str, str] | None = None) -> str | None:
    """The option letter (upper case) an answer picked, or None if none or several are found.

    `options` (from `parse_options`) limits the letters to the question's own and enables matching
    an answer that repeats an option's text without its letter; without it, letters in
    `DEFAULT_LETTERS` count and text matching is off.
    """
    letters = set(options) if options else set(DEFAULT_LETTERS)
    text = _EMPHASIS.sub("", _OBJECT_REF.sub(" ", answer)).strip()
    if not text:
        return None
    mentions = _letter_mentions(text, letters)
    if mentions:
        top = max(tier for tier, _ in mentions)
        picked = {letter for tier, letter in mentions if tier == top}
        return picked.pop() if len(picked) == 1 else None
    return _match_option_text(text, options) if options else None


def _letter_mentions(text: str, letters: set[str]) -> list[tuple[int, str]]:
    """(tier, letter) for every stand-alone option letter in `text`; see the module docstring.

    A letter joined to the previous one by "or", "and", "," or "/" takes that one's tier, so
    "Answer: A or B" is two answers at the cue tier (ambiguous), not A beating a bare B.
    """
    mentions: list[tuple[int, str]] = []
    previous_end, previous_tier = -1, 0
    for match in _LETTER.finditer(text):
        letter = match.group("letter").upper()
        if letter not in letters:
            continue
        before = text[max(0, match.start() - 60) : match.start()]
        if _ANSWER_CUE.search(before):
            tier = _TIER_CUE
        elif match.start() == 0 or (match.group("open") and match.group("close")) or _OPTION_CUE.search(before):
            tier = _TIER_LEADING
        else:
            tier = _TIER_OTHER
        if previous_end >= 0 and _CHAIN.match(text[previous_end : match.start()]):
            tier = max(tier, previous_tier)
        mentions.append((tier, letter))
        previous_end, previous_tier = match.end(), tier
    return mentions


def _match_option_text(text: str, options: dict[str, str]) -> str | None:
    """The letter whose option text equals the answer (case, punctuation and a leading cue ignored)."""
    wanted = _normalise(_LEADING_CUE.sub("", text))
    if not wanted:
        return None
    matches = [letter for letter, option in options.items() if _normalise(option) == wanted]
    return matches[0] if len(matches) == 1 else None


def _normalise(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", " ", text.lower()).strip()
