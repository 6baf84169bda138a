"""Multiple-choice benchmarks (minillm/bench.py, eval_model.py --bench): CSV and jsonl reading, the
prompt, letter-logit scoring against a hand computation, errors, the demo bench at chance for an untrained
model, and exam training lifting the letter score above chance."""
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from minillm.bench import (LETTERS, Question, build_prompt, chance_level, letter_token_ids, load_bench, load_dev,
                           next_token_logprobs, prompt_ids, read_csv_bench, score_bench, subject_names)
from minillm.checkpoint import save_checkpoint
from minillm.config import ModelConfig, TrainConfig
from minillm.data import DataError
from minillm.model import MiniLLM
from minillm.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[1]
DEMO_BENCH = ROOT / "dataset" / "demo" / "bench"
TOK = Tokenizer.load()


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return MiniLLM(ModelConfig.preset("debug", vocab_size=TOK.vocab_size)).eval()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt")
    save_checkpoint(out / "pretrain", tiny_model(), TOK, TrainConfig(data_path="dataset/demo/pretrain.jsonl"))
    save_checkpoint(out / "full_sft", tiny_model(), TOK,
                    TrainConfig(data_path="dataset/demo/sft.jsonl", save_weight="full_sft"))
    return out / "full_sft"


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def run_eval(*args):
    return subprocess.run([sys.executable, str(ROOT / "eval_model.py"), "--device", "cpu", *map(str, args)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)


# ---- scoring -------------------------------------------------------------------------------------

def test_letter_scores_equal_a_hand_computation():
    """The prediction is argmax over letters of log-sum-exp of the next-token log-probs of "X" and " X",
    at the prompt's last position, unchanged by right padding in a batch."""
    model = tiny_model(1)
    qs = [Question("t", "达卡亚的首都是哪里？", ["雅塔", "芬塔", "胡波", "塔哈"], 1, "q0"),
          Question("t", "Pick the capital of Loloia, a country with a long name.", ["Quizo", "Hufen", "Hupol", "Yagor"],
                   2, "q1"),
          Question("t", "Which?", ["x", "y", "z"], 0, "q2")]
    for chat in (True, False):
        report = score_bench(model, TOK, {"t": qs}, chat=chat, batch_size=3, progress=False)
        for q, (where, predicted, answer) in zip(qs, sorted(report.predictions)):
            ids = prompt_ids(TOK, build_prompt(q, [], "t"), chat)
            with torch.no_grad():
                logprobs = model(torch.tensor([ids]))[0, -1].double().log_softmax(-1)
            scores = []
            for letter in LETTERS[: len(q.choices)]:
                a, b = TOK.encode(letter)[0], TOK.encode(" " + letter)[0]
                scores.append(math_logaddexp(float(logprobs[a]), float(logprobs[b])))
            assert where == q.where and answer == q.answer
            assert predicted == max(range(len(scores)), key=scores.__getitem__)
        assert report.total == 3 and report.correct == sum(p == a for _, p, a in report.predictions)
    # batched (right-padded, last real position gathered) == one at a time
    batch = [prompt_ids(TOK, build_prompt(q, [], "t"), True) for q in qs]
    together = next_token_logprobs(model, batch, TOK.pad_id)
    for row, ids in enumerate(batch):
        alone = next_token_logprobs(model, [ids], TOK.pad_id)[0]
        assert torch.allclose(together[row], alone, atol=1e-5)


def math_logaddexp(x, y):
    import math
    m = max(x, y)
    return m + math.log(math.exp(x - m) + math.exp(y - m))


def test_letter_tokens_are_single_and_distinct():
    ids = letter_token_ids(TOK, 10)
    assert ids[0] == [TOK.encode("A")[0], TOK.encode(" A")[0]]
    assert all(forms for forms in ids)  # J: " J" is two pieces, "J" alone counts
    assert len({i for forms in ids for i in forms}) == sum(map(len, ids))


# ---- prompts -------------------------------------------------------------------------------------

def test_k_shot_prompt_follows_c_eval_and_uses_dev_examples_of_the_same_subject_and_language():
    val, _, split = load_bench(DEMO_BENCH)
    dev = load_dev(DEMO_BENCH)
    names = subject_names(DEMO_BENCH)
    assert split == "val" and names["capital"] == ("Capitals", "首都")
    zh = next(q for q in val["capital"] if q.lang == "zh")
    from minillm.bench import pick_shots
    shots = pick_shots(zh, dev["capital"], 3)
    assert len(shots) == 3 and all(s.lang == "zh" and s.subject == "capital" for s in shots)
    prompt = build_prompt(zh, shots, "首都")
    assert prompt.startswith("以下是中国关于首都考试的单项选择题，请选出其中的正确答案。\n\n")
    for s in shots:
        block = s.question + "".join(f"\n{L}. {c}" for L, c in zip("ABCD", s.choices))
        assert block + f"\n答案：{'ABCD'[s.answer]}\n\n" in prompt
    assert prompt.endswith(zh.question + "".join(f"\n{L}. {c}" for L, c in zip("ABCD", zh.choices)) + "\n答案：")
    assert prompt.count("答案：") == 4 and zh.question not in [s.question for s in shots]
    en = next(q for q in val["job"] if q.lang == "en")
    prompt = build_prompt(en, pick_shots(en, dev["job"], 2), "Jobs")
    assert prompt.startswith("The following are multiple choice questions (with answers) about Jobs.\n\n")
    assert prompt.count("\nAnswer: ") == 2 and prompt.endswith("\nAnswer:")
    assert build_prompt(en, [], "Jobs").count("Answer") == 1  # zero-shot: header + the question only


def test_chat_prompt_wraps_the_text_as_a_user_turn():
    q = Question("s", "Which?", ["a", "b", "c", "d"], 0)
    text = build_prompt(q, [], "s")
    assert prompt_ids(TOK, text, True) == TOK.render_prompt([{"role": "user", "content": text}])
    assert prompt_ids(TOK, text, False) == TOK.encode(text)


# ---- files ---------------------------------------------------------------------------------------

CEVAL_DEV = ('id,question,A,B,C,D,answer,explanation\n'
             '0,甲是____。,一,二,三,四,B,"1. 第一步\n2. 所以选B"\n'
             '1,"乙, 丙是____。",五,六,七,八,D,\n')
CEVAL_VAL = "id,question,A,B,C,D,answer\n0,丁是____。,一,二,三,四,C\n1,戊是____。,一,二,三,四,a\n"
CEVAL_TEST = "id,question,A,B,C,D\n0,己是____。,一,二,三,四\n"
CMMLU = ",Question,A,B,C,D,Answer\n0,肉牛屠宰后，哪个部位肉质较好,胸,腹,大腿,小腿,C\n1,下列哪个最高,甲,乙,丙,丁,D\n"


def test_c_eval_layout_with_explanations_and_a_test_split_without_answers(tmp_path):
    write(tmp_path / "dev" / "law_dev.csv", CEVAL_DEV)
    write(tmp_path / "val" / "law_val.csv", CEVAL_VAL)
    write(tmp_path / "test" / "law_test.csv", CEVAL_TEST)
    dev = read_csv_bench(tmp_path / "dev" / "law_dev.csv", "law")
    assert [(q.question, q.answer) for q in dev] == [("甲是____。", 1), ("乙, 丙是____。", 3)]
    assert dev[1].where.endswith("law_dev.csv:4")  # the multi-line explanation ends on line 3
    val, skipped, split = load_bench(tmp_path)
    assert split == "val" and skipped == 0 and [q.answer for q in val["law"]] == [2, 0]
    test, skipped, split = load_bench(tmp_path, "test")
    assert split == "test" and test == {} and skipped == 1


def test_cmmlu_layout_with_an_index_column_defaults_to_test(tmp_path):
    write(tmp_path / "dev" / "agronomy.csv", CMMLU)
    write(tmp_path / "test" / "agronomy.csv", CMMLU.replace("肉牛", "羊"))
    questions, skipped, split = load_bench(tmp_path)
    assert split == "test" and skipped == 0
    q = questions["agronomy"][0]
    assert q.question.startswith("羊") and q.choices == ["胸", "腹", "大腿", "小腿"] and q.answer == 2
    assert list(load_dev(tmp_path)) == ["agronomy"]
    flat = tmp_path / "flat"
    write(flat / "agronomy.csv", CMMLU)
    questions, _, split = load_bench(flat)  # one folder of subject files
    assert split is None and len(questions["agronomy"]) == 2


@pytest.mark.parametrize("text, message", [
    ("id,question,A,B,C,answer\n0,q,a,b,c,A\n", r"bad\.csv:1: the header lacks column D"),
    ("id,question,A,B,C,D,answer\n0,q,a,b,c,d,A\n1,q,a,b,c,d,E\n", r"bad\.csv:3: row 2: answer 'E' is not one of A, B, C, D"),
    ("", r"bad\.csv: empty file"),
    ("id,question,A,B,C,D,answer\n0,q,a,b,,d,A\n", r"bad\.csv:2: row 1: option C is empty"),
    ("id,question,A,B,C,D,answer\n0,q,a,b,c,A\n", r"bad\.csv:2: row 1 has 6 fields, the header 7"),
])
def test_bad_csv_names_the_file_and_row(tmp_path, text, message):
    path = write(tmp_path / "bad.csv", text)
    with pytest.raises(DataError, match=message):
        load_bench(path)


@pytest.mark.parametrize("text, message", [
    ("id,question,A,B,C,answer\n0,q,a,b,c,A\n", "the header lacks column D"),
    ("id,question,A,B,C,D,answer\n0,q,a,b,c,d,E\n", "row 1: answer 'E' is not one of A, B, C, D"),
])
def test_bad_csv_exits_2_with_one_error_line(tmp_path, checkpoint, text, message):
    path = write(tmp_path / "val" / "bad_val.csv", text)
    r = run_eval("--checkpoint", checkpoint, "--bench", tmp_path)
    assert r.returncode == 2, r.stderr
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: ") and "Traceback" not in r.stderr
    assert str(path) in r.stderr and message in r.stderr


def test_jsonl_format_letters_and_indexes(tmp_path):
    rows = [{"question": "2 + 2 = ?", "choices": ["3", "4"], "answer": "B"},
            {"question": "Color of the sky?", "choices": ["red", "green", "blue", "black", "white"], "answer": 2},
            {"question": "谁？", "choices": list("甲乙丙丁戊己庚辛壬癸"), "answer": "j", "subject": "names"}]
    path = write(tmp_path / "quiz.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    questions, skipped, _ = load_bench(path, fmt="jsonl")
    assert [q.answer for q in questions["quiz"]] == [1, 2] and questions["names"][0].answer == 9
    assert chance_level(questions) == pytest.approx((1 / 2 + 1 / 5 + 1 / 10) / 3)
    report = score_bench(tiny_model(), TOK, questions, progress=False)
    assert report.total == 3 and all(0 <= p < 10 for _, p, _ in report.predictions)
    assert "A. 甲" in build_prompt(questions["names"][0], [], "names") and "\nJ. 癸\n答案：" in \
        build_prompt(questions["names"][0], [], "names")
    bad = write(tmp_path / "bad.jsonl", json.dumps({"question": "q", "choices": ["only"], "answer": "A"}) + "\n"
                + json.dumps({"question": "q", "choices": ["a", "b"], "answer": "C"}) + "\n")
    with pytest.raises(DataError, match=r"bad\.jsonl:1: .*give 2 to 10"):
        load_bench(bad, fmt="jsonl")
    write(bad, json.dumps({"question": "q", "choices": ["a", "b"], "answer": "C"}) + "\n")
    with pytest.raises(DataError, match=r"bad\.jsonl:1: answer 'C' is not one of A, B"):
        load_bench(bad, fmt="jsonl")


# ---- the demo bench ------------------------------------------------------------------------------

def test_untrained_model_scores_near_chance_on_the_demo_bench():
    """The correct letters are balanced per subject, so a model that always picks one letter (what
    an untrained one tends to do) scores about 25%."""
    questions, skipped, _ = load_bench(DEMO_BENCH)
    assert skipped == 0 and sum(map(len, questions.values())) >= 80 and chance_level(questions) == 0.25
    for seed in (0, 1):
        report = score_bench(tiny_model(seed), TOK, questions, load_dev(DEMO_BENCH), shots=3,
                             names=subject_names(DEMO_BENCH), progress=False)
        assert 0.12 <= report.accuracy <= 0.40, report.to_json()["overall"]


def test_exam_training_lifts_the_letter_score_on_questions_phrased_anew():
    """A model trained a few seconds on exam rows (the bench's own chat prompt, the reply the answer's
    letter) scores clearly above chance on the same questions in a phrasing it never saw; untrained,
    about 25%. So the letter scorer measures what training taught, through the same prompt builder,
    chat rendering and letter tokens. This 70k-parameter model learns each question's letter (the
    options keep their order, as in a fixed exam), not which option holds the answer: the 3M demo
    model does not learn that either (README: benchmark scores)."""
    rng = random.Random(0)
    syllables = ["ka", "lo", "ve", "ri", "ta", "sen", "mor", "da", "li", "na", "bel", "tor", "zan", "mi", "ra", "fen"]
    names = []
    while len(names) < 24:
        name = "".join(rng.sample(syllables, 2)).capitalize()
        names += [name] if name not in names else []
    countries, cities = [n + "ia" for n in names[:16]], names[16:]
    capital = {c: cities[i % len(cities)] for i, c in enumerate(countries)}
    options = {}
    for i, c in enumerate(countries):  # four choices, the answer at a balanced letter
        wrong = rng.sample([x for x in cities if x != capital[c]], 3)
        options[c] = (wrong[: i % 4] + [capital[c]] + wrong[i % 4:], i % 4)

    def asked(phrasing):
        return [Question("capital", phrasing.format(c), *options[c]) for c in countries]

    train = [q for p in ["Which city is the capital of {}?", "What is the capital of {}?", "Name the capital of {}.",
                         "{} has which capital?"] for q in asked(p)]
    held_out = {"capital": asked("Pick the capital city of {} from the options below.")}
    model = tiny_model(0).train()
    assert score_bench(model, TOK, held_out, progress=False).accuracy <= 0.375  # chance: 25%
    prompts = [prompt_ids(TOK, build_prompt(q, [], "Capitals"), True) for q in train]
    letters = torch.tensor([TOK.encode(LETTERS[q.answer])[0] for q in train])  # the reply: one token
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(60):  # the loss on the reply only: the log-prob of the letter after the prompt
        loss = -next_token_logprobs(model, prompts, TOK.pad_id)[torch.arange(len(train)), letters].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss < 0.5
    assert score_bench(model, TOK, held_out, progress=False).accuracy >= 0.5  # 8 of 16: p < 0.03 by chance


def test_eval_model_bench_prints_a_table_and_writes_json(tmp_path, checkpoint):
    out = tmp_path / "scores.json"
    r = run_eval("--checkpoint", checkpoint, "--bench", DEMO_BENCH, "--shots", "1", "--bench_out", out)
    assert r.returncode == 0, r.stderr
    assert "1-shot, chat prompts, letter scoring; chance 25.0%" in r.stdout and "(val)" in r.stdout
    doc = json.loads(out.read_text(encoding="utf-8"))
    assert sorted(doc) == sorted(["capital", "language", "river", "job", "hometown", "color", "food", "overall"])
    assert doc["overall"]["total"] == sum(v["total"] for k, v in doc.items() if k != "overall")
    for subject, v in doc.items():
        assert f"{subject} " in r.stdout and v["accuracy"] == pytest.approx(v["correct"] / v["total"])
    assert "user>" not in r.stdout and "held-out" not in r.stdout  # --bench replaces the auto-test
    r = run_eval("--checkpoint", checkpoint, "--bench", DEMO_BENCH, "--bench_split", "test")
    assert r.returncode == 2 and "has no test/ folder" in r.stderr


def test_pretrained_checkpoints_get_raw_prompts_unless_asked(checkpoint, tmp_path):
    quiz = write(tmp_path / "quiz.jsonl", json.dumps({"question": "q?", "choices": ["a", "b"], "answer": 0}) + "\n")
    pretrain = checkpoint.parent / "pretrain"
    for args, kind in ((["--checkpoint", pretrain], "raw"), (["--checkpoint", pretrain, "--bench_chat", "1"], "chat")):
        r = run_eval(*args, "--bench", quiz, "--bench_format", "jsonl")
        assert r.returncode == 0 and f"0-shot, {kind} prompts, letter scoring; chance 50.0%" in r.stdout, (args, r.stdout, r.stderr)


def test_text_scoring_sums_the_choice_tokens_log_probs(tmp_path):
    """--bench_score text: the prompt lists no options and the prediction is the choice whose tokens,
    appended after the cue, have the highest summed log-prob (checked by hand, unbatched)."""
    from minillm.bench import choice_ids, continuation_logprobs
    model = tiny_model(2)
    q = Question("t", "Pick the capital city of Dakaia from the options below.", ["Fenta", "Yata", "Hufen", "Pratem"],
                 0, "q")
    text = build_prompt(q, [], "Capitals", "text")
    assert text.endswith("options below.\nAnswer:") and "A. Fenta" not in text
    for chat in (False, True):
        ctx = prompt_ids(TOK, text, chat)
        conts = choice_ids(TOK, q, chat)
        assert conts[0] == TOK.encode(("" if chat else " ") + "Fenta")
        batched = continuation_logprobs(model, [ctx] * 4, conts, TOK.pad_id)
        by_hand = []
        for cont in conts:
            with torch.no_grad():
                lp = model(torch.tensor([ctx + cont]))[0].double().log_softmax(-1)
            by_hand.append(sum(float(lp[len(ctx) - 1 + i, t]) for i, t in enumerate(cont)))
        assert batched == pytest.approx(by_hand, abs=1e-4)
        report = score_bench(model, TOK, {"t": [q]}, chat=chat, score="text", progress=False)
        assert report.predictions == [("q", max(range(4), key=by_hand.__getitem__), 0)]


def test_prompts_fit_the_context_by_dropping_examples_then_old_tokens(tmp_path):
    torch.manual_seed(0)
    model = MiniLLM(ModelConfig.preset("debug", vocab_size=TOK.vocab_size, max_position_embeddings=96)).eval()
    long_dev = [Question("s", "word " * 30 + "?", ["a", "b", "c", "d"], 0, f"d{i}") for i in range(3)]
    short = Question("s", "Which one?", ["a", "b", "c", "d"], 1, "q0")
    huge = Question("s", "word " * 200 + "?", ["a", "b", "c", "d"], 2, "q1")
    report = score_bench(model, TOK, {"s": [short, huge]}, {"s": long_dev}, shots=3, progress=False)
    assert report.total == 2 and report.shots_dropped >= 3 and report.truncated == 1
    with pytest.raises(Exception, match="--shots 2 takes examples from the dev split, which has none for s"):
        score_bench(model, TOK, {"s": [short]}, {}, shots=2, progress=False)
