"""``fastdistill socratic``: teacher decompositions -> kept chains -> two students trained by ``fastdistill train``
(a question generator and an answerer) -> ``fastdistill socratic eval`` alternating them.

Stages, each resumable in ``run.output_dir``:
1. teacher (the generation stage, ZeRO-3 or not): for every problem, a few-shot decomposition prompt and a few-shot
   direct prompt; chains whose final answer differs from the gold one are dropped and counted.
2. documents for the trainer (``data.source`` text files, documents separated by two blank lines):
   ``qg.txt`` (problem, then its sub-questions ``Q: ...`` one per line, then ``Q: done``), ``answerer.txt`` (problem,
   ``Q:``/``A:`` pairs, ``Final answer:``) and ``direct.txt`` (problem, ``Final answer:``; the direct-answer baseline).
3. ``fastdistill train`` once per student, from ``student.train`` (a trainer config: the teacher, the student layers,
   losses: CE on the teacher's text plus logit KD from the teacher), each into ``students/<name>``.
4. eval: accuracy on the test split of the teacher (direct / with its decomposition), the student before distillation
   (direct), the student trained on direct answers, and the Socratic pair.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import torch
import yaml

from fastdistill.generate.core import SamplingConfig, sample
from fastdistill.generate.prompts import Codec, Prompt
from fastdistill.generate.run import ResumeError
from fastdistill.generate.store import PartStore, _read
from fastdistill.socratic import data as data_lib

STUDENTS = ("qg", "answerer", "direct")
_DIST_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT")


def load_problems(cfg: dict) -> tuple[list[data_lib.Problem], list[data_lib.Problem]]:
    d = cfg["data"]
    if d["source"] == "synthetic":
        train = data_lib.synthetic(d["train_size"], cfg["run"]["seed"], d["train_templates"], "train")
        test = data_lib.synthetic(d["test_size"], cfg["run"]["seed"], d["test_templates"], "test")
        return train, test
    problems = data_lib.read_gsm8k(d["source"])
    n_test = min(d["test_size"], len(problems) // 2)
    return problems[n_test : n_test + d["train_size"]], problems[:n_test]


def teacher_prompts(codec: Codec, cfg: dict, train, test) -> list[Prompt]:
    """Per problem (train then test): its decomposition prompt and its direct prompt. Few-shot examples are the
    gold decompositions of the first ``shots`` train problems (never prompted themselves); the teacher decomposes
    the next ``build.teacher_train_size`` train problems (all when null)."""
    shots = train[: cfg["teacher_prompt"]["shots"]]
    limit = cfg["build"]["teacher_train_size"]
    prompted = train[len(shots) :] if limit is None else train[len(shots) : len(shots) + limit]
    items = []
    for split, problems in (("train", prompted), ("test", test)):
        for p in problems:
            for kind in ("chain", "direct"):
                text = data_lib.few_shot_prompt(shots, p, direct=kind == "direct")
                if kind == "chain":
                    text += "Q:"
                else:
                    text += "Final answer:"
                items.append(Prompt(len(items), f"{split}/{p.id}/{kind}", text, {"split": split, "kind": kind}))
    return items


def check_problems(cfg: dict, train) -> None:
    """The few-shot examples always need decompositions; ``build.chains`` gold / teacher_then_gold needs them for
    every train problem (checked before the teacher is loaded)."""
    source = cfg["data"]["source"]
    data_lib.require_decompositions(train[: cfg["teacher_prompt"]["shots"]], "teacher_prompt.shots", source)
    if cfg["build"]["chains"] != "teacher":
        what = f"build.chains: {cfg['build']['chains']}"
        data_lib.require_decompositions(train, what, source, " (or build.chains: teacher)")


# what the teacher's rows depend on: prompt ids are positions in the prompt list, so a folder made with other
# settings would pair old rows with new prompts
_TEACHER_KEYS = ("teacher", "tokenizer", "data", "teacher_prompt", "sampling")


def _teacher_settings(cfg: dict) -> dict:
    out = {k: copy.deepcopy(cfg[k]) for k in _TEACHER_KEYS}
    out["teacher"].pop("deepspeed", None)  # sharding does not change what is generated
    out["seed"] = cfg["run"]["seed"]
    out["teacher_train_size"] = cfg["build"]["teacher_train_size"]
    return json.loads(json.dumps(out, default=str))


def _check_teacher_folder(folder: str, cfg: dict) -> None:
    path = os.path.join(folder, "settings.json")
    new = _teacher_settings(cfg)
    if os.path.isfile(path):
        with open(path) as f:
            old = json.load(f)
        diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        if diff:
            raise ResumeError(
                f"run.output_dir: {os.path.dirname(folder)!r} holds teacher generations made with different {diff}; "
                "finished prompts would pair with other problems: use a new run.output_dir (or delete its "
                "'teacher' folder to start over)"
            )
        return
    os.makedirs(folder, exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(new, f, indent=1)
    os.replace(path + ".tmp", path)


def teacher_stage(cfg: dict) -> dict:
    """Stage 1 and 2 on every rank (the prompts split by batch); rank 0 writes the documents and the teacher scores."""
    import torch.distributed as dist

    from fastdistill.generate.run import generate_to_store, load_teacher
    from fastdistill.train import recipe

    train, test = load_problems(cfg)
    check_problems(cfg, train)  # before the (slow) teacher load
    rank, world = recipe.init_distributed()
    out = cfg["run"]["output_dir"]
    error = [None]
    if rank == 0:
        os.makedirs(out, exist_ok=True)
        try:
            _check_teacher_folder(os.path.join(out, "teacher"), cfg)
            PartStore(os.path.join(out, "teacher"), "jsonl").clean_temporaries()
        except ResumeError as e:
            error = [str(e)]
    if dist.is_initialized() and world > 1:
        dist.broadcast_object_list(error, src=0)  # every rank stops, none waits on a barrier rank 0 never reaches
    if error[0] is not None:
        raise ResumeError(error[0])
    dist.barrier()
    store = PartStore(os.path.join(out, "teacher"), "jsonl")
    engine, model, codec = load_teacher(cfg, rank, world)
    prompts = teacher_prompts(codec, cfg, train, test)
    sampling = SamplingConfig(seed=cfg["run"]["seed"], **cfg["sampling"])
    generate_to_store(
        model,
        codec,
        prompts,
        sampling,
        store,
        cfg["generation"]["batch_size"],
        rank,
        world,
        cfg["logging"]["progress_bar"],
        desc="teacher chains",
    )
    dist.barrier()
    summary = {}
    if rank == 0:
        rows = {int(r["prompt_id"]): r for path in store.part_files() for r in _read(path, "jsonl")}
        summary = write_documents(cfg, prompts, rows, train, test)
    dist.barrier()
    return summary


def write_documents(cfg: dict, prompts: list[Prompt], rows: dict, train, test) -> dict:
    """Score the teacher's rows (kept chains, test accuracies) and write the students' documents from the chains
    ``build.chains`` names: the teacher's kept chains (``teacher``), every train problem's own decomposition
    (``gold``), or the teacher's kept chain where there is one and the gold one elsewhere (``teacher_then_gold``)."""
    out = cfg["run"]["output_dir"]
    mode = cfg["build"]["chains"]
    by_id = {p.id: p for p in train + test}
    kept_chains: dict[str, tuple[list, str]] = {}  # train problem id -> the teacher's right (steps, final)
    right_direct: dict[str, str] = {}  # train problem id -> the teacher's right direct answer
    kept = dropped = 0
    teacher_direct = teacher_chain = 0
    chains = []
    for pr in prompts:
        split, pid, kind = pr.key.split("/")
        prob = by_id[pid]
        for text in rows[pr.id]["samples"]:
            if kind == "chain":
                steps, final = data_lib.parse_chain("Q:" + text)
            else:
                steps, final = [], data_lib.normalize_number(text.split("\n")[0])
            ok = final is not None and final == prob.answer and (kind == "direct" or bool(steps))
            chains.append({"problem": pid, "split": split, "kind": kind, "text": text, "final": final, "correct": ok})
            if split == "test":
                if kind == "direct":
                    teacher_direct += ok
                else:
                    teacher_chain += ok
                break  # the teacher's test accuracy: its first sample
            if kind == "direct":
                if ok:
                    right_direct.setdefault(pid, final)
                continue
            if not ok:
                dropped += 1
                continue
            kept += 1
            kept_chains.setdefault(pid, (steps, final))  # one document per problem: its first right sample
    docs = {k: [] for k in STUDENTS}
    origin = {"teacher": 0, "gold": 0}  # where each Socratic (qg + answerer) document came from
    # teacher chains: the prompted problems in order; gold: every train problem (the few-shot examples too)
    prompted = {pr.key.split("/")[1] for pr in prompts if pr.key.startswith("train/")}
    for prob in train if mode != "teacher" else [p for p in train if p.id in prompted]:
        if mode != "gold" and prob.id in kept_chains:
            steps, final = kept_chains[prob.id]
            docs["answerer"].append(data_lib.format_chain(prob, steps, final))
            docs["qg"].append(data_lib.qg_document(prob, steps))
            origin["teacher"] += 1
        elif mode != "teacher":
            gold = data_lib.gold_documents(prob)
            docs["answerer"].append(gold["answerer"])
            docs["qg"].append(gold["qg"])
            origin["gold"] += 1
        if mode != "gold" and prob.id in right_direct:
            docs["direct"].append(data_lib.format_direct(prob, right_direct[prob.id]))
        elif mode != "teacher":
            docs["direct"].append(data_lib.format_direct(prob))
    for name, items in docs.items():
        with open(os.path.join(out, f"{name}.txt.tmp"), "w") as f:
            f.write("\n\n\n".join(items) + "\n")
        os.replace(os.path.join(out, f"{name}.txt.tmp"), os.path.join(out, f"{name}.txt"))
    with open(os.path.join(out, "chains.jsonl.tmp"), "w") as f:
        for c in chains:
            f.write(json.dumps(c) + "\n")
    os.replace(os.path.join(out, "chains.jsonl.tmp"), os.path.join(out, "chains.jsonl"))
    summary = {
        "chains": mode,
        "train_chains_kept": kept,
        "train_chains_dropped": dropped,
        "kept_rate": kept / max(kept + dropped, 1),
        "documents": {k: len(v) for k, v in docs.items()},
        "socratic_documents_from": origin,
        "test_problems": len(test),
        "teacher_direct_accuracy": teacher_direct / max(len(test), 1),
        "teacher_decomposition_accuracy": teacher_chain / max(len(test), 1),
    }
    with open(os.path.join(out, "teacher_summary.json.tmp"), "w") as f:
        json.dump(summary, f, indent=1)
    os.replace(os.path.join(out, "teacher_summary.json.tmp"), os.path.join(out, "teacher_summary.json"))
    print(
        f"fastdistill: kept {kept} of {kept + dropped} teacher chains ({summary['kept_rate']:.1%}); teacher test "
        f"accuracy direct {summary['teacher_direct_accuracy']:.3f}, with decomposition "
        f"{summary['teacher_decomposition_accuracy']:.3f}; build.chains: {mode}, Socratic documents "
        f"{origin['teacher']} from the teacher, {origin['gold']} gold",
        flush=True,
    )
    return summary


