"""Cleaning and quality filters as datatrove pipeline steps, all offline.

Every document carries ``metadata["profile"]``: "prose", "code" or "generated". Filters
apply to the profiles they are meant for (a Gopher stop-word rule on Python source would
drop all of it; generated math is clean by construction) through :class:`ProfileGate`.

Choices:
- datatrove's Gopher quality and repetition filters are used as they are, but given
  :class:`RegexWordTokenizer` instead of NLTK's punkt (which needs a download): words are
  runs of letters/digits, punctuation runs are separate tokens. That is the offline
  equivalent the issue asks for; it is close to punkt for these rules, which only count
  words, stop words, symbols and n-gram repeats.
- Language id: datatrove's LanguageFilter needs a fastText model download. The offline
  :class:`ScriptLanguageFilter` labels the dominant script and, for Latin script, the best
  of a few stop-word profiles; with ``languages`` empty it only labels (keeps everything).
- Code: the usual StarCoder/The-Stack heuristics for generated and minified files: longest
  line, mean line length, alphanumeric fraction, "auto-generated"/"do not edit" headers.
- Each drop has a reason; datatrove counts ``dropped_<reason>`` per step and the manifest
  reports them.
"""

from __future__ import annotations

import re
import unicodedata

import regex
from datatrove.data import Document
from datatrove.pipeline.filters.base_filter import BaseFilter
from datatrove.pipeline.filters.gopher_quality_filter import GopherQualityFilter
from datatrove.pipeline.filters.gopher_repetition_filter import GopherRepetitionFilter
from datatrove.pipeline.formatters.base import BaseFormatter
from datatrove.utils.text import TERMINAL_PUNCTUATION
from datatrove.utils.word_tokenizers import WordTokenizer

from moeforge.data.tokenizer import SPECIAL_TOKENS

PROFILES = ("prose", "code", "generated")


class RegexWordTokenizer(WordTokenizer):
    """Offline stand-in for NLTK punkt: words and punctuation runs by Unicode regex."""

    _word = regex.compile(r"[\p{L}\p{N}_]+(?:['’][\p{L}]+)*|[^\p{L}\p{N}_\s]+")
    _sent = regex.compile(rf"[^{re.escape(''.join(TERMINAL_PUNCTUATION))}\n]+[{re.escape(''.join(TERMINAL_PUNCTUATION))}\n]*")

    def __init__(self) -> None:
        super().__init__("en")

    def word_tokenize(self, text: str) -> list[str]:
        return self._word.findall(text)

    def sent_tokenize(self, text: str) -> list[str]:
        return [s.strip() for s in self._sent.findall(text) if s.strip()]

    def span_tokenize(self, text: str) -> list[tuple[int, int]]:
        return [m.span() for m in self._sent.finditer(text) if m.group().strip()]

    def __hash__(self) -> int:  # datatrove lru-caches by tokenizer: all instances are equivalent
        return hash(RegexWordTokenizer)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RegexWordTokenizer)


WORD_TOKENIZER = RegexWordTokenizer()

_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_SPECIALS = re.compile("|".join(re.escape(t) for t in SPECIAL_TOKENS))


class Normalize(BaseFormatter):
    """NFC, Unix newlines, no control characters, no trailing blanks; strip our special-token
    strings from untrusted text so a document can never inject <|eos|> or a chat role."""

    name = "🔤 Normalize"

    def format(self, text: str) -> str:
        text = unicodedata.normalize("NFC", text.replace("\r\n", "\n").replace("\r", "\n"))
        text = _CONTROL.sub("", text)
        return "\n".join(line.rstrip() for line in text.strip("\n").split("\n"))

    def run(self, data, rank: int = 0, world_size: int = 1):
        for doc in data:
            self.stat_update("total")
            if doc.metadata.get("profile") != "generated":  # generated dialogue uses the role tokens on purpose
                doc.text = _SPECIALS.sub("", self.format(doc.text))
            yield doc


class ProfileGate(BaseFilter):
    """Apply ``inner`` only to documents whose profile is in ``profiles``; pass the rest."""

    def __init__(self, inner: BaseFilter, profiles: tuple[str, ...]):
        self.name = f"{inner.name} [{'/'.join(profiles)}]"  # before super(): the stats take the name
        super().__init__()
        self.inner, self.profiles = inner, tuple(profiles)

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        if doc.metadata.get("profile", "prose") not in self.profiles:
            return True
        return self.inner.filter(doc)


class LengthFilter(BaseFilter):
    name = "📏 Length"

    def __init__(self, min_chars: int, max_chars: int):
        super().__init__()
        self.min_chars, self.max_chars = min_chars, max_chars

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        n = len(doc.text)
        if n < self.min_chars:
            return False, "too_short"
        if n > self.max_chars:
            return False, "too_long"
        return True


