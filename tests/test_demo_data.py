"""The demo datasets in dataset/demo/: formats, held-out hygiene, and a reproducible generator."""
import importlib.util
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "dataset" / "demo"
TRAINING_FILES = ["pretrain", "sft", "lora_medical", "lora_identity", "dpo", "r1", "rlaif",  # rlaif: RL prompts
                  "sft_tools"]  # tool use; its held-out set and facts.json: tests/test_tool_demo.py
HELDOUT_FILES = ["heldout_sft", "heldout_medical", "heldout_identity", "heldout_dpo", "heldout_reason"]
THINK_FORMAT = re.compile(r"<think>\n.+\n</think>\n<answer>\n.+\n</answer>", re.S)


def load_generator():
    spec = importlib.util.spec_from_file_location("make_demo_data", ROOT / "scripts" / "make_demo_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def read(name):
    with open(DEMO / f"{name}.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def strings(row):
    """Every text a training row holds."""
    if "text" in row:
        return [row["text"]]
    messages = row.get("conversations", []) + row.get("chosen", []) + row.get("rejected", [])
    return [m[k] for m in messages for k in ("content", "reasoning_content") if k in m]


def all_text(names):
    return "\n".join(s for name in names for row in read(name) for s in strings(row))


def check_messages(messages):
    assert messages and all(m["role"] in ("system", "user", "assistant") for m in messages)
    assert all(isinstance(m["content"], str) and m["content"] for m in messages)
    assert messages[-1]["role"] == "assistant"
    assert all(m["role"] == "system" for m in messages[:1]) or messages[0]["role"] == "user"


def test_total_size_is_small():
    assert sum(p.stat().st_size for p in DEMO.glob("*.jsonl")) < 4_500_000


def test_pretrain_rows():
    rows = read("pretrain")
    assert len(rows) > 1000 and all(isinstance(r["text"], str) and r["text"] for r in rows)
    text = all_text(["pretrain"])
    assert re.search(r"[\u4e00-\u9fff]", text) and "The capital of" in text  # bilingual


@pytest.mark.parametrize("name", ["sft", "lora_medical", "lora_identity", "r1"])
def test_chat_files_have_valid_conversations(name):
    rows = read(name)
    assert len(rows) >= 100
    for row in rows:
        check_messages(row["conversations"])


def exam_turns():
    """(user turn, reply) of every sft.jsonl turn in the bench's exam layout."""
    from minillm.bench import CUES, HEADERS
    starts = tuple(h.split("{subject}")[0] for h in HEADERS.values())
    turns = []
    for row in read("sft"):
        messages = [m for m in row["conversations"] if m["role"] != "system"]
        for ask, reply in zip(messages[::2], messages[1::2]):
            if ask["content"].startswith(starts):
                assert ask["content"].endswith(tuple(CUES.values())), ask["content"]
                turns.append((ask["content"], reply["content"]))
    return turns


def parse_exam(text):
    """An exam turn -> (subject name, [(question, answer or None)]), solved examples first."""
    from minillm.bench import CUES
    header, body = text.split("\n\n", 1)
    blocks = []
    for block in body.split("\n\n"):
        question, cue = block.split("\n")
        cue_word = next(c.strip() for c in CUES.values() if cue.startswith(c.strip()))
        blocks.append((question, cue[len(cue_word):].strip() or None))
    subject = header.split("about ")[-1].rstrip(".") if header.startswith("The") else header.split("关于")[1].split("考试")[0]
    return subject, blocks


def test_sft_exam_rows_use_the_bench_cloze_prompt_about_trained_entities():
    """Exam-format SFT turns: exactly the prompt minillm.bench builds for text scoring (a solved example
    included), the reply the answer's text, only trained entities asked, each subject in both languages."""
    from minillm.bench import Question, build_prompt
    gen = load_generator()
    world = gen.make_world()
    held = {name for e in (e for _, e in world["heldout_facts"]) for name in (e["en"], e["zh"])}
    n, shots, headers = 0, 0, set()
    for text, reply in exam_turns():
        subject, blocks = parse_exam(text)
        rel = next(r for r, (en, zh) in gen.BENCH_SUBJECTS.items() if subject in (en, zh))
        lang = "zh" if "答案" in text else "en"
        assert blocks[-1][1] is None  # the last question is the one the reply answers
        questions = [Question(rel, q, [a], 0) for (q, _), a in zip(blocks, [a for _, a in blocks[:-1]] + [reply])]
        assert build_prompt(questions[-1], questions[:-1], subject, "text") == text  # the bench's own layout
        for q in questions:
            facts = [(r, e) for r, e in world["trained_facts"] if r == rel and e[lang] in q.question]
            assert len(facts) == 1 and not any(h in q.question for h in held), q.question  # one trained entity
            assert q.choices[0] == gen.fact_fields(facts[0], lang)["o"], (q.question, q.choices)
        n += 1
        shots += len(blocks) - 1
        headers.add(text.split("\n")[0])
    assert n >= 600 and 100 < shots < n  # some turns carry solved examples, as --shots builds them
    assert len(headers) == 14  # every subject's header, in both languages


def test_rlaif_prompts_have_checkable_answers_and_leave_the_heldout_sets_alone():
    """RL prompts: MiniMind's rlaif rows (read by minillm.rl), facts of trained entities only, two-step
    arithmetic that r1.jsonl never asks and heldout_reason keeps; some ask for steps."""
    from minillm.rl import PromptDataset
    from minillm.tokenizer import Tokenizer
    gen = load_generator()
    world = gen.make_world()
    rows = read("rlaif")
    assert 300 <= len(rows) <= 1000
    assert len(PromptDataset(DEMO / "rlaif.jsonl", Tokenizer.load(), max_prompt_len=128).prompts) == len(rows)
    held_names = {e[lang] for _, e in world["heldout_facts"] for lang in ("en", "zh")}
    trained = {(gen.fact_fields(f, lang)["o"], lang) for f in world["trained_facts"] for lang in ("en", "zh")}
    r1_problems = gen.asked_problems(read("r1"))
    assert len(r1_problems) > 1000  # the parser finds r1's problems
    heldout = set(world["heldout_arith"])
    langs, arith, steps = set(), 0, 0
    for row in rows:
        assert [m["role"] for m in row["conversations"]] == ["user", "assistant"]
        assert row["conversations"][1]["content"] == "" and row["answer"]
        prompt = row["conversations"][0]["content"]
        lang = "zh" if re.search(r"[\u4e00-\u9fff]", prompt) else "en"
        langs.add(lang)
        assert not any(name in prompt for name in held_names), prompt
        problems = gen.asked_problems([row])
        if problems:
            (p,) = problems
            arith += 1
            assert str(gen.solve(p)) == row["answer"] and p[2] >= 10 and p[2] % 10, row  # two reasoning steps
            assert p not in r1_problems and p not in heldout, row
            steps += any(s in prompt for s in gen.STEP_BY_STEP[lang])
        else:
            assert (row["answer"], lang) in trained, row
    assert langs == {"en", "zh"} and 0.3 < arith / len(rows) < 0.7 and steps >= 50


def test_sft_has_multi_turn_and_system_prompts():
    rows = read("sft")
    assert sum(len(r["conversations"]) > 3 for r in rows) > 100
    assert sum(r["conversations"][0]["role"] == "system" for r in rows) > 100


def test_r1_rows_use_both_reasoning_forms():
    split = inline = 0
    for row in read("r1"):
        reply = row["conversations"][-1]
        if "reasoning_content" in reply:
            split += 1
            assert reply["reasoning_content"] and "<think>" not in reply["content"]
        else:
            inline += 1
            assert THINK_FORMAT.fullmatch(reply["content"]), reply["content"]
    assert 0.1 < split / (split + inline) < 0.3


def test_dpo_pairs_share_the_prompt_and_differ_in_the_reply():
    rows = read("dpo")
    assert len(rows) >= 500
    for row in rows:
        check_messages(row["chosen"])
        check_messages(row["rejected"])
        assert row["chosen"][:-1] == row["rejected"][:-1]
        assert row["chosen"][-1]["content"] != row["rejected"][-1]["content"]


@pytest.mark.parametrize("name", HELDOUT_FILES)
def test_heldout_rows_are_answerable_and_unseen(name):
    rows = read(name)
    assert 40 <= len(rows) <= 120
    training_text = all_text(TRAINING_FILES)
    for row in rows:
        assert row["lang"] in ("en", "zh") and row["question"] and row["answer"]
        assert row["question"] not in training_text, f"{name}: question seen in training: {row['question']}"
        if name == "heldout_dpo":
            assert row["answer"] in row["chosen"] and row["answer"] not in row["rejected"]


def test_heldout_sft_facts_are_in_pretrain_prose():
    pretrain = all_text(["pretrain"])
    for row in read("heldout_sft"):
        assert row["answer"] in pretrain


def test_medical_facts_only_in_lora_medical():
    """Pretraining may name a fictional disease or medicine (so their tokens are trained), but no
    document outside lora_medical.jsonl links a disease to its treatment or its symptom."""
    world = load_generator().make_world()
    general = [s for name in ["pretrain", "sft", "dpo", "r1", "lora_identity"] for row in read(name) for s in strings(row)]
    medical = all_text(["lora_medical"])
    for d in world["diseases"]:
        for i, lang in enumerate(("en", "zh")):
            for rel in ("treatment", "symptom"):
                obj = d[rel][i]
                assert d[lang] in medical and obj in medical
                linked = [doc for doc in general if d[lang] in doc and obj in doc]
                assert not linked, f"{d[lang]} and its {rel} {obj} appear together outside lora_medical: {linked[0]}"


def test_heldout_arithmetic_never_trained():
    gen = load_generator()
    training_text = all_text(TRAINING_FILES)
    for a, op, b in gen.make_world()["heldout_arith"]:
        zh_op = "加" if op == "+" else "减"
        # as an equation ("16 + 42 =", a reasoning line "16 + 42:") or in Chinese ("16加42等于")
        for form in (f"{a} {op} {b} =", f"{a} {op} {b}:", f"{a}{zh_op}{b}等于"):
            if form in training_text:  # cheap filter; then rule out "116 + 42 =" style false hits
                assert not re.search(r"(?<!\d)" + re.escape(form), training_text), form


def test_generator_is_deterministic_and_matches_committed_files(tmp_path):
    written = load_generator().main(tmp_path)
    assert sorted(written) == sorted(TRAINING_FILES + HELDOUT_FILES + ["heldout_tools"])
    for name, path in written.items():
        assert path.read_bytes() == (DEMO / f"{name}.jsonl").read_bytes(), \
            f"{name}.jsonl differs: rerun `python scripts/make_demo_data.py` and commit the result"


def test_fine_tuning_replies_use_tokens_that_pretraining_trained():
    """A reply token that never occurs in the pretraining corpus keeps its initial embedding, and with
    tied embeddings pretraining pushes its logit far down: fine-tuning then starts from a loss above
    ln(vocab) (a 6400-piece tokenizer on this corpus made LoRA's loss start at 10.8). The shipped
    tokenizer and corpus must keep such tokens rare in every reply."""
    from collections import Counter

    from minillm.tokenizer import Tokenizer

    tok = Tokenizer.load()
    seen = Counter(i for row in read("pretrain") for i in tok.encode(row["text"]))
    for i in tok.special_ids.values():  # chat and think tags: fine-tuning is where they are learned
        seen[i] = 3
    for name in ["sft", "lora_medical", "lora_identity", "dpo", "r1"]:
        replies = [m["content"] for row in read(name)
                   for m in row.get("conversations", []) + row.get("chosen", []) + row.get("rejected", [])
                   if m["role"] == "assistant"]
        ids = [i for text in replies for i in tok.encode(text)]
        untrained = Counter(i for i in ids if seen[i] < 3)
        share = sum(untrained.values()) / len(ids)
        assert share < 0.03, (name, share, [tok.sp.id_to_piece(i) for i, _ in untrained.most_common(5)])


def test_regenerating_never_replaces_edited_data_without_the_flag(tmp_path):
    gen = load_generator()
    gen.main(tmp_path)
    edited = tmp_path / "sft.jsonl"
    edited.write_text('{"conversations": [{"role": "user", "content": "mine"}]}\n', encoding="utf-8")
    with pytest.raises(SystemExit, match="--overwrite 1"):
        gen.main(tmp_path)
    assert "mine" in edited.read_text(encoding="utf-8")
    gen.main(tmp_path, overwrite=True)
    assert edited.read_bytes() == (DEMO / "sft.jsonl").read_bytes()


# ---- the multiple-choice bench (dataset/demo/bench/, C-Eval's layout) ----------------------------

def bench_rows(split):
    import csv
    rows = {}
    for path in sorted((DEMO / "bench" / split).glob(f"*_{split}.csv")):
        with open(path, encoding="utf-8", newline="") as f:
            rows[path.name[: -len(f"_{split}.csv")]] = list(csv.DictReader(f))
    return rows


def test_bench_files_are_reproduced_byte_for_byte(tmp_path):
    gen = load_generator()
    gen.main(tmp_path)
    expected = sorted(p.relative_to(DEMO).as_posix() for p in (DEMO / "bench").rglob("*") if p.is_file())
    assert sorted(gen.bench_files()) == expected
    for rel in expected:
        assert (tmp_path / rel).read_bytes() == (DEMO / rel).read_bytes(), \
            f"{rel} differs: rerun `python scripts/make_demo_data.py` and commit the result"


def test_bench_questions_are_phrased_as_in_no_training_file():
    training_text = all_text(TRAINING_FILES)
    heldout_text = "\n".join(row["question"] for name in HELDOUT_FILES for row in read(name))
    gen = load_generator()
    for split in ("dev", "val"):
        for subject, rows in bench_rows(split).items():
            for row in rows:
                assert row["question"] not in training_text and row["question"] not in heldout_text, row
            # the template itself (the question without its entity name) never occurs either
            for template in gen.BENCH_QUESTIONS[subject]:
                for piece in template.split("{s}"):
                    if len(piece.strip("，？?. ")) >= 6:
                        assert piece not in training_text, (subject, piece)


def test_bench_choices_are_of_one_kind_with_balanced_letters_and_dev_apart_from_val():
    world = load_generator().make_world()
    gen = load_generator()
    dev, val = bench_rows("dev"), bench_rows("val")
    assert sorted(dev) == sorted(val) == sorted(gen.BENCH_QUESTIONS)
    assert all("explanation" in rows[0] for rows in dev.values())
    for subject, rows in val.items():
        counts = [sum(r["answer"] == letter for r in rows) for letter in "ABCD"]
        assert max(counts) - min(counts) <= 1, (subject, counts)  # a constant guess scores ~25%
        dev_questions = {r["question"] for r in dev[subject]}
        for row in rows:
            choices = [row[letter] for letter in "ABCD"]
            lang = "zh" if re.search(r"[\u4e00-\u9fff]", row["question"]) else "en"
            pool = gen.bench_options(world, subject, lang)
            assert len(set(choices)) == 4 and set(choices) <= set(pool), row
            assert row["question"] not in dev_questions
    assert sum(map(len, val.values())) >= 80 and all(len(rows) == 6 for rows in dev.values())
    overall = [sum(r["answer"] == letter for rows in val.values() for r in rows) for letter in "ABCD"]
    assert max(overall) - min(overall) <= 1, overall  # and so is the whole split
