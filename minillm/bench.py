"""Multiple-choice benchmarks (C-Eval / CMMLU CSVs, or simple jsonl) scored by letter log-probs.

    questions, skipped = load_bench("ceval-exam", split="val")        # {subject: [Question]}
    dev = load_bench("ceval-exam", split="dev")[0]                    # k-shot examples, same subjects
    report = score_bench(model, tok, questions, dev, shots=5, chat=True)
    print(format_report(report))                                      # per-subject and overall accuracy

Files. CSV, one subject per file, header names matched case-insensitively:
    C-Eval  id,question,A,B,C,D,answer[,explanation]   <split>/<subject>_<split>.csv (test: no answer column)
    CMMLU   ,Question,A,B,C,D,Answer                    <split>/<subject>.csv (first column: an unnamed index)
laid out as dev/ val/ test/ folders, or as one folder of subject files (no dev split: zero-shot only),
or a single file. jsonl (`--bench_format jsonl`): one row per line, {"question", "choices": [2-10
strings], "answer": "B" or 1 (0-based index)}, optional "subject"; same layouts with .jsonl files.
Rows without an answer (C-Eval's test split) are skipped and counted.

Prompt (one builder, `build_prompt`): C-Eval's, in Chinese when the question holds CJK characters:
    以下是中国关于{subject}考试的单项选择题，请选出其中的正确答案。\\n\\n
    {example question}\\nA. ..\\nB. ..\\nC. ..\\nD. ..\\n答案：{letter}\\n\\n      (k examples from dev)
    {question}\\nA. ..\\nB. ..\\nC. ..\\nD. ..\\n答案：
else MMLU's English one: "The following are multiple choice questions (with answers) about {subject}.",
the same blocks, "Answer: {letter}" in examples, ending "Answer:". The subject's display name comes
from a C-Eval `subject_mapping.json` ({"file_name": [English, 中文, category]}) in the bench folder when
there is one, else from the file name (underscores as spaces). Examples are the first k dev rows of
the same subject, in the question's language when the dev split has enough of them. Chat mode puts
the whole prompt in one user turn followed by the assistant header (lm-eval's --apply_chat_template
without multi-turn few-shot); raw mode feeds the text itself.

Scoring (lm-eval's multiple_choice for single-token letter choices): one forward pass over the
prompt; at its last position the log-softmax over the vocabulary; the prediction is the letter with
the highest log-prob. A letter may be written as its own piece ("A", how it follows "答案：" and starts
a reply with our SentencePiece model, which adds no dummy prefix) or with a leading space ("▁A", how it
follows "Answer:"); both single-token forms count: a letter's score is the log-sum-exp of their
log-probs, i.e. the probability that the next token is that letter either way. A tokenizer with no
single-token form of a letter is refused. `score="text"` (--bench_score text) scores each choice's
own text instead: the prompt lists no options, and the choice whose tokens have the highest summed
log-prob after the cue wins (lm-eval's `acc` on cloze-style tasks).

Batches are right-padded and the last real position of each row gathered: the model is causal, so
padding after a prompt changes nothing before it. A prompt longer than the model's context loses its
last examples first, then its oldest tokens (both counted in the report).
"""
from __future__ import annotations

import csv
import io
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from minillm.data import DataError, read_jsonl
from minillm.errors import NotFound, UserError
from minillm.model import eval_mode
from minillm.preference import sequence_logprobs

LETTERS = "ABCDEFGHIJ"
SPLITS = ("dev", "val", "test")
CJK = re.compile(r"[\u3400-\u9fff\uf900-\ufaff]")
HEADERS = {"zh": "以下是中国关于{subject}考试的单项选择题，请选出其中的正确答案。\n\n",
           "en": "The following are multiple choice questions (with answers) about {subject}.\n\n"}
CUES = {"zh": "\n答案：", "en": "\nAnswer:"}
ANSWER_SEP = {"zh": "", "en": " "}  # between the cue and the letter in a k-shot example


@dataclass
class Question:
    subject: str
    question: str
    choices: list[str]
    answer: int | None  # index into choices; None: no answer given (C-Eval's test split)
    where: str = ""     # "file:line", for messages

    @property
    def lang(self) -> str:
        return "zh" if CJK.search(self.question + "".join(self.choices)) else "en"


# ----------------------------------------------------------------------------------------------
# reading

