"""Socratic decomposition: the seeded problem generator (exact answers, held-out templates), GSM8K socratic parsing and
its errors, chain parsing and filtering into trainer documents, the alternating evaluation loop on tiny models, and
the teacher stage end to end on a tiny random teacher (every chain wrong: dropped and counted)."""

from __future__ import annotations

import json
import os
import re
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

from _launch import REPO, check, run  # noqa: E402

from fastdistill.generate import Codec, Prompt, PromptError  # noqa: E402
from fastdistill.socratic import data as D  # noqa: E402
from fastdistill.socratic import pipeline  # noqa: E402
from fastdistill.train.data import ByteTokenizer  # noqa: E402


def test_generator_is_seeded_exact_and_holds_templates_out():
    a = D.synthetic(12, 3, D.TRAIN_TEMPLATES, "train")
    assert [p.question for p in a] == [p.question for p in D.synthetic(12, 3, D.TRAIN_TEMPLATES, "train")]
    assert [p.question for p in a] != [p.question for p in D.synthetic(12, 4, D.TRAIN_TEMPLATES, "train")]
    test = D.synthetic(6, 3, D.TEST_TEMPLATES, "test")
    assert not {p.template for p in a} & {p.template for p in test}
    for p in a + test:
        assert 2 <= len(p.steps) <= 4
        for _, step in p.steps:  # every step's arithmetic is exact
            lhs, rhs = re.match(r"([\d\s*+/-]+)=\s*(\d+)", step).groups()
            assert eval(lhs) == int(rhs)  # noqa: S307 (digits and operators only)
        assert D.normalize_number(p.steps[-1][1]) == p.answer


def test_read_gsm8k_and_errors(tmp_path):
    good = tmp_path / "gsm.jsonl"
    answer = "How many apples? ** She has 3 + 4 = <<3+4=7>>7 apples.\nHow many left? ** 7 - 2 = <<7-2=5>>5\n#### 5"
    good.write_text(json.dumps({"question": "Ann has 3 and 4 apples, eats 2.", "answer": answer}) + "\n")
    (p,) = D.read_gsm8k(str(good))
    assert p.steps == [("How many apples?", "She has 3 + 4 = 7 apples."), ("How many left?", "7 - 2 = 5")]
    assert p.answer == "5"
    cases = {
        "": "holds no problems",
        '{"question": "q", "answer": "step without marker\\n#### 3"}\n': "has no ' \\*\\* '",
        '{"question": "q", "answer": "a ** b"}\n': "must end with a '#### <final answer>'",
        '{"question": "q", "answer": "#### none"}\n': "no number after '####'",
        "{broken\n": "not valid JSON",
    }
    for text, message in cases.items():
        bad = tmp_path / "bad.jsonl"
        bad.write_text(text)
        with pytest.raises(PromptError, match=message):
            D.read_gsm8k(str(bad))


