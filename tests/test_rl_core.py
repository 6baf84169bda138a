"""The RL core (minillm/rl.py, minillm/rewards.py): batched rollouts against one-prompt-at-a-time generation,
per-row stops, the rollout's token log-probs against the sampler's step-by-step distribution, experience
micro-batches and their counts, the prompt data, and every reward rule against a hand computation."""
import re

import pytest
import torch

from minillm.config import ModelConfig
from minillm.data.jsonl import DataError
from minillm.errors import UserError
from minillm.generate import SamplingParams
from minillm.model import MiniLLM
from minillm.rewards import contains_answer, final_answer, make_reward_fn, rep_penalty
from minillm.rl import (PromptDataset, Rollouts, experience_batches, masked_mean, prompt_collate, sample_rollouts,
                        token_logprobs, whiten)
from minillm.tokenizer import THINK_OFF_PREFILL, Tokenizer


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return MiniLLM(ModelConfig.preset("debug", vocab_size=512, kernel_backend="torch")).eval()


PROMPTS = [[5, 17, 3], [9, 2, 44, 81, 7, 100, 23], [60], [11, 12, 13, 14, 15]]


# -- rollouts -------------------------------------------------------------------------------------------
def test_batched_greedy_rollouts_equal_one_prompt_at_a_time(model):
    params = SamplingParams(max_new_tokens=6, temperature=0.0, top_p=1.0)
    batched = sample_rollouts(model, PROMPTS, 2, params, pad_id=0)
    assert batched.prompt_index.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    for row, completion in enumerate(batched.completions):
        prompt = PROMPTS[row // 2]
        alone = sample_rollouts(model, [prompt], 1, params, pad_id=0).completions[0]
        assert completion == alone
        # the training layout: prompt then completion, right-padded; the mask covers the completion only
        n = len(prompt) + len(completion)
        assert batched.lengths[row] == n
        assert batched.ids[row, :n].tolist() == prompt + completion
        assert (batched.ids[row, n:] == 0).all()
        assert batched.loss_mask[row].nonzero().flatten().tolist() == list(range(len(prompt), n))
        assert (batched.labels[row][batched.loss_mask[row, 1:]] == torch.tensor(completion)).all()
    assert not batched.finished.any()  # no stop ids: every row ran to the limit


def test_each_row_stops_at_its_own_stop_id(model):
    free = sample_rollouts(model, PROMPTS, 1, SamplingParams(max_new_tokens=8, temperature=0.0), pad_id=0)
    stop = free.completions[0][2]  # row 0 must stop at its third token (or earlier, if it came before)
    stopped = sample_rollouts(model, PROMPTS, 1, SamplingParams(max_new_tokens=8, temperature=0.0, stop_ids=[stop]),
                              pad_id=0)
    for full, cut, finished in zip(free.completions, stopped.completions, stopped.finished.tolist()):
        if stop in full:
            end = full.index(stop) + 1
            assert cut == full[:end] and finished  # the stop id is kept, nothing after it
        else:
            assert cut == full and not finished
    assert len(stopped.completions[0]) <= 3
    assert stopped.ids.shape[1] == max(stopped.lengths)


def test_rollout_logprobs_equal_the_samplers_distribution(model):
    """Sampled at temperature 1 without truncation: the distribution the sampler drew each token from is
    softmax(logits of the prefix), computed here one prefix at a time, without the cache or padding."""
    params = SamplingParams(max_new_tokens=5, temperature=1.0, top_p=1.0)
    rollouts = sample_rollouts(model, PROMPTS, 2, params, pad_id=0, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        logps = token_logprobs(model(rollouts.ids[:, :-1]), rollouts.labels)
    for row, completion in enumerate(rollouts.completions):
        prompt = PROMPTS[row // 2]
        for t, token in enumerate(completion):
            prefix = torch.tensor([prompt + completion[:t]])
            with torch.no_grad():
                expect = model(prefix)[0, -1].float().log_softmax(-1)[token]
            torch.testing.assert_close(logps[row, len(prompt) + t - 1], expect, rtol=1e-4, atol=1e-5)
    assert (logps[~rollouts.loss_mask[:, 1:]] == 0).all()


def test_seeded_sampling_repeats_and_differs_across_seeds(model):
    params = SamplingParams(max_new_tokens=6, temperature=1.0, top_p=1.0)
    a = sample_rollouts(model, PROMPTS, 3, params, 0, torch.Generator().manual_seed(1)).completions
    b = sample_rollouts(model, PROMPTS, 3, params, 0, torch.Generator().manual_seed(1)).completions
    c = sample_rollouts(model, PROMPTS, 3, params, 0, torch.Generator().manual_seed(2)).completions
    assert a == b and a != c


# -- experience -----------------------------------------------------------------------------------------
def test_experience_batches_cut_trim_and_count(model):
    rollouts = sample_rollouts(model, PROMPTS, 2, SamplingParams(max_new_tokens=4, temperature=0.0), pad_id=0)
    N, T = rollouts.ids.shape
    experience = {"ids": rollouts.ids, "loss_mask": rollouts.loss_mask, "adv": torch.arange(N, dtype=torch.float),
                  "ref": torch.randn(N, T - 1)}
    order = [7, 0, 3, 5, 1, 2, 6, 4]
    batches = experience_batches(experience, rollouts.lengths, 3, order=order)
    assert [b["n_rows"] for b in batches] == [3, 3, 2]
    for batch, rows in zip(batches, (order[0:3], order[3:6], order[6:8])):
        width = max(rollouts.lengths[r] for r in rows)
        assert batch["ids"].shape == (len(rows), width) and batch["ref"].shape == (len(rows), width - 1)
        assert batch["adv"].tolist() == [float(r) for r in rows]
        assert torch.equal(batch["ids"], rollouts.ids[rows, :width])
        assert torch.equal(batch["ref"], experience["ref"][rows, :width - 1])
        assert batch["n_tokens"] == sum(rollouts.lengths[r] - 1 for r in rows)
        assert batch["n_targets"] == sum(len(rollouts.completions[r]) for r in rows)
    assert sum(b["n_targets"] for b in batches) == int(rollouts.loss_mask.sum())


def test_masked_mean_and_whiten_against_hand_sums():
    values = torch.tensor([[1.0, 2.0, 30.0], [4.0, 5.0, 60.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]], dtype=torch.bool)
    assert masked_mean(values, mask).item() == pytest.approx(3.0)
    assert masked_mean(values, mask, dim=1).tolist() == pytest.approx([1.5, 4.5])
    assert masked_mean(values, torch.zeros_like(mask)).item() == 0.0
    kept = torch.tensor([1.0, 2.0, 4.0, 5.0])
    expect = (kept - kept.mean()) / kept.std()  # unbiased, as TRL's masked_whiten
    torch.testing.assert_close(whiten(values, mask)[mask], expect, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(whiten(values, mask, shift_mean=False)[mask], expect + kept.mean(), rtol=1e-5, atol=1e-5)


# -- prompt data ----------------------------------------------------------------------------------------
def test_prompt_dataset_renders_prompts_and_thinking_ratio(tmp_path):
    tok = Tokenizer.load()
    path = tmp_path / "rlaif.jsonl"
    rows = ['{"conversations": [{"role": "user", "content": "What is %d + 1?"}, {"role": "assistant", "content": ""}],'
            ' "answer": "%d"}' % (i, i + 1) for i in range(40)]
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    open_all = PromptDataset(path, tok, 64, thinking_ratio=1.0)
    assert open_all.prompts[0] == tok.render_prompt("What is 0 + 1?") and open_all.rows[3]["answer"] == "4"
    closed = PromptDataset(path, tok, 64, thinking_ratio=0.0)
    assert closed.prompts[0] == tok.render_prompt("What is 0 + 1?") + tok.encode(THINK_OFF_PREFILL)
    half = PromptDataset(path, tok, 64, thinking_ratio=0.5)
    n_off = sum(p != q for p, q in zip(half.prompts, open_all.prompts))
    assert 8 <= n_off <= 32 and half.prompts == PromptDataset(path, tok, 64, thinking_ratio=0.5).prompts
    batch = prompt_collate([open_all[i] for i in (2, 5)])
    assert batch["prompts"] == [open_all.prompts[2], open_all.prompts[5]] and batch["index"].tolist() == [2, 5]
    assert batch["n_rows"] == 2 and batch["n_tokens"] == len(open_all.prompts[2]) + len(open_all.prompts[5])


@pytest.mark.parametrize("line, reason", [
    ('{"conversations": [{"role": "assistant", "content": "hi"}]}', "user turn"),
    ('{"conversations": [{"role": "user", "content": "hi"}], "answer": 5}', '"answer" must be a string'),
    ('{"prompt": "hi"}', "conversations"),
    ('{"conversations": [', ""),
])
def test_bad_prompt_rows_name_the_file_and_line(tmp_path, line, reason):
    path = tmp_path / "bad.jsonl"
    good = '{"conversations": [{"role": "user", "content": "hi"}]}'
    path.write_text(f"{good}\n{line}\n", encoding="utf-8")
    with pytest.raises(DataError, match=re.escape(f"{path}:2") + ".*" + re.escape(reason)):
        PromptDataset(path, Tokenizer.load(), 64)


# -- rewards --------------------------------------------------------------------------------------------
def make_rollouts(tok, prompts, texts, finished):
    """Rollouts holding these completion texts (a stop id appended where finished)."""
    completions = [tok.encode(t) + ([tok.im_end_id] if f else []) for t, f in zip(texts, finished)]
    lengths = [len(p) + len(c) for p, c in zip(prompts, completions)]
    ids = torch.full((len(texts), max(lengths)), tok.pad_id)
    mask = torch.zeros(ids.shape, dtype=torch.bool)
    for row, (p, c) in enumerate(zip(prompts, completions)):
        ids[row, :len(p) + len(c)] = torch.tensor(p + c)
        mask[row, len(p):len(p) + len(c)] = True
    return Rollouts(ids, mask, torch.arange(len(texts)), completions, torch.tensor(finished), lengths)


def test_answer_extraction_and_matching():
    assert final_answer("<think>\nsum is 5\n</think>\n<answer>\n7\n</answer>") == "7"
    assert final_answer("<think>\n5\n</think>\n\nIt is 7.") == "It is 7."
    assert final_answer("plain 7") == "plain 7"
    assert contains_answer("36 + 19 = 55.", "55") and not contains_answer("36 + 19 = 155.", "55")
    assert not contains_answer("it is 550", "55") and contains_answer("答案是55。", "55")
    assert contains_answer("The capital is FENTA.", "Fenta") and not contains_answer("Fentaville", "Fenta")
    assert contains_answer("达卡亚的首都是芬塔。", "芬塔") and not contains_answer("anything", "")


def test_rule_rewards_against_hand_values(capsys):
    tok = Tokenizer.load()
    p = tok.render_prompt("What is 2 + 3?")
    off = p + tok.encode(THINK_OFF_PREFILL)
    texts = ["The answer is 5.",                                      # open prompt, no think block
             "<think>\n2 plus 3\n</think>\n<answer>\n5\n</answer>",    # well-formed, right
             "<think>\n2 plus 3\n</think>\n\n15",                      # well-formed (bare answer), wrong
             "5",                                                      # thinking off: a bare answer is the format
             "<think>\n</think>\n5",                                   # empty reasoning: malformed
             "the the the the the the"]                               # cut, repetitive, no answer field
    prompts = [p, p, p, off, p, p]
    rows = [{"answer": "5"}] * 5 + [{}]
    finished = [True, True, True, True, True, False]
    reward_fn = make_reward_fn("answer:1.0,format:0.5,length:0.25,repetition", tok)
    rewards, parts = reward_fn(rows, make_rollouts(tok, prompts, texts, finished))
    assert parts["answer"].tolist() == [1, 1, 0, 1, 1, 0]
    assert parts["format"].tolist() == [0, 1, 1, 1, 0, 0]
    assert parts["length"].tolist() == [0, 0, 0, 0, 0, -1]
    # MiniMind's rep_penalty: 6 words -> 4 trigrams, 1 distinct: min(0.5, 3 * 0.5 * 2 / 4) = 0.5
    assert parts["repetition"].tolist() == [0, 0, 0, 0, 0, -0.5] and rep_penalty("a b c d") == 0.0
    assert rep_penalty("a b c a b c a") == pytest.approx(min(0.5, 2 * 0.5 * 2 / 5))
    expect = parts["answer"] + 0.5 * parts["format"] + 0.25 * parts["length"] + parts["repetition"]
    torch.testing.assert_close(rewards, expect)
    assert reward_fn.missing_answers == 1 and "without an \"answer\"" in capsys.readouterr().out


def test_model_reward_scores_prompt_and_completion():
    tok = Tokenizer.load()
    p = tok.render_prompt("hi")
    rollouts = make_rollouts(tok, [p, p + [5]], ["hello there", "hey"], [True, False])

    class Scorer:
        def score(self, ids, lengths):
            self.seen = (ids, lengths)
            return torch.tensor([0.25, -1.5])

    scorer = Scorer()
    rewards, parts = make_reward_fn("model:2,length", tok, scorer)([{}, {}], rollouts)
    assert scorer.seen[0] is rollouts.ids and list(scorer.seen[1]) == rollouts.lengths
    assert parts["model"].tolist() == [0.25, -1.5] and rewards.tolist() == [0.5, -4.0]


@pytest.mark.parametrize("spec, message", [
    ("answer,bogus", "unknown reward 'bogus'.*answer, format, length, repetition, model"),
    ("answer:x", "not a number"), ("answer,answer:2", "twice"), (" , ", "names no reward"),
    ("model", "--reward_model_path"),
])
def test_bad_reward_specs_are_user_errors(spec, message):
    with pytest.raises(UserError, match=message):
        make_reward_fn(spec, Tokenizer.load())