def _letter_index(value, n_choices: int, where: str) -> int | None:
    """'B' / 'b' / 1 -> 1; '' or None -> None (no answer); anything else a DataError."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    letters = LETTERS[:n_choices]
    if isinstance(value, bool):
        pass
    elif isinstance(value, int) and 0 <= value < n_choices:
        return value
    elif isinstance(value, str) and value.strip().upper() in letters and len(value.strip()) == 1:
        return letters.index(value.strip().upper())
    raise DataError(f"{where}: answer {value!r} is not one of {', '.join(letters)}"
                    f"{' (or an index 0-' + str(n_choices - 1) + ')' if not isinstance(value, str) else ''}")


def read_csv_bench(path, subject: str) -> list[Question]:
    """One C-Eval or CMMLU subject file (header case-insensitive; an unnamed first column is an index)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not valid UTF-8 (byte {e.start + 1}); save the file as UTF-8") from None
    if not text.strip():
        raise DataError(f"{path}: empty file; expected a header id,question,A,B,C,D,answer (C-Eval) or "
                        f",Question,A,B,C,D,Answer (CMMLU) and one question per row")
    reader = csv.reader(io.StringIO(text, newline=""))  # csv's own line handling: quoted newlines stay
    header = [h.strip().lower() for h in next(reader)]
    needed = ["question", "a", "b", "c", "d"]
    missing = [n for n in needed if n not in header]
    if missing:
        shown = ", ".join(n if n == "question" else n.upper() for n in missing)
        raise DataError(f"{path}:1: the header lacks column {shown} (has: {', '.join(header)}); expected "
                        f"id,question,A,B,C,D,answer (C-Eval) or ,Question,A,B,C,D,Answer (CMMLU)")
    col = {name: header.index(name) for name in needed + ["answer"] if name in header}
    rows, line = [], reader.line_num
    for n_row, fields in enumerate(reader, 1):
        start, line = line + 1, reader.line_num
        if not any(f.strip() for f in fields):
            continue  # a blank line
        where = f"{path}:{start}"
        if len(fields) < len(header):
            raise DataError(f"{where}: row {n_row} has {len(fields)} fields, the header {len(header)}: an option "
                            f"or the answer is missing (a comma inside a field needs \"quotes\")")
        choices = [fields[col[c]].strip() for c in "abcd"]
        for letter, choice in zip("ABCD", choices):
            if not choice:
                raise DataError(f"{where}: row {n_row}: option {letter} is empty")
        question = fields[col["question"]].strip()
        if not question:
            raise DataError(f"{where}: row {n_row}: the question is empty")
        answer = _letter_index(fields[col["answer"]], 4, f"{where}: row {n_row}") if "answer" in col else None
        rows.append(Question(subject, question, choices, answer, where))
    return rows


def _check_jsonl_row(obj: dict) -> None:
    choices = obj["choices"]
    if not 2 <= len(choices) <= len(LETTERS):
        raise ValueError(f'"choices" has {len(choices)} entries; give 2 to {len(LETTERS)}')
    for i, c in enumerate(choices):
        if not isinstance(c, str) or not c.strip():
            raise ValueError(f'choice {LETTERS[i]} must be a non-empty string')


def read_jsonl_bench(path, subject: str) -> list[Question]:
    """{"question", "choices": [...], "answer": "B" | 1[, "subject"]} rows."""
    rows = []
    for lineno, obj in read_jsonl(path, {"question": str, "choices": list}, check=_check_jsonl_row):
        where = f"{path}:{lineno}"
        answer = _letter_index(obj.get("answer"), len(obj["choices"]), where)
        rows.append(Question(str(obj.get("subject") or subject), obj["question"].strip(),
                             [c.strip() for c in obj["choices"]], answer, where))
    if not rows:
        raise DataError(f'{path}: empty file; give one {{"question", "choices": [...], "answer"}} object per line')
    return rows


def _subject_files(folder: Path, ext: str, split: str | None) -> dict[str, Path]:
    files = {}
    for p in sorted(folder.glob(f"*.{ext}")):
        name = p.stem
        if split and name.endswith(f"_{split}"):  # C-Eval: accountant_val.csv
            name = name[: -len(split) - 1]
        files[name] = p
    return files


