"""Data of the weak-label stage: the human-rated sentences of VADER (Hutto & Gilbert, ICWSM 2014) as the embedded
default, or a user's file; a seeded held-out split per set; the VADER lexicon as the non-LLM baseline.

The VADER sentences ship inside the source distribution of ``vadersentiment==3.3.2`` on PyPI
(``additional_resources/hutto_ICWSM_2014.tar.gz``: ``<set>_GroundTruth.txt`` = id, mean human rating in [-4, 4],
sentence). ``make data-weak-labels`` downloads that sdist with pip once and unpacks it into the cache
(``$FASTDISTILL_CACHE/vadersentiment-3.3.2``); nothing is fetched at run time.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import random
import shutil
import tarfile

from fastdistill.generate.prompts import PromptError, read_records

VADER_VERSION = "3.3.2"
VADER_SETS = ("tweets", "movieReviewSnippets", "amazonReviewSnippets", "nytEditorialSnippets")


def vader_dir() -> str:
    from fastdistill.train.models import cache_dir

    return os.path.join(cache_dir(), f"vadersentiment-{VADER_VERSION}")


def prepare_vader(sdist: str, target: str | None = None) -> str:
    """Unpack the ``vaderSentiment-3.3.2.tar.gz`` sdist and its inner ICWSM-2014 archive into ``target`` (atomic)."""
    target = target or vader_dir()
    if os.path.isfile(os.path.join(target, "tweets_GroundTruth.txt")):
        return target
    tmp = f"{target}.tmp-{os.getpid()}"
    os.makedirs(tmp, exist_ok=True)
    with tarfile.open(sdist) as outer:
        outer.extractall(tmp, filter="data")
    (inner,) = glob.glob(os.path.join(tmp, "*", "additional_resources", "hutto_ICWSM_2014.tar.gz"))
    with tarfile.open(inner) as t:
        for member in t.getmembers():
            name = os.path.basename(member.name)
            if member.isfile() and name.endswith("_GroundTruth.txt"):
                member.name = name
                t.extract(member, tmp, filter="data")
    (pkg,) = glob.glob(os.path.join(tmp, "vaderSentiment-*", "vaderSentiment"))
    os.replace(pkg, os.path.join(tmp, "vaderSentiment"))  # the lexicon code, for the baseline
    for leftover in glob.glob(os.path.join(tmp, "vaderSentiment-*")):
        shutil.rmtree(leftover)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    os.replace(tmp, target)
    return target


def load_vader_set(name: str) -> list[dict]:
    """``[{"id", "text", "rating", "set"}]`` of one VADER ground-truth set."""
    if name not in VADER_SETS:
        raise PromptError(f"data.sets: got {name!r}; expected among {list(VADER_SETS)}")
    path = os.path.join(vader_dir(), f"{name}_GroundTruth.txt")
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"data.source 'vader': {path!r} is missing; run `make data-weak-labels` once (pip downloads the "
            f"vadersentiment=={VADER_VERSION} sdist and unpacks its rated sentences into the cache)"
        )
    out = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f, 1):
            parts = line.rstrip("\r\n").split("\t")
            if len(parts) < 3:
                continue
            try:
                rating = float(parts[1])
            except ValueError:
                raise PromptError(f"{path}:{n}: expected 'id<TAB>rating<TAB>sentence', got {line[:80]!r}") from None
            out.append(
                {"id": f"{name}/{parts[0]}", "text": "\t".join(parts[2:]).strip(), "rating": rating, "set": name}
            )
    return out


def load_examples(source: str, sets: list[str], text_field: str, label_field: str | None) -> list[dict]:
    """Examples ``{"id", "text", "rating" (None when unlabeled), "set"}`` from VADER or a user's file."""
    if source == "vader":
        return [r for s in sets for r in load_vader_set(s)]
    records = read_records(source)
    out = []
    for i, r in enumerate(records):
        if text_field not in r:
            raise PromptError(f"data.text_field: record {i} of {source!r} has no field {text_field!r}; has {sorted(r)}")
        rating = None
        if label_field is not None and r.get(label_field) not in (None, ""):
            try:
                rating = float(r[label_field])
            except (TypeError, ValueError):
                raise PromptError(
                    f"data.label_field: record {i} of {source!r} has {label_field}={r[label_field]!r}; "
                    "expected a number"
                ) from None
        out.append({"id": str(r.get("id", i)), "text": str(r[text_field]), "rating": rating, "set": "file"})
    return out


def split(examples: list[dict], test_per_set: int, train_per_set: int | None, seed: int):
    """Per set, a seeded shuffle: the first ``test_per_set`` labelled examples are the held-out test split, the next
    ``train_per_set`` (all the rest when None) the unlabeled text the teacher labels."""
    train, test = [], []
    for name in dict.fromkeys(e["set"] for e in examples):
        items = [e for e in examples if e["set"] == name]
        random.Random(f"{seed}/{name}").shuffle(items)
        labelled = [e for e in items if e["rating"] is not None]
        held = labelled[:test_per_set]
        held_ids = {e["id"] for e in held}
        rest = [e for e in items if e["id"] not in held_ids]
        test += held
        train += rest if train_per_set is None else rest[:train_per_set]
    return train, test


def vader_scores(texts: list[str]) -> list[float] | None:
    """VADER's compound score per text (the lexicon baseline), from the unpacked sdist (or an installed package);
    None when neither is there (``make data-weak-labels`` unpacks it)."""
    spec = importlib.util.spec_from_file_location(
        "fastdistill_vader", os.path.join(vader_dir(), "vaderSentiment", "vaderSentiment.py")
    )
    if spec is None or not os.path.isfile(spec.origin or ""):
        try:
            from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
        except ImportError:
            return None
    else:
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        SentimentIntensityAnalyzer = module.SentimentIntensityAnalyzer  # noqa: N806
    analyzer = SentimentIntensityAnalyzer()
    return [analyzer.polarity_scores(t)["compound"] for t in texts]
