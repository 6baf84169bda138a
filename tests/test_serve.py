"""The OpenAI-compatible server (minillm/serve.py, serve_openai_api.py), driven over loopback with the
official openai client: replies equal minillm.generate's, concurrent streams stay intact, errors come
in OpenAI's shape, a client that goes away frees its row."""
import concurrent.futures
import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from minillm.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from minillm.config import ModelConfig  # noqa: E402
from minillm.generate import generate  # noqa: E402
from minillm.lora import apply_lora, load_lora, save_lora  # noqa: E402
from minillm.model import MiniLLM  # noqa: E402
from minillm.serve import ChoiceText, ReasoningSplitter, ToolCallFilter, create_app, split_reasoning  # noqa: E402
from minillm.tokenizer import THINK_OFF_PREFILL, THINK_ON_PREFILL, Tokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import serve_openai_api  # noqa: E402

BASE, LORA, THINK = "minillm:full_sft", "minillm:full_sft+lora_x", "minillm:think"
PROMPTS = ["Hello", "Why is the sky blue?", "Tell me a long story about dragons and their gold, please, in detail.",
           "x", "What is 36 + 20?", "达卡亚的首都是哪里？",
           "Name three colours and say which one you like best.", "ok"]


def scripted_model(tok):
    """A model whose greedy reply is fixed: <think> Light </think> Because <answer> Ray </answer> <|im_end|>.
    Attention and MLP outputs are zero, so each logit row depends on the last token alone (a bigram chain)."""
    cfg = ModelConfig.preset("debug", vocab_size=tok.vocab_size, kernel_backend="torch", tie_word_embeddings=False)
    m = MiniLLM(cfg)
    chain = [tok.encode("\n")[-1], tok.special_ids["think_start"], tok.encode("Light")[-1],
             tok.special_ids["think_end"], tok.encode("Because")[-1], tok.special_ids["answer_start"],
             tok.encode("Ray")[-1], tok.special_ids["answer_end"], tok.im_end_id]
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                p.zero_()
        m.model.embed_tokens.weight.normal_(std=0.001)
        m.lm_head.weight.zero_()
        for k, (a, b) in enumerate(zip(chain, chain[1:])):
            m.model.embed_tokens.weight[a] = 0
            m.model.embed_tokens.weight[a, k] = 1.0
            m.lm_head.weight[b, k] = 10.0
    return m.eval()


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve")
    tok = Tokenizer.load()
    torch.manual_seed(0)
    cfg = ModelConfig.preset("debug", vocab_size=tok.vocab_size, kernel_backend="torch", initializer_range=0.25)
    save_checkpoint(tmp / "full_sft", MiniLLM(cfg), tok)
    adapter = load_checkpoint(tmp / "full_sft")[0]
    apply_lora(adapter, rank=4, alpha=8)
    with torch.no_grad():
        for name, p in adapter.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.2)
    save_lora(tmp / "lora_x", adapter)

    args = serve_openai_api.build_parser().parse_args(
        ["--load_from", str(tmp / "full_sft"), "--save_dir", str(tmp), "--lora_name", "lora_x", "--device", "cpu"])
    models, tok = serve_openai_api.load_models(args)
    assert list(models) == [BASE, LORA]
    models[THINK] = scripted_model(tok)
    app = create_app(models, tok, max_batch=32, default_max_tokens=64)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    for _ in range(200):
        if server.started:
            break
        time.sleep(0.05)
    assert server.started
    ref = {BASE: load_checkpoint(tmp / "full_sft")[0].eval(),
           LORA: load_lora(load_checkpoint(tmp / "full_sft")[0], tmp / "lora_x").eval(),
           THINK: models[THINK]}
    url = f"http://127.0.0.1:{port}"
    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60)
    yield dict(url=url, client=client, engine=app.state.engine, tok=tok, ref=ref, tmp=tmp)
    server.should_exit = True
    thread.join(timeout=10)


def solo(env, prompt, model=BASE, max_tokens=24, **kw):
    """minillm.generate's greedy reply, split as the server splits it."""
    text = generate(env["ref"][model], env["tok"], [{"role": "user", "content": prompt}], max_new_tokens=max_tokens,
                    temperature=0, **kw)
    return split_reasoning(text)