def bench_files(root, split: str | None = None, fmt: str = "csv") -> tuple[str | None, dict[str, Path]]:
    """(split used, {subject: file}) for a bench folder or file. split None: val if there is a val/
    folder, else test, else the folder's own files."""
    root, ext = Path(root), fmt
    if root.is_file():
        return None, {root.stem: root}
    if not root.is_dir():
        raise NotFound(f"--bench {root} does not exist; pass a C-Eval/CMMLU folder (dev/ val/ test/ of "
                       f"<subject>.csv) or a folder or file of {ext} questions")
    if split is None:
        split = next((s for s in ("val", "test") if (root / s).is_dir()), None)
    if split is None:
        files = _subject_files(root, ext, None)
        if not files:
            raise UserError(f"--bench {root}: no dev/, val/ or test/ folder and no *.{ext} files in it")
        return None, files
    folder = root / split
    if not folder.is_dir():
        have = [s for s in SPLITS if (root / s).is_dir()]
        raise UserError(f"--bench_split {split}: {root} has no {split}/ folder (has: {', '.join(have) or 'none'})")
    files = _subject_files(folder, ext, split)
    if not files:
        raise UserError(f"--bench {root}: no *.{ext} files in {folder}")
    return split, files


def load_bench(root, split: str | None = None, fmt: str = "csv") -> tuple[dict[str, list[Question]], int, str | None]:
    """({subject: questions with an answer}, rows skipped for having none, split used)."""
    if fmt not in ("csv", "jsonl"):
        raise UserError(f"--bench_format {fmt}: use csv or jsonl")
    used, files = bench_files(root, split, fmt)
    read = read_csv_bench if fmt == "csv" else read_jsonl_bench
    by_subject, skipped = {}, 0
    for subject, path in files.items():
        for q in read(path, subject):
            if q.answer is None:
                skipped += 1
            else:
                by_subject.setdefault(q.subject, []).append(q)
    return by_subject, skipped, used


def load_dev(root, fmt: str = "csv") -> dict[str, list[Question]]:
    """The dev split's questions per subject ({} when the bench has no dev/ folder)."""
    root = Path(root)
    if not (root.is_dir() and (root / "dev").is_dir()):
        return {}
    return load_bench(root, "dev", fmt)[0]


def subject_names(root) -> dict[str, tuple[str, str]]:
    """{file subject: (English, Chinese)} from a C-Eval subject_mapping.json in the bench folder."""
    path = Path(root) / "subject_mapping.json"
    if not path.is_file():
        return {}
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not valid JSON ({e})") from None
    return {k: (v[0], v[1]) for k, v in doc.items() if isinstance(v, list) and len(v) >= 2}


# ----------------------------------------------------------------------------------------------
# prompts and scoring

def format_question(q: Question, lang: str, with_answer: bool, style: str = "letter") -> str:
    """style "letter": the question, its lettered options, the cue (and the answer's letter);
    "text": the question and the cue (and the answer's text), no options."""
    text = q.question
    if style == "letter":
        text += "".join(f"\n{LETTERS[i]}. {c}" for i, c in enumerate(q.choices))
    text += CUES[lang]
    if not with_answer:
        return text
    return text + ANSWER_SEP[lang] + (LETTERS[q.answer] if style == "letter" else q.choices[q.answer]) + "\n\n"


def build_prompt(q: Question, examples: list[Question], subject: str, style: str = "letter") -> str:
    """C-Eval's prompt (Chinese) or MMLU's (English), by the question's language; `examples` are
    the k shots, answers included. style "text" (--bench_score text) leaves the options out: the
    answer is then the choice's own text, scored as a continuation."""
    lang = q.lang
    return (HEADERS[lang].format(subject=subject) + "".join(format_question(e, lang, True, style) for e in examples)
            + format_question(q, lang, False, style))


def pick_shots(q: Question, dev: list[Question], k: int) -> list[Question]:
    """The first k dev questions, those in q's language first (so a bilingual set keeps one language)."""
    if k <= 0:
        return []
    same = [e for e in dev if e.lang == q.lang]
    other = [e for e in dev if e.lang != q.lang]
    return (same + other)[:k]


def letter_token_ids(tokenizer, n_letters: int = 4) -> list[list[int]]:
    """Per letter, its single-token forms: "A" and " A" (see the module docstring)."""
    ids = []
    for letter in LETTERS[:n_letters]:
        forms = []
        for text in (letter, " " + letter):
            enc = tokenizer.encode(text)
            if len(enc) == 1 and enc[0] not in forms:
                forms.append(enc[0])
        if not forms:
            raise UserError(f"the tokenizer has no single token for the answer letter {letter} (nor for ' {letter}'); "
                            f"letter scoring needs one")
        ids.append(forms)
    flat = [i for forms in ids for i in forms]
    if len(set(flat)) != len(flat):
        raise UserError("the tokenizer maps two answer letters to the same token; letter scoring needs distinct ones")
    return ids