def test_parse_chain_and_documents(tmp_path):
    steps, final = D.parse_chain("Q: How many? \nA: 2 + 2 = 4.\nQ: Then?\nA: 4 * 3 = 12\nFinal answer: 12\nProblem: x")
    assert steps == [("How many?", "2 + 2 = 4."), ("Then?", "4 * 3 = 12")] and final == "12"
    assert D.parse_chain("Q: a\nA: b\n") == ([("a", "b")], None)
    assert D.normalize_number("It is 1,200.50 dollars") == "1200.5"
    train = D.synthetic(5, 0, D.TRAIN_TEMPLATES, "train")
    test = D.synthetic(2, 0, D.TEST_TEMPLATES, "test")
    cfg = {
        "run": {"output_dir": str(tmp_path)},
        "teacher_prompt": {"shots": 2},
        "build": {"chains": "teacher", "teacher_train_size": None},
    }
    prompts = pipeline.teacher_prompts(Codec(ByteTokenizer()), cfg, train, test)
    assert len(prompts) == 2 * (3 + 2) and prompts[0].text.endswith("Q:") and prompts[1].text.endswith("Final answer:")
    rows = {}
    for pr in prompts:  # a fake teacher: right on train problems 2 and 4, wrong elsewhere
        split, pid, kind = pr.key.split("/")
        prob = next(p for p in train + test if p.id == pid)
        right = pid in ("train2", "train4", "test0")
        final = prob.answer if right else "-1"
        chain = D.format_chain(prob, final=final)[len(f"Problem: {prob.question}\nQ:") :]
        rows[pr.id] = {"samples": [chain if kind == "chain" else f" {final}"]}
    summary = pipeline.write_documents(cfg, prompts, rows, train, test)
    assert summary["train_chains_kept"] == 2 and summary["train_chains_dropped"] == 1
    assert summary["teacher_direct_accuracy"] == 0.5 and summary["teacher_decomposition_accuracy"] == 0.5
    qg = open(tmp_path / "qg.txt").read().split("\n\n\n")
    assert len(qg) == 2 and qg[0].startswith("Problem: ") and qg[0].rstrip().endswith("Q: done")
    assert open(tmp_path / "answerer.txt").read().split("\n\n\n")[0] == D.format_chain(train[2]).strip()


_GSM = [  # two GSM8K socratic problems: the first is the few-shot example, the second a train problem
    {
        "question": "Ann has 3 red and 4 blue apples. She eats 2. How many are left?",
        "answer": "How many apples has Ann? ** 3 + 4 = <<3+4=7>>7\nHow many are left? ** 7 - 2 = <<7-2=5>>5\n#### 5",
    },
    {
        "question": "Ben reads 6 pages a day for 5 days and then 4 more. How many pages?",
        "answer": "How many in 5 days? ** 6 * 5 = <<6*5=30>>30\nHow many in all? ** 30 + 4 = <<30+4=34>>34\n#### 34",
    },
    {
        "question": "Carla has 10 pens and gives away 3. How many are left?",
        "answer": "How many are left? ** 10 - 3 = 7\n#### 7",
    },
]


def _soc_config(tmp_path, records=None, overrides=()):
    from fastdistill.socratic.config import load_config

    over = [f"run.output_dir={tmp_path / 'out'}", "teacher_prompt.shots=1", "data.test_size=1", *overrides]
    if records is not None:
        gsm = tmp_path / "gsm.jsonl"
        gsm.write_text("".join(json.dumps(r) + "\n" for r in records))
        over.append(f"data.source={gsm}")
    return load_config(os.path.join(REPO, "configs", "socratic_synthetic.yaml"), over)