def stream_text(client, **kw):
    reasoning, content, finish, chunks = "", "", None, []
    for chunk in client.chat.completions.create(stream=True, **kw):
        chunks.append(chunk)
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        reasoning += getattr(delta, "reasoning_content", None) or ""
        content += delta.content or ""
        finish = chunk.choices[0].finish_reason or finish
    return reasoning, content, finish, chunks


def test_models_health_and_pages(env):
    ids = [m.id for m in env["client"].models.list().data]
    assert ids == [BASE, LORA, THINK]
    assert httpx.get(env["url"] + "/health").json()["status"] == "ok"
    for path in ("/", "/chat"):
        r = httpx.get(env["url"] + path)
        assert (r.status_code, "html" in r.headers["content-type"]) == (200, True) or r.status_code == 404


def test_greedy_reply_equals_generate(env):
    client = env["client"]
    for model in (BASE, LORA):
        want = solo(env, PROMPTS[2], model)
        r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": PROMPTS[2]}],
                                           temperature=0, max_tokens=24)
        assert r.object == "chat.completion" and r.model == model and r.id.startswith("chatcmpl-")
        assert r.choices[0].message.role == "assistant"
        assert (getattr(r.choices[0].message, "reasoning_content", None) or "", r.choices[0].message.content) == want
        prompt_len = len(env["tok"].render_prompt([{"role": "user", "content": PROMPTS[2]}]))
        assert r.usage.prompt_tokens == prompt_len
        assert r.usage.total_tokens == prompt_len + r.usage.completion_tokens
        if r.choices[0].finish_reason == "length":
            assert r.usage.completion_tokens == 24
        r, c, finish, chunks = stream_text(client, model=model, messages=[{"role": "user", "content": PROMPTS[2]}],
                                           temperature=0, max_tokens=24, stream_options={"include_usage": True})
        assert (r, c) == want
        assert finish in ("stop", "length")
        assert all(ch.object == "chat.completion.chunk" for ch in chunks)
        assert chunks[-1].choices == [] and chunks[-1].usage.prompt_tokens == prompt_len
    assert solo(env, PROMPTS[2], BASE) != solo(env, PROMPTS[2], LORA)  # the adapter is really applied