def letter_scores(logprobs: torch.Tensor, letter_ids: list[list[int]]) -> torch.Tensor:
    """[B, V] next-token log-probs -> [B, n_letters]: log-sum-exp over each letter's forms."""
    return torch.stack([torch.logsumexp(logprobs[:, forms], dim=-1) for forms in letter_ids], dim=-1)


def prompt_ids(tokenizer, text: str, chat: bool) -> list[int]:
    return tokenizer.render_prompt(text) if chat else tokenizer.encode(text)


@torch.no_grad()
def _right_padded(seqs: list[list[int]], pad_id: int, fill=None) -> torch.Tensor:
    out = torch.full((len(seqs), max(map(len, seqs))), pad_id if fill is None else fill, dtype=torch.long)
    for row, seq in enumerate(seqs):
        out[row, : len(seq)] = torch.tensor(seq)
    return out


def next_token_logprobs(model, batch: list[list[int]], pad_id: int) -> torch.Tensor:
    """[B, V] log-softmax at each prompt's last position. Rows are right-padded: the model is causal,
    so padding after the last real token changes nothing before it, and that position is gathered."""
    device = next(model.parameters()).device
    lengths = torch.tensor([len(ids) for ids in batch], device=device)
    ids = _right_padded(batch, pad_id).to(device)
    rows = torch.arange(len(batch), device=device)
    if hasattr(model, "forward_hidden"):  # the head only at the gathered positions
        hidden, _ = model.forward_hidden(ids)
        logits = model.lm_head(hidden[rows, lengths - 1])
    else:
        logits = model(ids)[rows, lengths - 1]
    return logits.float().log_softmax(-1)


@dataclass
class BenchReport:
    by_subject: dict[str, tuple[int, int]] = field(default_factory=dict)  # subject -> (correct, total)
    skipped: int = 0            # rows without an answer
    shots_dropped: int = 0      # k-shot examples left out so a prompt fits the context
    truncated: int = 0          # prompts that lost their oldest tokens even with no examples
    predictions: list[tuple[str, int, int]] = field(default_factory=list)  # (where, predicted, answer)

    @property
    def correct(self) -> int:
        return sum(c for c, _ in self.by_subject.values())

    @property
    def total(self) -> int:
        return sum(n for _, n in self.by_subject.values())

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else 0.0

    def to_json(self) -> dict:
        doc = {s: {"correct": c, "total": n, "accuracy": c / n if n else 0.0}
               for s, (c, n) in sorted(self.by_subject.items())}
        doc["overall"] = {"correct": self.correct, "total": self.total, "accuracy": self.accuracy}
        return doc


def fit_prompt(tokenizer, q, shots, name, chat, limit, report, style="letter") -> list[int]:
    """The prompt ids, dropping the last examples (then the oldest tokens) until it fits `limit`."""
    shots = list(shots)
    while True:
        ids = prompt_ids(tokenizer, build_prompt(q, shots, name, style), chat)
        if len(ids) <= limit or not shots:
            break
        shots.pop()
        report.shots_dropped += 1
    if len(ids) > limit:
        report.truncated += 1
        ids = ids[-limit:]
    return ids


def choice_ids(tokenizer, q: Question, chat: bool) -> list[list[int]]:
    """Each choice's tokens as the answer after the cue: after "Answer:" with a space in raw text,
    as the start of the reply in chat."""
    sep = "" if chat else ANSWER_SEP[q.lang]
    return [tokenizer.encode(sep + c) for c in q.choices]


@torch.no_grad()
def continuation_logprobs(model, contexts: list[list[int]], continuations: list[list[int]], pad_id: int) -> list[float]:
    """Summed log p(continuation | context) per pair, one right-padded forward pass: the sequence
    log-probs DPO uses, with labels on the continuation's tokens only."""
    device = next(model.parameters()).device
    seqs = [c + t for c, t in zip(contexts, continuations)]
    ids = _right_padded(seqs, pad_id)
    labels = _right_padded([[-100] * (len(c) - 1) + t for c, t in zip(contexts, continuations)], pad_id, fill=-100)
    labels = torch.nn.functional.pad(labels, (0, ids.shape[1] - labels.shape[1]), value=-100)
    return sequence_logprobs(model(ids.to(device)), labels.to(device))[0].tolist()


