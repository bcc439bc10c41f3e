"""``fastdistill weak-label``, top to bottom: teacher (the generation stage's, ZeRO-3 or not) -> N chains per sentence
and the verbalizer distribution after each (resumable part files) -> aggregation -> student trained on the soft labels
with ``distill_loss`` -> measurement against the human ratings of the held-out split -> ``save_pretrained`` export.

Teacher labelling runs on every rank (prompts split by batch); the student, the measurement and the export run on
rank 0 (the student is small) while the other ranks wait at the final barrier.
"""

from __future__ import annotations

import json
import math
import os
import time

import torch
import yaml

from fastdistill.generate.core import SamplingConfig, continuation_logprobs
from fastdistill.generate.prompts import build_prompts
from fastdistill.generate.run import ResumeError, generate_to_store, load_teacher
from fastdistill.generate.store import PartStore, _read
from fastdistill.weak_label import data as data_lib
from fastdistill.weak_label import student as student_lib
from fastdistill.weak_label.labeling import (
    RULES,
    Task,
    aggregate,
    answer_contexts,
    expected_score,
    pearson,
    sign_accuracy,
)

FINGERPRINT = ("teacher", "tokenizer", "data", "task", "sampling")


def make_task(cfg: dict) -> Task:
    t = cfg["task"]
    names = list(t["labels"])
    return Task(
        template=t["template"],
        labels=names,
        verbalizers=[t["labels"][n]["verbalizer"] for n in names],
        values=[float(t["labels"][n].get("value", i)) for i, n in enumerate(names)],
        chain_of_thought=t["chain_of_thought"],
        answer_prompt=t["answer_prompt"],
        system=t["system"],
        chat_template=t["chat_template"],
    )


def _fingerprint(cfg: dict) -> dict:
    fp = {k: cfg[k] for k in FINGERPRINT}
    fp["teacher"] = {k: v for k, v in cfg["teacher"].items() if k != "deepspeed"}
    fp["seed"] = cfg["run"]["seed"]
    return json.loads(json.dumps(fp))


def _check_resume(out_dir: str, cfg: dict) -> None:
    path = os.path.join(out_dir, "weak_label_config.yaml")
    if os.path.isfile(path):
        old = (yaml.safe_load(open(path)) or {}).get("fingerprint")
        new = _fingerprint(cfg)
        if old != new:
            diff = [k for k in new if (old or {}).get(k) != new[k]]
            raise ResumeError(
                f"run.output_dir {out_dir!r} holds teacher labels made with different {diff}; use a new output_dir "
                "(or delete that folder to start over)"
            )
    with open(path + ".tmp", "w") as f:
        f.write("# resolved fastdistill weak-label config; re-run (resumes) with:\n")
        f.write("#   fastdistill weak-label --config weak_label_config.yaml\n")
        yaml.safe_dump({**cfg, "fingerprint": _fingerprint(cfg)}, f, sort_keys=False)
    os.replace(path + ".tmp", path)


def run(cfg: dict) -> dict:
    import torch.distributed as dist

    from fastdistill.train import recipe

    if cfg["run"]["threads"]:
        torch.set_num_threads(cfg["run"]["threads"])
    rank, world = recipe.init_distributed()
    out_dir = cfg["run"]["output_dir"]
    say = (lambda *a: print("fastdistill:", *a, flush=True)) if rank == 0 else (lambda *a: None)
    seed = cfg["run"]["seed"]
    task = make_task(cfg)
    d = cfg["data"]
    examples = data_lib.load_examples(d["source"], d["sets"], d["text_field"], d["label_field"])
    train, test = data_lib.split(examples, d["test_per_set"], d["train_per_set"], seed)
    if not train:
        raise ValueError(f"data: no unlabeled sentences left for the teacher to label ({len(examples)} examples)")
    if not test:
        raise ValueError("data: no labelled sentences for the held-out split (data.label_field)")
    if rank == 0:
        os.makedirs(out_dir, exist_ok=True)
        _check_resume(out_dir, cfg)
        PartStore(os.path.join(out_dir, "teacher"), "parquet").clean_temporaries()
    dist.barrier()
    store = PartStore(os.path.join(out_dir, "teacher"), "parquet")
    torch.manual_seed(seed)
    engine, model, codec = load_teacher(cfg, rank, world)
    verbalizers = task.verbalizer_ids(codec)
    everything = test + train  # prompt id = position: the held-out split first
    prompts = build_prompts(
        [{"text": e["text"]} for e in everything],
        task.template,
        codec,
        chat_template=task.chat_template,
        system=task.system,
        where="task",
    )
    sampling = SamplingConfig(seed=seed, **cfg["sampling"]) if task.chain_of_thought else None
    say(
        f"{len(test)} held-out + {len(train)} unlabeled sentences "
        f"({', '.join(d['sets']) if d['source'] == 'vader' else d['source']}); "
        f"{sampling.num_samples if sampling else 1} teacher sample(s) each; labels {task.labels}; world size {world}"
    )
    direct_template = [codec.encode(p.text + task.answer_prompt) for p in prompts]

    def score(m, batch, results):
        """Verbalizer log-probs after every chain, and the direct (no chain) answer, with timings per prompt."""
        t0 = time.perf_counter()
        contexts = [c for p, g in zip(batch, results) for c in answer_contexts(codec, task, p, [s.text for s in g])]
        per = len(contexts) // len(batch)
        # one prompt's chains per forward when there are enough of them: their prompt is run once (shared prefix)
        lp = continuation_logprobs(m, contexts, verbalizers, batch_size=per if per >= 4 else 16).tolist()
        t1 = time.perf_counter()
        if task.chain_of_thought:
            direct = continuation_logprobs(m, [direct_template[p.id] for p in batch], verbalizers).tolist()
        else:  # the one context per prompt already is the direct answer
            direct = lp
        t2 = time.perf_counter()
        return [
            {
                "label_logprobs": lp[i * per : (i + 1) * per],
                "direct_logprobs": direct[i],
                "score_seconds": (t1 - t0) / len(batch),
                "direct_seconds": (t2 - t1) / len(batch),
            }
            for i in range(len(batch))
        ]

    t_label = time.time()
    stats = generate_to_store(
        model,
        codec,
        prompts,
        sampling,
        store,
        cfg["generation"]["batch_size"],
        rank,
        world,
        cfg["logging"]["progress_bar"],
        desc="teacher labels",
        extra=score,
    )
    every = [None] * world
    dist.all_gather_object(every, stats)
    summary: dict = {}
    if rank == 0:
        summary = _student_and_measure(cfg, task, store, everything, test, train, every, time.time() - t_label, say)
    dist.barrier()
    return summary


