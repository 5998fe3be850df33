"""English sentences for the mini recipe, taken offline from WordNet's usage examples.

Source: Debian's ``wordnet-base`` package (Princeton WordNet 3.0, ``/usr/share/wordnet``).
Its licence permits use, copying and redistribution for any purpose with the copyright
notice kept (see ``/usr/share/doc/wordnet-base/copyright``). Each synset gloss holds
hand-written usage examples in double quotes, e.g.
``"The insurance company deceived me when they told me they were covering my house"``:
natural, varied, modern English written by lexicographers, not templates.

Cleaning keeps examples of 4-25 words made of letters and plain punctuation that read as
sentences (they start with a capital letter or a subject pronoun), drops the ones that a
TTS voice would read differently from how they are written (digits, symbols, quotes,
abbreviations, brackets), upper-cases the first letter and adds a full stop when the
example has no final punctuation. Duplicates are removed case- and punctuation-insensitively.
"""
from __future__ import annotations

import hashlib
import os
import random
import re

WORDNET_DIR = "/usr/share/wordnet"
WORDNET_FILES = ("data.noun", "data.verb", "data.adj", "data.adv")
MIN_WORDS, MAX_WORDS = 4, 25

# Lower-case examples are kept when they open with one of these: they are then whole clauses
# ("she struck a goldmine"); other lower-case examples are mostly phrases ("chop a hole").
SUBJECT_STARTS = {"i", "i'm", "i'll", "i've", "i'd", "you", "he", "she", "it", "we", "they",
                  "there", "this", "that", "these", "those", "my", "his", "her", "our",
                  "their", "your", "its", "the"}
_ALLOWED = re.compile(r"^[A-Za-z][A-Za-z' ,;:!?.-]*$")
_QUOTE = re.compile(r'"([^"]*)"')


class CorpusError(RuntimeError):
    pass


def wordnet_examples(wordnet_dir: str = WORDNET_DIR) -> list[str]:
    """Every quoted usage example in WordNet's data files, in file order."""
    examples = []
    for name in WORDNET_FILES:
        path = os.path.join(wordnet_dir, name)
        if not os.path.exists(path):
            raise CorpusError(f"WordNet data not found at {path}: install the Debian package "
                              "'wordnet-base' (run ./install.sh)")
        with open(path, encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.startswith("  ") or " | " not in line:  # licence header lines
                    continue
                gloss = line.split(" | ", 1)[1]
                examples.extend(_QUOTE.findall(gloss))
    return examples


def clean_sentence(text: str) -> str | None:
    """The example as a sentence fit for TTS and for a reference transcript, or None."""
    text = " ".join(text.split())
    if not _ALLOWED.match(text):
        return None  # digits, symbols, quotes, brackets, non-ASCII letters
    words = text.split(" ")
    if not MIN_WORDS <= len(words) <= MAX_WORDS:
        return None
    if "." in text[:-1] or "--" in text or " -" in text or "- " in text:
        return None  # abbreviations, ellipses, attributions ("... - Shakespeare")
    if re.search(r"[,;:!?'-]{2,}|\s[,;:!?]|'\s|\s'|'$", text):
        return None  # stray punctuation, quoting apostrophes
    if not text[0].isupper() and words[0].lower() not in SUBJECT_STARTS:
        return None
    if sum(w.isupper() and len(w) > 1 for w in words) > 1:
        return None  # several acronyms: read letter by letter, written as words
    text = text[0].upper() + text[1:]
    if text[-1] not in ".!?":
        text = text.rstrip(",;:") + "."
    return text


def sentence_key(text: str) -> str:
    """Key for deduplication: lower-case words without punctuation."""
    return " ".join(re.sub(r"[^a-z' ]", " ", text.lower()).replace("'", "").split())


def load_sentences(wordnet_dir: str = WORDNET_DIR) -> list[str]:
    """All distinct clean sentences, sorted (so the pool does not depend on file order)."""
    seen, out = set(), []
    for example in wordnet_examples(wordnet_dir):
        sent = clean_sentence(example)
        if sent is None:
            continue
        key = sentence_key(sent)
        if key in seen:
            continue
        seen.add(key)
        out.append(sent)
    if not out:
        raise CorpusError(f"no usable sentences found in {wordnet_dir}")
    return sorted(out)


def pool_fingerprint(sentences: list[str]) -> str:
    """Short hash of the sentence pool (changes if the installed WordNet changes)."""
    return hashlib.sha256("\n".join(sentences).encode()).hexdigest()[:16]


def split_sentences(sentences: list[str], sizes: dict[str, int], seed: int,
                    exclude: tuple[str, ...] = ()) -> dict[str, list[str]]:
    """Disjoint random subsets of ``sentences`` by name, in the order of ``sizes``.

    The pool is shuffled once with ``seed``; the first set takes the first ``sizes[first]``
    sentences and so on, so with ``sizes`` ordered test, dev, train the held-out sets do not
    change when only the training size does. Sentences whose key matches one of ``exclude``
    (e.g. the LibriVox transcripts) are left out of every set.
    """
    banned = {sentence_key(s) for s in exclude}
    pool = [s for s in sentences if sentence_key(s) not in banned]
    need = sum(sizes.values())
    if need > len(pool):
        raise CorpusError(f"asked for {need} sentences ({sizes}) but only {len(pool)} "
                          "distinct sentences are available")
    random.Random(f"mini-sentences-{seed}").shuffle(pool)
    out, start = {}, 0
    for name, n in sizes.items():
        out[name] = pool[start:start + n]
        start += n
    return out


if __name__ == "__main__":  # quick look: python3 corpus.py
    sents = load_sentences()
    print(f"{len(sents)} distinct sentences; fingerprint {pool_fingerprint(sents)}")
    for s in random.Random(0).sample(sents, 25):
        print("  ", s)