def score_bench(model, tokenizer, questions: dict[str, list[Question]], dev: dict[str, list[Question]] | None = None,
                shots: int = 0, chat: bool = True, batch_size: int = 16, names: dict | None = None,
                progress: bool = True, score: str = "letter") -> BenchReport:
    """Accuracy per subject. score "letter": the letter with the highest next-token log-prob after
    each prompt (lm-eval's C-Eval/CMMLU); "text": the choice whose own text has the highest summed
    log-prob as the answer (lm-eval's `acc` on cloze-style tasks; the prompt then lists no options)."""
    from tqdm import tqdm

    if score not in ("letter", "text"):
        raise UserError(f"--bench_score {score}: use letter or text")

    dev, names = dev or {}, names or {}
    if shots > 0:
        lacking = [s for s in questions if not dev.get(s)]
        if lacking:
            raise UserError(f"--shots {shots} takes examples from the dev split, which has none for "
                            f"{', '.join(lacking[:5])}{' ...' if len(lacking) > 5 else ''}; use --shots 0")
    limit = model.config.max_position_embeddings
    report = BenchReport()
    jobs = []
    for subject, qs in questions.items():
        for q in qs:
            en, zh = names.get(subject, (subject.replace("_", " "),) * 2)
            name = zh if q.lang == "zh" else en
            room = limit - (max(map(len, choice_ids(tokenizer, q, chat))) if score == "text" else 0)
            jobs.append((q, fit_prompt(tokenizer, q, pick_shots(q, dev.get(subject, []), shots), name, chat,
                                       room, report, score)))
    letter_cache = {}
    jobs.sort(key=lambda j: len(j[1]))  # similar lengths together: less padding
    bar = tqdm(total=len(jobs), desc="bench", unit="q", file=sys.stderr, disable=not progress or None, leave=False)
    with eval_mode(model):
        for start in range(0, len(jobs), batch_size):
            chunk = jobs[start: start + batch_size]
            if score == "letter":
                logprobs = next_token_logprobs(model, [ids for _, ids in chunk], tokenizer.pad_id)
                predictions = []
                for (q, _), lp in zip(chunk, logprobs):
                    n = len(q.choices)
                    if n not in letter_cache:
                        letter_cache[n] = letter_token_ids(tokenizer, n)
                    predictions.append(int(letter_scores(lp[None], letter_cache[n]).argmax(-1)))
            else:
                pairs = [(ids, cont) for q, ids in chunk for cont in choice_ids(tokenizer, q, chat)]
                lls = continuation_logprobs(model, [c for c, _ in pairs], [t for _, t in pairs], tokenizer.pad_id)
                predictions, at = [], 0
                for q, _ in chunk:
                    ll = lls[at: at + len(q.choices)]
                    at += len(q.choices)
                    predictions.append(max(range(len(ll)), key=ll.__getitem__))
            for (q, _), predicted in zip(chunk, predictions):
                c, t = report.by_subject.get(q.subject, (0, 0))
                report.by_subject[q.subject] = (c + (predicted == q.answer), t + 1)
                report.predictions.append((q.where, predicted, q.answer))
            bar.update(len(chunk))
    bar.close()
    report.by_subject = dict(sorted(report.by_subject.items()))
    return report


def format_report(report: BenchReport) -> str:
    """A per-subject table and the overall line."""
    width = max([len(s) for s in report.by_subject] + [len("overall")])
    lines = [f"{'subject':<{width}}  {'correct':>7}  {'total':>5}  accuracy"]
    for subject, (c, n) in report.by_subject.items():
        lines.append(f"{subject:<{width}}  {c:>7}  {n:>5}  {100 * c / max(n, 1):7.1f}%")
    lines.append(f"{'overall':<{width}}  {report.correct:>7}  {report.total:>5}  {100 * report.accuracy:7.1f}%")
    return "\n".join(lines)


def chance_level(questions: dict[str, list[Question]]) -> float:
    """The expected accuracy of guessing uniformly."""
    qs = [q for rows in questions.values() for q in rows]
    return sum(1 / len(q.choices) for q in qs) / len(qs) if qs else 0.0