@pytest.mark.parametrize("mode", ["gold", "teacher_then_gold", "teacher"])
def test_gold_chains_give_the_documents_of_a_known_problem(tmp_path, mode):
    cfg = _soc_config(tmp_path, _GSM, [f"build.chains={mode}"])
    os.makedirs(cfg["run"]["output_dir"])
    train, test = pipeline.load_problems(cfg)  # the test split: the first problem; train: the other two
    assert [p.answer for p in train] == ["34", "7"] and [p.answer for p in test] == ["5"]
    pipeline.check_problems(cfg, train)
    prompts = pipeline.teacher_prompts(Codec(ByteTokenizer()), cfg, train, test)
    assert [p.key for p in prompts] == ["train/3/chain", "train/3/direct", "test/1/chain", "test/1/direct"]
    # a teacher whose only train chain is right, with other sub-questions than the gold ones; direct answers wrong
    teacher_chain = " How much is 10 - 3?\nA: 7.\nFinal answer: 7"
    rows = {0: {"samples": [teacher_chain]}, 1: {"samples": [" 8"]}, 2: {"samples": [" junk"]}, 3: {"samples": [" 5"]}}
    summary = pipeline.write_documents(cfg, prompts, rows, train, test)
    assert summary["chains"] == mode and summary["kept_rate"] == 1.0
    assert summary["teacher_direct_accuracy"] == 1.0 and summary["teacher_decomposition_accuracy"] == 0.0
    docs = {n: open(os.path.join(cfg["run"]["output_dir"], f"{n}.txt")).read() for n in pipeline.STUDENTS}
    ben_qg = "Problem: Ben reads 6 pages a day for 5 days and then 4 more. How many pages?\nQ: How many in 5 days?\n"
    ben_qg += "Q: How many in all?\nQ: done"
    ben_chain = (
        "Problem: Ben reads 6 pages a day for 5 days and then 4 more. How many pages?\nQ: How many in 5 days?\n"
        "A: 6 * 5 = 30\nQ: How many in all?\nA: 30 + 4 = 34\nFinal answer: 34"
    )
    carla = "Problem: Carla has 10 pens and gives away 3. How many are left?"
    ben_direct = "Problem: Ben reads 6 pages a day for 5 days and then 4 more. How many pages?\nFinal answer: 34"
    if mode == "gold":  # every train problem's own decomposition, the few-shot example too
        assert docs["qg"] == f"{ben_qg}\n\n\n{carla}\nQ: How many are left?\nQ: done\n"
        assert docs["answerer"] == f"{ben_chain}\n\n\n{carla}\nQ: How many are left?\nA: 10 - 3 = 7\nFinal answer: 7\n"
        assert docs["direct"] == f"{ben_direct}\n\n\n{carla}\nFinal answer: 7\n"
        assert summary["socratic_documents_from"] == {"teacher": 0, "gold": 2}
    elif mode == "teacher_then_gold":  # the teacher's kept chain for Carla, gold for Ben (never prompted)
        assert docs["qg"] == f"{ben_qg}\n\n\n{carla}\nQ: How much is 10 - 3?\nQ: done\n"
        assert docs["answerer"].endswith(f"{carla}\nQ: How much is 10 - 3?\nA: 7.\nFinal answer: 7\n")
        assert docs["direct"] == f"{ben_direct}\n\n\n{carla}\nFinal answer: 7\n"
        assert summary["socratic_documents_from"] == {"teacher": 1, "gold": 1}
    else:  # only the teacher's kept chain; its direct answer was wrong: no direct document
        assert docs["qg"] == f"{carla}\nQ: How much is 10 - 3?\nQ: done\n" and docs["direct"] == "\n"
        assert summary["socratic_documents_from"] == {"teacher": 1, "gold": 0}


def test_chain_option_errors(tmp_path):
    from fastdistill.generate.run import ResumeError
    from fastdistill.train.config import ConfigError

    with pytest.raises(ConfigError, match=r"build.chains: got 'silver'; expected one of \['teacher', 'gold'"):
        _soc_config(tmp_path, None, ["build.chains=silver"])
    with pytest.raises(ConfigError, match="build.teacher_train_size: got -1"):
        _soc_config(tmp_path, None, ["build.teacher_train_size=-1"])
    # GSM8K answers without sub-questions ("#### N" only): gold chains need them, teacher chains only for the shots
    bare = [_GSM[0], _GSM[1], {"question": "Dev has 2 cats and 3 dogs. How many pets?", "answer": "#### 5"}]
    for mode in ("gold", "teacher_then_gold"):
        cfg = _soc_config(tmp_path, bare, [f"build.chains={mode}"])
        with pytest.raises(PromptError, match=rf"build.chains: {mode} needs .* 1 of 2 problems .* \(first: id '3'\)"):
            pipeline.check_problems(cfg, pipeline.load_problems(cfg)[0])
    cfg = _soc_config(tmp_path, bare, ["build.chains=teacher"])
    pipeline.check_problems(cfg, pipeline.load_problems(cfg)[0])  # the bare problem is not a few-shot example
    cfg = _soc_config(tmp_path, [bare[0], bare[2], bare[1]], ["build.chains=teacher"])
    with pytest.raises(PromptError, match=r"teacher_prompt.shots needs .*#### answer'$"):
        pipeline.check_problems(cfg, pipeline.load_problems(cfg)[0])
    # a run folder whose teacher rows were made for other problems is refused, the same settings resume
    folder = str(tmp_path / "out" / "teacher")
    pipeline._check_teacher_folder(folder, _soc_config(tmp_path))
    pipeline._check_teacher_folder(folder, _soc_config(tmp_path, None, ["build.chains=gold"]))  # documents only
    with pytest.raises(ResumeError, match=r"different \['data', 'teacher_train_size'\]"):
        pipeline._check_teacher_folder(
            folder, _soc_config(tmp_path, None, ["data.train_size=9", "build.teacher_train_size=2"])
        )
    # a student trained on other documents (build.chains changed) is refused, not resumed
    doc, student = tmp_path / "qg.txt", str(tmp_path / "students" / "qg")
    doc.write_text("Problem: a\nQ: done\n")
    pipeline._check_student_documents(str(doc), student)
    pipeline._check_student_documents(str(doc), student)
    doc.write_text("Problem: b\nQ: done\n")
    with pytest.raises(ResumeError, match="trained on other documents"):
        pipeline._check_student_documents(str(doc), student)