def train_students(cfg: dict, config_path: str) -> None:
    """``fastdistill train`` once per student (a subprocess each: one trainer run = one process group)."""
    out = cfg["run"]["output_dir"]
    for name in STUDENTS:
        source = os.path.join(out, f"{name}.txt")
        if os.path.getsize(source) < 2:
            print(
                f"fastdistill: no {name} documents (every teacher chain was dropped; build.chains: gold or "
                f"teacher_then_gold trains on the data's own decompositions); {name} student not trained"
            )
            continue
        run_cfg = copy.deepcopy(cfg["student"]["train"])
        run_cfg.setdefault("run", {})["output_dir"] = os.path.join(out, "students", name)
        _check_student_documents(source, run_cfg["run"]["output_dir"])
        run_cfg["teacher"] = {
            **{k: v for k, v in cfg["teacher"].items() if v is not None},
            **run_cfg.get("teacher", {}),
        }
        run_cfg.setdefault("data", {})["source"] = source
        run_cfg["data"].setdefault("tokenizer", cfg["tokenizer"])
        path = os.path.join(out, f"train_{name}.yaml")
        with open(path, "w") as f:
            f.write(f"# generated by fastdistill socratic from {config_path}\n# fastdistill train --config {path}\n")
            yaml.safe_dump(run_cfg, f, sort_keys=False)
        # a world of one of its own: not the rank variables (and the port) of this process's group
        env = {k: v for k, v in os.environ.items() if k not in _DIST_VARS}
        proc = subprocess.run([sys.executable, "-m", "fastdistill.train", "--config", path], env=env)
        if proc.returncode != 0:
            raise RuntimeError(f"training the {name} student failed (exit {proc.returncode}); config {path}")