def _student_and_measure(cfg, task, store, everything, test, train, stats, label_seconds, say) -> dict:
    out_dir = cfg["run"]["output_dir"]
    rows = {}
    for path in store.part_files():
        for r in _read(path, "parquet"):
            rows[int(r["prompt_id"])] = r
    missing = [i for i in range(len(everything)) if i not in rows]
    if missing:
        raise RuntimeError(f"teacher labels missing for {len(missing)} sentences (first ids {missing[:5]})")
    extras = [json.loads(rows[i]["extra"]) for i in range(len(everything))]
    log_q = torch.log_softmax(torch.tensor([e["label_logprobs"] for e in extras], dtype=torch.float64), -1)
    direct = torch.log_softmax(torch.tensor([e["direct_logprobs"] for e in extras], dtype=torch.float64), -1)
    n_test = len(test)
    n_samples = log_q.shape[1]
    rating = torch.tensor([e["rating"] for e in test], dtype=torch.float64)
    sets = [e["set"] for e in test]
    band = cfg["data"]["neutral_band"]
    values = task.values
    groups = {name: [i for i, s in enumerate(sets) if s == name] for name in dict.fromkeys(sets)}
    if len(groups) > 1:
        groups["all"] = list(range(n_test))

    def measure(score: torch.Tensor) -> dict:
        return {
            name: {"r": pearson(score[idx], rating[idx]), "sign_acc": sign_accuracy(score[idx], rating[idx], band)}
            for name, idx in groups.items()
        }

    table: list[dict] = []
    vader = data_lib.vader_scores([e["text"] for e in test])
    if vader is None:
        say(f"VADER lexicon baseline skipped: neither {data_lib.vader_dir()!r} nor the vaderSentiment package is there")
    else:
        table.append({"system": "VADER lexicon (compound)", **measure(torch.tensor(vader, dtype=torch.float64))})
    table.append(
        {"system": "teacher direct answer, no chain", **measure(expected_score(direct[:n_test].exp(), values))}
    )
    for rule in RULES:
        for n in cfg["evaluate"]["samples"]:
            if n > n_samples:
                continue
            p = aggregate(log_q[:n_test], rule, n)
            table.append({"system": f"teacher {rule} N={n}", **measure(expected_score(p, values))})

    # -- the student: soft labels of the unlabeled split, aggregated with the configured rule over every sample -----
    s = cfg["student"]
    soft = aggregate(log_q[n_test:], cfg["aggregation"], n_samples)
    if s["calibrate"] == "batch":
        # the prior is the mean soft label over the unlabeled split; the held-out row shows what the student learns
        held = aggregate(log_q[:n_test], cfg["aggregation"], n_samples)
        table.append(
            {
                "system": f"teacher {cfg['aggregation']} N={n_samples}, batch-calibrated (the student's targets)",
                **measure(expected_score(student_lib.batch_calibrate(held, soft), values)),
            }
        )
        soft = student_lib.batch_calibrate(soft)
    texts = [e["text"] for e in train]
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(cfg["run"]["seed"] + 2)).tolist()
    n_val = min(int(round(s["validation_fraction"] * len(train))), len(train) - 1)
    val_idx, fit_idx = sorted(order[:n_val]), sorted(order[n_val:])
    torch.manual_seed(cfg["run"]["seed"] + 1)
    model, tokenizer = student_lib.build_student(s["model"], task.labels, values, s["config"])
    say(
        f"student: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, {len(fit_idx)} soft labels "
        f"to train on, {n_val} to validate on (calibration: {s['calibrate']})"
    )
    history = student_lib.train_student(
        model,
        tokenizer,
        [texts[i] for i in fit_idx],
        soft[fit_idx],
        epochs=s["epochs"],
        batch_size=s["batch_size"],
        lr=s["lr"],
        max_length=s["max_length"],
        seed=cfg["run"]["seed"],
        temperature=s["temperature"],
        val_texts=[texts[i] for i in val_idx] if n_val else None,
        val_probs=soft[val_idx] if n_val else None,
        values=values,
        log=say,
    )
    test_texts = [e["text"] for e in test]
    student_lib.predict(model, tokenizer, test_texts[:8], s["max_length"])  # warm-up
    t0 = time.perf_counter()
    probs = student_lib.predict(model, tokenizer, test_texts, s["max_length"])
    student_s = (time.perf_counter() - t0) / n_test
    table.append(
        {
            "system": f"student ({cfg['aggregation']} N={n_samples} soft labels"
            + (", batch-calibrated)" if s["calibrate"] == "batch" else ")"),
            **measure(expected_score(probs, values)),
        }
    )
    export_dir = student_lib.export(model, tokenizer, os.path.join(out_dir, "student"))

    # teacher time per sentence on one rank: its chains (sampling + verbalizer scoring) vs. the direct answer, from
    # the rows (so a resumed run reports the run that made them); rows without timings: the generation stats
    direct_s = sum(e["direct_seconds"] for e in extras) / len(extras)
    if all("batch_seconds" in e for e in extras):
        chain_s = sum(e["batch_seconds"] - e["direct_seconds"] for e in extras) / len(extras)
    else:
        total_prompts = sum(st["prompts"] for st in stats)
        chain_s = sum(st["seconds"] for st in stats) / total_prompts if total_prompts else float("nan")
    summary = {
        "held_out": {name: len(idx) for name, idx in groups.items()},
        "train_soft_labels": len(train),
        "num_samples": n_samples,
        "aggregation": cfg["aggregation"],
        "neutral_band": band,
        "table": table,
        "student_loss_per_epoch": history["loss"],
        "student_validation": {
            "sentences": n_val,
            "per_epoch": history["val"],
            "kept_epoch": history["best_epoch"],
            "calibration": s["calibrate"],
        },
        "seconds_per_sentence": {
            "teacher_chains_all_samples": chain_s,
            "teacher_direct": direct_s,
            "student": student_s,
        },
        "student_speedup_vs_teacher_chains": chain_s / student_s if student_s > 0 else None,
        "student_speedup_vs_teacher_direct": direct_s / student_s if student_s > 0 else None,
        "teacher_label_seconds": label_seconds,
        "export_dir": export_dir,
    }
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(summary, f, indent=1)
    md = format_table(summary)
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write(md)
    print(md, flush=True)
    say(f"student saved to {export_dir} (loads with transformers.AutoModelForSequenceClassification)")
    return summary


