"""Socratic data (Shridhar et al. 2023): problems with sub-question / sub-answer decompositions and a final answer.

Two sources:
- GSM8K's "socratic" format from a user's JSONL file: ``{"question": ..., "answer": ...}`` where the answer holds one
  line per step, ``sub-question ** step``, then ``#### final answer``.
- An embedded, seeded generator of multi-step arithmetic word problems with exact answers: several templates of 2-4
  steps; the test split uses templates that the train split never sees, so a student cannot pass by memorising one.
"""

from __future__ import annotations

import json
import os
import random
import re
from dataclasses import dataclass, field

from fastdistill.generate.prompts import PromptError


@dataclass
class Problem:
    id: str
    question: str
    steps: list[tuple[str, str]]  # (sub-question, sub-answer)
    answer: str  # the final answer, a number as text
    template: str = "gsm8k"
    meta: dict = field(default_factory=dict)


_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def normalize_number(text: str) -> str | None:
    """The last number in ``text`` ("1,200.50" -> "1200.5"), or None."""
    found = _NUMBER.findall(text or "")
    if not found:
        return None
    value = float(found[-1].replace(",", ""))
    return str(int(value)) if value == int(value) else repr(value)


def read_gsm8k(path: str) -> list[Problem]:
    """Problems of a GSM8K socratic JSONL file (see the module docstring); malformed lines are a ``PromptError``."""
    if not os.path.isfile(path):
        raise PromptError(f"data.source: file {path!r} does not exist")
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise PromptError(f"{path}:{n}: not valid JSON ({e.msg}); expected one object per line") from None
            if not isinstance(rec, dict) or not isinstance(rec.get("question"), str) or "answer" not in rec:
                raise PromptError(f"{path}:{n}: expected an object with 'question' and 'answer' strings")
            lines = [x.strip() for x in str(rec["answer"]).strip().splitlines() if x.strip()]
            if not lines or not lines[-1].startswith("####"):
                raise PromptError(f"{path}:{n}: the answer must end with a '#### <final answer>' line")
            steps = []
            for k, x in enumerate(lines[:-1]):
                if " ** " not in x:
                    raise PromptError(
                        f"{path}:{n}: step {k + 1} {x[:60]!r} has no ' ** '; expected 'sub-question ** step' lines "
                        "(GSM8K's socratic format)"
                    )
                q, a = x.split(" ** ", 1)
                steps.append((q.strip(), re.sub(r"<<[^>]*>>", "", a).strip()))  # drop calculator annotations
            final = normalize_number(lines[-1][4:])
            if final is None:
                raise PromptError(f"{path}:{n}: no number after '####' in {lines[-1]!r}")
            out.append(Problem(str(rec.get("id", n)), rec["question"].strip(), steps, final))
    if not out:
        raise PromptError(f"data.source: {path!r} holds no problems (empty file)")
    return out


# ---------------------------------------------------------------------------------------------------------------
# the embedded generator
# ---------------------------------------------------------------------------------------------------------------
NAMES = ["Ann", "Ben", "Carla", "Dev", "Ema", "Farid", "Gina", "Hugo", "Ines", "Jon", "Kai", "Lena"]