def test_concurrent_streams_each_equal_their_solo_reply(env):
    engine, client = env["engine"], env["client"]
    jobs = [(PROMPTS[i % len(PROMPTS)] + " " * (i // len(PROMPTS)), (BASE, LORA)[i % 3 == 2], 12 + (i * 5) % 20)
            for i in range(16)]
    want = [solo(env, p, m, n) for p, m, n in jobs]
    engine.peak = 0
    barrier = threading.Barrier(len(jobs))

    def one(job):
        prompt, model, n = job
        barrier.wait(timeout=30)
        r, c, _, _ = stream_text(client, model=model, messages=[{"role": "user", "content": prompt}],
                                 temperature=0, max_tokens=n)
        return r, c

    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        got = list(pool.map(one, jobs))
    assert got == want
    assert engine.peak > 1  # rows were decoded together


def test_requests_join_a_running_batch(env):
    """Continuous batching: requests that arrive while another is mid-reply join its batch between two
    decode steps (the cache re-padded on the left) and every reply is still its solo reply."""
    engine, client = env["engine"], env["client"]
    first = (PROMPTS[0], 300)  # a short prompt: the longer ones joining it make the running rows re-pad
    later = [(PROMPTS[2], 40), (PROMPTS[3], 20), (PROMPTS[5], 30)]
    want = [solo(env, p, BASE, n) for p, n in [first] + later]
    engine.peak = 0
    pieces, results = [], {}

    def late(k, prompt, n):
        results[k] = stream_text(client, model=BASE, messages=[{"role": "user", "content": prompt}], temperature=0,
                                 max_tokens=n)[:2]

    threads = [threading.Thread(target=late, args=(k, p, n)) for k, (p, n) in enumerate(later)]
    for chunk in client.chat.completions.create(model=BASE, messages=[{"role": "user", "content": first[0]}],
                                                temperature=0, max_tokens=first[1], stream=True):
        pieces.append(chunk.choices[0].delta.content or "")
        if len(pieces) == 4:
            for t in threads:
                t.start()
    for t in threads:
        t.join(timeout=60)
    assert [("", "".join(pieces))] + [results[k] for k in range(len(later))] == want
    assert engine.peak > 1


def test_reasoning_is_split_out(env):
    client, tok = env["client"], env["tok"]
    messages = [{"role": "user", "content": "Why?"}]
    reasoning, content = solo(env, "Why?", THINK, 20)
    piece = lambda word: tok.decode([tok.encode(word)[-1]]).strip()  # noqa: E731 - the chain's token
    assert reasoning == piece("Light") and piece("Because") in content and piece("Ray") in content
    assert "<" not in content
    r = client.chat.completions.create(model=THINK, messages=messages, temperature=0, max_tokens=20)
    assert (r.choices[0].message.reasoning_content, r.choices[0].message.content) == (reasoning, content)
    assert r.choices[0].finish_reason == "stop"
    assert stream_text(client, model=THINK, messages=messages, temperature=0, max_tokens=20)[:3] == (
        reasoning, content, "stop")
    # the thinking switch (MiniMind's open_thinking): off prefills the empty think block, as eval_model's
    # /think off; on opens one; not given, the model decides (no prefill)
    plain = r.usage.prompt_tokens
    for body, prefill in (({"open_thinking": False}, THINK_OFF_PREFILL),
                          ({"chat_template_kwargs": {"enable_thinking": False}}, THINK_OFF_PREFILL),
                          ({"open_thinking": True}, THINK_ON_PREFILL),
                          ({"chat_template_kwargs": {"open_thinking": True}}, THINK_ON_PREFILL)):
        got = client.chat.completions.create(model=THINK, messages=messages, max_tokens=4, extra_body=body)
        assert got.usage.prompt_tokens == plain + len(tok.encode(prefill))
    # thinking on: the reply starts inside the opened block, so what comes before </think> is reasoning
    ids = tok.encode("step one</think>\n\nThe answer.")
    text = ChoiceText(tok, [], think_opened=True)
    pieces = [text.add(i) for i in ids] + [text.finish()]
    assert ("".join(p[0] for p in pieces), "".join(p[1] for p in pieces)) == ("step one", "The answer.")


def test_splitter_handles_tags_split_anywhere():
    text = "<think>\nstep one\n\nstep two\n</think>\n\nThe <answer>answer</answer> is 4."
    want = ("step one\n\nstep two", "The answer is 4.")
    assert split_reasoning(text) == want
    for size in (1, 2, 3, 7):
        s, got = ReasoningSplitter(), ["", ""]
        for i in range(0, len(text), size):
            for k, piece in enumerate(s.feed(text[i:i + size])):
                got[k] += piece
        for k, piece in enumerate(s.feed("", final=True)):
            got[k] += piece
        assert tuple(got) == want
    assert split_reasoning(" plain <thin") == ("", " plain <thin")


def test_n_choices_with_seed_are_reproducible(env):
    client = env["client"]
    kw = dict(model=BASE, messages=[{"role": "user", "content": "Hello"}], temperature=1.0, top_p=1.0,
              max_tokens=16, n=2, seed=7)
    a = client.chat.completions.create(**kw)
    b = client.chat.completions.create(**kw)
    assert [c.index for c in a.choices] == [0, 1]
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    assert a.choices[0].message.content != a.choices[1].message.content
    # choice i samples as minillm.generate does with a generator seeded seed + i
    want = generate(env["ref"][BASE], env["tok"], "Hello", max_new_tokens=16, temperature=1.0, top_p=1.0,
                    generator=torch.Generator().manual_seed(7))
    assert a.choices[0].message.content == split_reasoning(want)[1]
    streamed = {}
    for chunk in client.chat.completions.create(stream=True, **kw):
        for c in chunk.choices:
            streamed[c.index] = streamed.get(c.index, "") + (c.delta.content or "")
    assert [streamed[0], streamed[1]] == [c.message.content for c in a.choices]


def test_stop_strings_cut_the_text(env):
    client = env["client"]
    full = solo(env, PROMPTS[6], BASE, 40)[1]
    stop = full[10:13]
    cut = full[:full.index(stop)]
    for stops in (stop, ["\u2603never", stop]):
        r = client.chat.completions.create(model=BASE, messages=[{"role": "user", "content": PROMPTS[6]}],
                                           temperature=0, max_tokens=40, stop=stops)
        assert (r.choices[0].message.content, r.choices[0].finish_reason) == (cut, "stop")
        _, c, finish, _ = stream_text(client, model=BASE, messages=[{"role": "user", "content": PROMPTS[6]}],
                                      temperature=0, max_tokens=40, stop=stops)
        assert (c, finish) == (cut, "stop")


def test_bad_requests_get_openai_errors(env):
    url = env["url"] + "/v1/chat/completions"
    ok = {"model": BASE, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    long_text = " ".join(["word"] * 1500)
    cases = [(b"{not json", 400, None), (b"[1, 2]", 400, None),
             ({"model": BASE}, 400, "messages"), ({**ok, "messages": []}, 400, "messages"),
             ({**ok, "messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages[0].role"),
             ({**ok, "messages": [{"role": "user"}]}, 400, "messages[0].content"),
             ({**ok, "max_tokens": -1}, 400, "max_tokens"), ({**ok, "max_tokens": 10 ** 9}, 400, "max_tokens"),
             ({**ok, "max_completion_tokens": 0}, 400, "max_completion_tokens"),
             ({**ok, "temperature": -0.5}, 400, "temperature"), ({**ok, "temperature": "hot"}, 400, "temperature"),
             ({**ok, "top_p": 0}, 400, "top_p"), ({**ok, "top_p": 1.5}, 400, "top_p"),
             ({**ok, "n": 0}, 400, "n"), ({**ok, "n": 1000}, 400, "n"), ({**ok, "stop": 5}, 400, "stop"),
             ({**ok, "model": "gpt-4o"}, 404, "model"),
             ({**ok, "messages": [{"role": "user", "content": long_text}]}, 400, "messages")]
    for body, status, param in cases:
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        r = httpx.post(url, content=content, headers={"Content-Type": "application/json"}, timeout=30)
        shown = body if isinstance(body, bytes) else {k: v for k, v in body.items() if k != "messages"}
        assert r.status_code == status, (shown, r.text)
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"] and err["param"] == param
    r = httpx.post(url, json={**ok, "messages": [{"role": "user", "content": long_text}]}, timeout=30)
    assert "maximum context length is 1024" in r.json()["error"]["message"]
    assert r.json()["error"]["code"] == "context_length_exceeded"
    r = httpx.post(url, json={**ok, "messages": [{"role": "user", "content": long_text}], "max_tokens": 8,
                              "truncate": "left"}, timeout=30)
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == 1024 - 8
    with pytest.raises(openai.NotFoundError):
        env["client"].chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])


def test_engine_failure_fails_only_that_request(env, monkeypatch):
    engine, client = env["engine"], env["client"]
    admit = engine._admit

    def faulty(name, batch, group):
        if any(s.params.max_new_tokens == 13 for s in group):
            raise RuntimeError("boom")
        return admit(name, batch, group)

    monkeypatch.setattr(engine, "_admit", faulty)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        bad = pool.submit(httpx.post, env["url"] + "/v1/chat/completions", timeout=30,
                          json={"model": BASE, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 13})
        good = pool.submit(client.chat.completions.create, model=BASE, temperature=0, max_tokens=12,
                           messages=[{"role": "user", "content": PROMPTS[0]}])
        assert bad.result().status_code == 500
        err = bad.result().json()["error"]
        assert err["type"] == "server_error" and "boom" in err["message"]
        assert good.result().choices[0].message.content == solo(env, PROMPTS[0], BASE, 12)[1]
    monkeypatch.undo()
    step = engine._step

    def faulty_step(name, batch):
        if any(s.params.max_new_tokens == 17 for s in batch.seqs):
            raise RuntimeError("step boom")
        return step(name, batch)

    monkeypatch.setattr(engine, "_step", faulty_step)  # a shared decode step fails: its rows get the error
    with httpx.stream("POST", env["url"] + "/v1/chat/completions", timeout=30,
                      json={"model": BASE, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 17,
                            "stream": True}) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    assert events[-1]["error"]["type"] == "server_error" and "step boom" in events[-1]["error"]["message"]
    monkeypatch.undo()
    assert engine.active() == 0
    assert client.chat.completions.create(model=BASE, messages=[{"role": "user", "content": "hi"}], max_tokens=2)


def test_disconnected_stream_frees_its_row(env):
    engine = env["engine"]
    aborted = engine.aborted
    body = {"model": BASE, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 900, "stream": True,
            "temperature": 1.0, "top_p": 1.0, "seed": 1}
    with httpx.stream("POST", env["url"] + "/v1/chat/completions", json=body, timeout=30) as r:
        lines = 0
        for line in r.iter_lines():
            lines += line.startswith("data: ")
            if lines >= 3:
                break
    for _ in range(200):
        if engine.active() == 0:
            break
        time.sleep(0.05)
    assert engine.active() == 0
    assert engine.aborted == aborted + 1  # it left unfinished, not after its 900 tokens


def test_cli_errors_are_one_line(tmp_path):
    for argv in (["--load_from", str(tmp_path / "missing")], ["--port", "-1"], ["--max_batch", "0"]):
        p = subprocess.run([sys.executable, "serve_openai_api.py", *argv], cwd=ROOT, capture_output=True, text=True,
                           timeout=60)
        assert p.returncode == 2, p.stderr
        assert p.stderr.startswith("error:") and len(p.stderr.strip().splitlines()) == 1


# ---- tool calls -----------------------------------------------------------------------------------------
TOOLS = [{"type": "function", "function": {"name": "calculator", "description": "Evaluate arithmetic.",
                                           "parameters": {"type": "object", "properties": {
                                               "expression": {"type": "string"}}, "required": ["expression"]}}}]
CALL_REPLY = 'Let me compute.\n<tool_call>\n{"name": "calculator", "arguments": {"expression": "2+3"}}\n</tool_call>'


@pytest.fixture
def scripted_replies(env, monkeypatch):
    """Every row of the THINK model writes `script[0]` (then <|im_end|>), whatever its logits: the engine's
    sampler is handed logits that allow only the next scripted token (Seq.produced counts the row's tokens)."""
    engine, tok, script = env["engine"], env["tok"], []
    original = engine._sample

    def sample(seqs, logits):
        logits = logits.clone()
        ids = tok.encode(script[0]) + [tok.im_end_id]
        for i, s in enumerate(seqs):
            if s.model == THINK:
                logits[i] = float("-inf")
                logits[i, ids[min(s.produced, len(ids) - 1)]] = 0.0
        return original(seqs, logits)

    monkeypatch.setattr(engine, "_sample", sample)
    return script


def test_tool_calls_come_back_in_openai_shape_streamed_and_not(env, scripted_replies):
    client, tok = env["client"], env["tok"]
    scripted_replies.append(CALL_REPLY)
    messages = [{"role": "user", "content": "What is 2+3?"}]
    r = client.chat.completions.create(model=THINK, messages=messages, tools=TOOLS, temperature=0, max_tokens=64)
    assert r.usage.prompt_tokens == len(tok.render_prompt(messages, tools=TOOLS))  # the schemas are in the prompt
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content == "Let me compute."
    [call] = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_") and call.function.name == "calculator"
    assert json.loads(call.function.arguments) == {"expression": "2+3"}

    streamed, content, finish = {}, "", None
    for chunk in client.chat.completions.create(model=THINK, messages=messages, tools=TOOLS, temperature=0,
                                                max_tokens=64, stream=True):
        delta = chunk.choices[0].delta
        content += delta.content or ""
        for tc in delta.tool_calls or []:  # as an OpenAI client accumulates them
            slot = streamed.setdefault(tc.index, {"id": "", "name": "", "arguments": ""})
            slot["id"] += tc.id or ""
            slot["name"] += tc.function.name or ""
            slot["arguments"] += tc.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert (content, finish, list(streamed)) == ("Let me compute.", "tool_calls", [0])
    assert streamed[0]["name"] == "calculator" and json.loads(streamed[0]["arguments"]) == {"expression": "2+3"}

    # the client runs the tool and sends the call and its result back: the server renders them as the
    # tokenizer does (the call's arguments exactly as it returned them)
    scripted_replies[0] = "2+3 is 5."
    back = messages + [choice.message.model_dump(exclude_none=True),
                       {"role": "tool", "tool_call_id": call.id, "content": '{"result": 5}'}]
    r2 = client.chat.completions.create(model=THINK, messages=back, tools=TOOLS, temperature=0, max_tokens=64)
    assert (r2.choices[0].message.content, r2.choices[0].finish_reason) == ("2+3 is 5.", "stop")
    assert not r2.choices[0].message.tool_calls
    rendered = messages + [{"role": "assistant", "content": "Let me compute.", "tool_calls": [
        {"name": "calculator", "arguments": call.function.arguments}]}, {"role": "tool", "content": '{"result": 5}'}]
    assert r2.usage.prompt_tokens == len(tok.render_prompt(rendered, tools=TOOLS))
    assert '<tool_response>\n{"result": 5}\n</tool_response>' in tok.decode(tok.render_prompt(rendered, tools=TOOLS))


def test_malformed_tool_calls_stay_text_and_requests_are_checked(env, scripted_replies):
    client = env["client"]
    scripted_replies.append('<tool_call>{"name": oops}</tool_call>')
    messages = [{"role": "user", "content": "hi"}]
    r = client.chat.completions.create(model=THINK, messages=messages, tools=TOOLS, temperature=0, max_tokens=32)
    assert r.choices[0].finish_reason == "stop" and not r.choices[0].message.tool_calls
    assert r.choices[0].message.content == '<tool_call>{"name": oops}</tool_call>'  # what the model wrote
    # without tools (or with tool_choice "none") nothing is parsed and the schemas are not shown
    scripted_replies[0] = CALL_REPLY
    r = client.chat.completions.create(model=THINK, messages=messages, tools=TOOLS, tool_choice="none",
                                       temperature=0, max_tokens=64)
    assert r.choices[0].message.content == CALL_REPLY and r.choices[0].finish_reason == "stop"
    for bad, param in (({"tools": [{"type": "function"}]}, "tools[0]"), ({"tools": "calculator"}, "tools"),
                       ({"tool_choice": "required", "tools": TOOLS}, "tool_choice"),
                       ({"messages": messages + [{"role": "assistant", "content": None, "tool_calls": [{"id": "x"}]}]},
                        "messages[1].tool_calls[0]")):
        body = {"model": THINK, "messages": messages, **bad}
        got = httpx.post(env["url"] + "/v1/chat/completions", json=body)
        assert got.status_code == 400 and got.json()["error"]["param"] == param, got.text


@pytest.mark.parametrize("text, content, names", [
    (CALL_REPLY, "Let me compute.", ["calculator"]),
    ('<tool_call>{"name": "a", "arguments": {}}</tool_call>\n\n<tool_call>{"name": "b"}</tool_call>\n\nDone.',
     "Done.", ["a", "b"]),
    ('Text <tool_call>{"name": bad}</tool_call> more', 'Text <tool_call>{"name": bad}</tool_call> more', []),
    ('Half <tool_call>{"name": "a"', 'Half <tool_call>{"name": "a"', []),  # never closed
    ("a < b <tool and <tool_call x\n", "a < b <tool and <tool_call x\n", []),
])
def test_tool_call_filter_gives_the_same_pieces_in_any_split(text, content, names):
    for size in (len(text), 1, 2, 5):
        f, got = ToolCallFilter(), ""
        for i in range(0, len(text), size):
            got += f.feed(text[i:i + size])
        got += f.feed("", final=True)
        assert (got, [c.name for c in f.calls]) == (content, names), size