def test_socratic_alternation_on_tiny_models():
    torch.manual_seed(0)
    cfg = transformers.AutoConfig.for_model(
        "llama",
        vocab_size=256,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=1024,
    )
    qg = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    answerer = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    problems = D.synthetic(3, 0, D.TEST_TEMPLATES, "test")
    res = pipeline.socratic_accuracy(qg, answerer, Codec(ByteTokenizer()), problems, max_steps=2, max_new_tokens=6)
    assert 0 <= res["accuracy"] <= 1 and 0 <= res["mean_steps"] <= 2
    direct = pipeline.direct_accuracy(qg, Codec(ByteTokenizer()), problems, problems[:1], 4)
    assert 0 <= direct["accuracy"] <= 1 and len(direct["outputs"]) == len(problems)
    assert len(res["outputs"]) == len(problems) and all(len(o["questions"]) <= 2 for o in res["outputs"])


@pytest.mark.cpu_only
@pytest.mark.slow
def test_teacher_stage_on_a_tiny_random_teacher(tmp_path):
    import yaml

    torch.manual_seed(0)
    teacher = transformers.AutoModelForCausalLM.from_config(
        transformers.AutoConfig.for_model(
            "llama",
            vocab_size=256,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            max_position_embeddings=4096,
        )
    )
    teacher.save_pretrained(str(tmp_path / "teacher"))
    cfg = yaml.safe_load(open(os.path.join(REPO, "configs", "socratic_synthetic.yaml")))
    cfg["run"] = {"output_dir": str(tmp_path / "out"), "seed": 0, "threads": 1}
    cfg["teacher"] = {"model": str(tmp_path / "teacher"), "deepspeed": {"stage": 0}}
    cfg["tokenizer"] = "bytes"
    cfg["data"].update(train_size=4, test_size=2)
    cfg["teacher_prompt"] = {"shots": 1}
    cfg["sampling"]["max_new_tokens"] = 8
    cfg["student"]["train"]["student"]["init_from_teacher"] = {"layers": [0]}
    cfg["logging"] = {"progress_bar": False}
    path = tmp_path / "soc.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    proc = run([sys.executable, "-m", "fastdistill.socratic", "build", "--config", str(path)])
    check(proc)
    summary = json.load(open(tmp_path / "out" / "teacher_summary.json"))
    assert summary["train_chains_kept"] + summary["train_chains_dropped"] == 3  # 4 train problems, 1 is the shot
    assert summary["test_problems"] == 2
    chains = [json.loads(x) for x in open(tmp_path / "out" / "chains.jsonl")]
    assert len(chains) == 2 * (3 + 2)
    # the kept chains are exactly the correct ones
    assert summary["train_chains_kept"] == sum(
        c["correct"] for c in chains if c["split"] == "train" and c["kind"] == "chain"
    )
    _ = Prompt  # re-exported type used by the pipeline