def _check_student_documents(source: str, folder: str) -> None:
    """The trainer resumes a folder whose ``data.source`` path is unchanged, so a student trained on other documents
    (another ``build.chains``, other problems) is refused here rather than resumed or reported as this run's."""
    import hashlib

    with open(source, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    path = os.path.join(folder, "documents.sha256")
    if os.path.isfile(path):
        with open(path) as f:
            old = f.read().strip()
        if old != digest:
            raise ResumeError(
                f"{folder!r} holds a student trained on other documents than {source!r} (build.chains or the data "
                "changed): use a new run.output_dir, or delete that student folder to train it again"
            )
        return
    os.makedirs(folder, exist_ok=True)
    with open(path + ".tmp", "w") as f:
        f.write(digest + "\n")
    os.replace(path + ".tmp", path)


# ---------------------------------------------------------------------------------------------------------------
# evaluation
# ---------------------------------------------------------------------------------------------------------------
def _lines(model, codec: Codec, contexts: list[str], max_new_tokens: int, ids: list[int]) -> list[str]:
    cfg = SamplingConfig(temperature=0, max_new_tokens=max_new_tokens, stop=["\n"])
    eos = [codec.eos_token_id] if codec.eos_token_id is not None else []
    out = sample(model, codec, [codec.encode(c) for c in contexts], ids, cfg, eos)
    return [g[0].text.strip() for g in out]


@torch.no_grad()
def direct_accuracy(model, codec: Codec, problems, shots, max_new_tokens: int = 12) -> dict:
    """``{"accuracy", "outputs"}``: the model's one-line final answers after the few-shot prompt, scored exactly."""
    contexts = [data_lib.few_shot_prompt(shots, p, direct=True) + "Final answer:" for p in problems]
    answers = _lines(model, codec, contexts, max_new_tokens, list(range(len(problems))))
    correct = [data_lib.normalize_number(a) == p.answer for a, p in zip(answers, problems)]
    return {
        "accuracy": sum(correct) / max(len(problems), 1),
        "outputs": [{"final": a, "correct": c} for a, c in zip(answers, correct)],
    }


@torch.no_grad()
def socratic_accuracy(qg, answerer, codec: Codec, problems, max_steps: int = 5, max_new_tokens: int = 32) -> dict:
    """The pair alternates: qg proposes the next sub-question (until ``Q: done``), the answerer answers it; then
    the answerer gives the final answer after the whole chain."""
    qs: list[list[str]] = [[] for _ in problems]
    ans: list[list[str]] = [[] for _ in problems]
    active = list(range(len(problems)))
    for _ in range(max_steps):
        if not active:
            break
        ctx = ["\n".join([f"Problem: {problems[i].question}"] + [f"Q: {q}" for q in qs[i]]) + "\nQ:" for i in active]
        nxt = _lines(qg, codec, ctx, max_new_tokens, active)
        still = []
        for i, q in zip(active, nxt):
            if q and q.lower().rstrip(".") != "done":
                qs[i].append(q)
                still.append(i)
        if not still:
            break
        ctx = [_chain_context(problems[i], qs[i], ans[i]) + "\nA:" for i in still]
        for i, a in zip(still, _lines(answerer, codec, ctx, max_new_tokens, still)):
            ans[i].append(a)
        active = still
    ctx = [_chain_context(p, qs[i], ans[i]) + "\nFinal answer:" for i, p in enumerate(problems)]
    finals = _lines(answerer, codec, ctx, 12, list(range(len(problems))))
    correct = [data_lib.normalize_number(f) == p.answer for f, p in zip(finals, problems)]
    return {
        "accuracy": sum(correct) / max(len(problems), 1),
        "mean_steps": sum(map(len, qs)) / max(len(qs), 1),
        "outputs": [
            {"questions": q, "answers": a, "final": f, "correct": c} for q, a, f, c in zip(qs, ans, finals, correct)
        ],
    }


def _chain_context(p, qs: list[str], ans: list[str]) -> str:
    lines = [f"Problem: {p.question}"]
    for k, q in enumerate(qs):
        lines.append(f"Q: {q}")
        if k < len(ans):
            lines.append(f"A: {ans[k]}")
    return "\n".join(lines)


def evaluate(cfg: dict) -> dict:
    """Accuracy table of the test split (rank 0 only, one process)."""
    from transformers import AutoModelForCausalLM

    from fastdistill.train import models

    out = cfg["run"]["output_dir"]
    t = cfg["teacher"]
    codec = Codec(models.load_tokenizer(cfg["tokenizer"], t["model"], t["gguf_file"]))
    train, test = load_problems(cfg)
    shots = train[: cfg["teacher_prompt"]["shots"]]
    summary = json.load(open(os.path.join(out, "teacher_summary.json")))
    teacher = models.build_causal_lm(t["model"], t["config"], t["dtype"], t["gguf_file"]).eval()
    layers = cfg["student"]["train"]["student"]["init_from_teacher"]["layers"]
    base = models.student_from_teacher(teacher, layers, "float32").eval()
    del teacher
    table = [
        {"system": "teacher, direct answer (few-shot)", "accuracy": summary["teacher_direct_accuracy"]},
        {"system": "teacher, its own decomposition", "accuracy": summary["teacher_decomposition_accuracy"]},
        {"system": "student before distillation, direct", **direct_accuracy(base, codec, test, shots)},
    ]
    load = lambda name: AutoModelForCausalLM.from_pretrained(os.path.join(out, "students", name, "student")).eval()  # noqa: E731
    if os.path.isdir(os.path.join(out, "students", "direct", "student")):
        table.append(
            {
                "system": "student trained on direct answers",
                **direct_accuracy(load("direct"), codec, test, shots),
            }
        )
    if all(os.path.isdir(os.path.join(out, "students", n, "student")) for n in ("qg", "answerer")):
        res = socratic_accuracy(load("qg"), load("answerer"), codec, test)
        table.append({"system": "Socratic pair (question generator + answerer)", **res})
    # every student's output per test problem (eval_outputs.json); eval.json keeps the accuracies
    outputs = {
        r["system"]: [{"problem": p.question, "answer": p.answer, **o} for p, o in zip(test, r.pop("outputs"))]
        for r in table
        if "outputs" in r
    }
    result = {**summary, "table": table}
    for name, obj in (("eval_outputs.json", outputs), ("eval.json", result)):
        tmp = os.path.join(out, f"{name}.tmp{os.getpid()}")
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=1)
        os.replace(tmp, os.path.join(out, name))
    lines = ["| system | accuracy |", "|---|---:|"] + [f"| {r['system']} | {r['accuracy']:.3f} |" for r in table]
    lines.append(
        f"\ntest problems: {len(test)}; teacher chains kept {summary['train_chains_kept']} of "
        f"{summary['train_chains_kept'] + summary['train_chains_dropped']} ({summary['kept_rate']:.1%})"
    )
    print("\n".join(lines), flush=True)
    return result