def _shop(r: random.Random):
    n, a, p, b, q = r.choice(NAMES), r.randint(2, 9), r.randint(2, 9), r.randint(2, 9), r.randint(2, 9)
    s1, s2 = a * p, b * q
    bill = ((s1 + s2) // 10 + 1 + r.randint(0, 3)) * 10
    question = (
        f"{n} buys {a} notebooks at {p} dollars each and {b} pens at {q} dollars each, and pays with {bill} "
        "dollars. How much change does " + n + " get?"
    )
    steps = [
        ("How much do the notebooks cost?", f"{a} * {p} = {s1}. The notebooks cost {s1} dollars."),
        ("How much do the pens cost?", f"{b} * {q} = {s2}. The pens cost {s2} dollars."),
        ("How much is spent in all?", f"{s1} + {s2} = {s1 + s2}. {n} spends {s1 + s2} dollars."),
        ("How much change is left?", f"{bill} - {s1 + s2} = {bill - s1 - s2}. The change is {bill - s1 - s2} dollars."),
    ]
    return question, steps, bill - s1 - s2


def _garden(r: random.Random):
    n, rows, per, eaten = r.choice(NAMES), r.randint(3, 9), r.randint(4, 12), r.randint(1, 9)
    total = rows * per
    question = f"{n} plants {rows} rows of {per} tulips. Rabbits eat {eaten} of them. How many tulips are left?"
    steps = [
        ("How many tulips are planted?", f"{rows} * {per} = {total}. {n} plants {total} tulips."),
        ("How many tulips are left?", f"{total} - {eaten} = {total - eaten}. {total - eaten} tulips are left."),
    ]
    return question, steps, total - eaten


def _travel(r: random.Random):
    n, v1, h1, v2, h2 = r.choice(NAMES), r.randint(20, 60), r.randint(2, 5), r.randint(20, 60), r.randint(1, 4)
    d1, d2 = v1 * h1, v2 * h2
    question = (
        f"{n} drives {h1} hours at {v1} km per hour, then {h2} hours at {v2} km per hour. How many km does {n} drive?"
    )
    steps = [
        ("How far is the first part?", f"{v1} * {h1} = {d1}. The first part is {d1} km."),
        ("How far is the second part?", f"{v2} * {h2} = {d2}. The second part is {d2} km."),
        ("How far is the whole trip?", f"{d1} + {d2} = {d1 + d2}. {n} drives {d1 + d2} km."),
    ]
    return question, steps, d1 + d2


def _savings(r: random.Random):
    n, w, s, gift, spent = r.choice(NAMES), r.randint(3, 10), r.randint(5, 20), r.randint(5, 50), r.randint(1, 30)
    saved = w * s
    question = (
        f"{n} saves {s} dollars a week for {w} weeks, gets a gift of {gift} dollars and then spends {spent} dollars. "
        f"How many dollars does {n} have now?"
    )
    steps = [
        ("How much is saved?", f"{s} * {w} = {saved}. {n} saves {saved} dollars."),
        ("How much is there after the gift?", f"{saved} + {gift} = {saved + gift}. {n} has {saved + gift} dollars."),
        (
            "How much is left after spending?",
            f"{saved + gift} - {spent} = {saved + gift - spent}. {n} has {saved + gift - spent} dollars now.",
        ),
    ]
    return question, steps, saved + gift - spent


def _bakery(r: random.Random):
    n, batches, per, sold, bag = r.choice(NAMES), r.randint(2, 6), r.randint(6, 12), r.randint(1, 10), r.randint(2, 4)
    total = batches * per
    left = total - sold
    left -= left % bag  # bags come out even
    sold = total - left
    question = (
        f"{n} bakes {batches} batches of {per} cookies and sells {sold} of them. The rest go into bags of {bag}. "
        "How many bags are there?"
    )
    steps = [
        ("How many cookies are baked?", f"{batches} * {per} = {total}. {n} bakes {total} cookies."),
        ("How many cookies are left?", f"{total} - {sold} = {left}. {left} cookies are left."),
        ("How many bags are there?", f"{left} / {bag} = {left // bag}. There are {left // bag} bags."),
    ]
    return question, steps, left // bag


def _library(r: random.Random):
    n, shelves, per, donated, lent = (
        r.choice(NAMES),
        r.randint(2, 8),
        r.randint(10, 30),
        r.randint(5, 40),
        r.randint(1, 20),
    )
    total = shelves * per
    question = (
        f"A library run by {n} has {shelves} shelves of {per} books. It gets {donated} donated books and lends out "
        f"{lent}. How many books are on the shelves?"
    )
    steps = [
        ("How many books are on the shelves at first?", f"{shelves} * {per} = {total}. There are {total} books."),
        ("How many books are there after the donation?", f"{total} + {donated} = {total + donated}."),
        ("How many books are left after lending?", f"{total + donated} - {lent} = {total + donated - lent}."),
    ]
    return question, steps, total + donated - lent


TEMPLATES = {
    "shop": _shop,
    "garden": _garden,
    "travel": _travel,
    "savings": _savings,
    "bakery": _bakery,
    "library": _library,
}
TRAIN_TEMPLATES = ("shop", "garden", "travel", "savings")
TEST_TEMPLATES = ("bakery", "library")  # held out: never in the train split


def synthetic(n: int, seed: int, templates: tuple[str, ...] | list[str], prefix: str) -> list[Problem]:
    """``n`` problems drawn round-robin from ``templates`` with a seeded RNG (exact integer answers)."""
    bad = [t for t in templates if t not in TEMPLATES]
    if bad:
        raise PromptError(f"data.templates: unknown {bad}; expected among {sorted(TEMPLATES)}")
    r = random.Random(f"socratic/{seed}/{prefix}")
    out = []
    for i in range(n):
        name = templates[i % len(templates)]
        q, steps, ans = TEMPLATES[name](r)
        out.append(Problem(f"{prefix}{i}", q, steps, str(ans), name))
    return out


def require_decompositions(problems: list[Problem], what: str, source: str, hint: str = "") -> None:
    """A ``PromptError`` naming the first problem without sub-question steps (e.g. a GSM8K answer that is only
    ``#### N``): ``what`` says which setting needs them."""
    bare = [p.id for p in problems if not p.steps]
    if bare:
        raise PromptError(
            f"{what} needs every problem's sub-question decomposition, but {len(bare)} of {len(problems)} problems of "
            f"data.source {source!r} have none (first: id {bare[0]!r}); expected GSM8K socratic answers with "
            f"'sub-question ** step' lines before '#### answer'{hint}"
        )


def gold_documents(p: Problem) -> dict[str, str]:
    """The three students' documents of one problem from its own decomposition: ``qg`` (problem, its sub-questions,
    ``Q: done``), ``answerer`` (the whole chain and final answer) and ``direct`` (problem, final answer)."""
    return {"qg": qg_document(p, p.steps), "answerer": format_chain(p), "direct": format_direct(p)}


def qg_document(p: Problem, steps: list[tuple[str, str]]) -> str:
    return "\n".join([f"Problem: {p.question}"] + [f"Q: {q}" for q, _ in steps] + ["Q: done"])


# ---------------------------------------------------------------------------------------------------------------
# the text formats: few-shot prompts, teacher chains, student documents
# ---------------------------------------------------------------------------------------------------------------
def format_chain(p: Problem, steps: list[tuple[str, str]] | None = None, final: str | None = None) -> str:
    """``Problem: ...`` then ``Q: / A:`` lines then ``Final answer: N`` (the decomposition format of every stage)."""
    lines = [f"Problem: {p.question}"]
    for q, a in p.steps if steps is None else steps:
        lines += [f"Q: {q}", f"A: {a}"]
    lines.append(f"Final answer: {p.answer if final is None else final}")
    return "\n".join(lines)


def format_direct(p: Problem, final: str | None = None) -> str:
    return f"Problem: {p.question}\nFinal answer: {p.answer if final is None else final}"


def few_shot_prompt(shots: list[Problem], target: Problem, direct: bool) -> str:
    fmt = format_direct if direct else format_chain
    head = "\n\n".join(fmt(s) for s in shots)
    return f"{head}\n\nProblem: {target.question}\n"


def parse_chain(text: str) -> tuple[list[tuple[str, str]], str | None]:
    """(steps, final answer) from a continuation of ``few_shot_prompt``: ``Q:``/``A:`` pairs up to the first
    ``Final answer:`` line (whatever follows it, e.g. the next invented problem, is ignored)."""
    steps: list[tuple[str, str]] = []
    pending = None
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("Final answer:"):
            return steps, normalize_number(line[len("Final answer:") :])
        if line.startswith("Problem:"):
            break
        if line.startswith("Q:"):
            pending = line[2:].strip()
        elif line.startswith("A:") and pending is not None:
            steps.append((pending, line[2:].strip()))
            pending = None
    return steps, None