def format_table(summary: dict) -> str:
    names = list(summary["held_out"])
    head = "| system | " + " | ".join(f"r {n} | sign acc {n}" for n in names) + " |"
    sep = "|---|" + "---:|---:|" * len(names)
    lines = [head, sep]
    undefined = False

    def cell(x: float) -> str:
        nonlocal undefined
        if math.isnan(x):
            undefined = True
            return "n/a"
        return f"{x:.3f}"

    for row in summary["table"]:
        cells = []
        for n in names:
            cells += [cell(row[n]["r"]), cell(row[n]["sign_acc"])]
        lines.append(f"| {row['system']} | " + " | ".join(cells) + " |")
    sec = summary["seconds_per_sentence"]
    lines.append("")
    val = summary.get("student_validation") or {}
    if val.get("per_epoch"):
        kept = val["per_epoch"][val["kept_epoch"] - 1]
        lines.append(
            f"student fidelity to its (calibration: {val['calibration']}) soft labels on {val['sentences']} validation "
            f"sentences it did not train on: KL {kept['kl']:.4f}, score r {kept['r']:.3f} (epoch {val['kept_epoch']} "
            f"of {len(val['per_epoch'])}, the lowest validation KL)"
        )
        lines.append("")
    if undefined:
        lines.append(
            "n/a: undefined (r: the system gave every sentence of that set the same score, e.g. all its votes for one "
            "label; sign acc: no sentence of that set outside the neutral band)"
        )
    lines.append(
        f"held-out sentences: {summary['held_out']}; soft labels: {summary['train_soft_labels']}; "
        f"seconds per sentence: teacher chains ({summary['num_samples']} samples) "
        f"{sec['teacher_chains_all_samples']:.3f}, "
        f"teacher direct {sec['teacher_direct']:.4f}, student {sec['student']:.5f} "
        f"(student {summary['student_speedup_vs_teacher_chains'] or float('nan'):.1f}x faster than the chains, "
        f"{summary['student_speedup_vs_teacher_direct'] or float('nan'):.1f}x than the direct answer)"
    )
    return "\n".join(lines) + "\n"