GENERATED_MARKERS = re.compile(r"auto-?generated|autogenerated|do not edit|generated by|@generated", re.IGNORECASE)


class CodeFilter(BaseFilter):
    """Generated/minified source heuristics (thresholds after The Stack / StarCoder)."""

    name = "🧑‍💻 Code quality"

    def __init__(self, max_line_len: int = 1000, max_avg_line_len: float = 100.0, min_alnum: float = 0.25):
        super().__init__()
        self.max_line_len, self.max_avg_line_len, self.min_alnum = max_line_len, max_avg_line_len, min_alnum

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        text = doc.text
        lines = text.split("\n")
        if max(len(s) for s in lines) > self.max_line_len:
            return False, "code_long_line"
        if len(text) / len(lines) > self.max_avg_line_len:
            return False, "code_avg_line_len"
        if sum(c.isalnum() for c in text) / max(1, len(text)) < self.min_alnum:
            return False, "code_alnum"
        if GENERATED_MARKERS.search("\n".join(lines[:5])):
            return False, "code_generated"
        return True


# ----------------------------------------------------------------------------- language id
STOPWORDS = {
    "en": "the of and to in is that it for was on are with as be this by not or from at",
    "fr": "le la les de des et est un une que qui dans pour pas sur au avec ce il",
    "de": "der die das und ist nicht ein eine zu den von mit sich des auf für im dem",
    "es": "el la los las de que y en un una es por con para no se del al lo",
    "it": "il la di che e un una per non sono del della con si le gli da in",
    "pt": "o a os as de que e um uma para com não do da em no na se por",
    "nl": "de het een en van is dat op te in niet zijn met voor die er",
}
_STOP = {k: set(v.split()) for k, v in STOPWORDS.items()}
_SCRIPTS = [("cyrillic", r"\p{Cyrillic}"), ("greek", r"\p{Greek}"), ("arabic", r"\p{Arabic}"),
            ("hebrew", r"\p{Hebrew}"), ("cjk", r"[\p{Han}\p{Hiragana}\p{Katakana}\p{Hangul}]"),
            ("devanagari", r"\p{Devanagari}"), ("latin", r"\p{Latin}")]
_SCRIPT_RE = [(n, regex.compile(p)) for n, p in _SCRIPTS]


def detect_language(text: str, sample: int = 4000) -> tuple[str, float]:
    """(label, score): a script name, or a language code for Latin text with enough stop words."""
    head = text[:sample]
    counts = [(len(r.findall(head)), n) for n, r in _SCRIPT_RE]
    n, script = max(counts)
    if n == 0:
        return "unknown", 0.0
    if script != "latin":
        return script, n / max(1, len(head))
    words = [w.lower() for w in WORD_TOKENIZER.word_tokenize(head)]
    if not words:
        return "unknown", 0.0
    scores = {lang: sum(w in stop for w in words) / len(words) for lang, stop in _STOP.items()}
    lang = max(scores, key=scores.get)
    return (lang, scores[lang]) if scores[lang] >= 0.05 else ("latin", scores[lang])


class ScriptLanguageFilter(BaseFilter):
    """Label ``metadata['language']``; drop documents not in ``languages`` (empty: keep all)."""

    name = "🌍 Language (offline)"

    def __init__(self, languages: tuple[str, ...] = ()):
        super().__init__()
        self.languages = tuple(languages)

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        lang, score = detect_language(doc.text)
        doc.metadata["language"], doc.metadata["language_score"] = lang, round(score, 3)
        if self.languages and lang not in self.languages:
            return False, "language"
        return True


def build_filters(dcfg) -> list:
    """The cleaning steps for a DataConfig, in order (cheap rules first)."""
    prose = ("prose",)
    return [
        Normalize(),
        ProfileGate(LengthFilter(dcfg.min_chars, dcfg.max_chars), ("prose", "code")),
        ProfileGate(ScriptLanguageFilter(tuple(dcfg.languages)), prose),
        ProfileGate(CodeFilter(dcfg.max_code_line_len, dcfg.max_code_avg_line_len, dcfg.min_code_alnum), ("code",)),
        ProfileGate(GopherRepetitionFilter(dup_line_frac=dcfg.max_dup_line_frac, language=WORD_TOKENIZER), prose),
        ProfileGate(GopherQualityFilter(min_doc_words=20, max_symbol_word_ratio=dcfg.max_symbol_ratio,
                                        max_non_alpha_words_ratio=dcfg.min_alpha_words, language=WORD_TOKENIZER), prose),
    ]
