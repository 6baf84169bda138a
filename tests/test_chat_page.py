"""The chat page (minillm/static/chat.html) in a real headless Chromium, driven by Selenium, against the
real server (serve_openai_api.py as a subprocess) on a tiny random-weight checkpoint: the reply is
gibberish, but it streams. Skips, saying why, only where no Chromium and chromedriver can be found
(.ci/run installs Debian's chromium and chromium-driver when they are missing)."""
import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from minillm.checkpoint import save_checkpoint
from minillm.config import ModelConfig, TrainConfig
from minillm.lora import apply_lora, save_lora
from minillm.model import MiniLLM
from minillm.serve import THINK_OFF_PREFILL
from minillm.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "minillm" / "static" / "chat.html"
SERVER_LOG = []  # the running server's log file, shown when the page times out

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
DRIVERS = ("chromedriver", "/usr/lib/chromium/chromedriver", "/usr/lib/chromium-browser/chromedriver")


def find_browser():
    """(chromium binary, chromedriver) or a reason why there is none."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        return None, None, "selenium is not installed (pip install -e '.[dev]')"
    browser = next((shutil.which(b) for b in BROWSERS if shutil.which(b)), None)
    driver = next((shutil.which(d) for d in DRIVERS if shutil.which(d)), None)
    if not browser:
        return None, None, "no Chromium found (tried %s); .ci/run installs Debian's chromium" % ", ".join(BROWSERS)
    if not driver:
        return None, None, "no chromedriver found (tried %s); .ci/run installs chromium-driver" % ", ".join(DRIVERS)
    return browser, driver, None


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url, timeout=2):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """serve_openai_api.py on a tiny debug-preset checkpoint (random weights, the shipped tokenizer) with
    one LoRA beside it, so the page has two models to choose from. Yields the base URL."""
    out = tmp_path_factory.mktemp("chat_out")
    tok = Tokenizer.load()
    torch.manual_seed(0)
    model = MiniLLM(ModelConfig.preset("debug", vocab_size=tok.vocab_size))
    save_checkpoint(out / "full_sft", model, tok, TrainConfig(data_path="dataset/demo/sft.jsonl"))
    apply_lora(model, rank=2)
    save_lora(out / "lora_medical", model, {"train": {"data_path": "dataset/demo/lora_medical.jsonl"}})

    port = free_port()
    cmd = [sys.executable, str(ROOT / "serve_openai_api.py"), "--load_from", str(out / "full_sft"),
           "--save_dir", str(out), "--lora_name", "lora_medical", "--device", "cpu", "--port", str(port),
           "--seed", "0"]  # sampled replies, but the same ones every run (a random model may stop early)
    log = open(out / "server.log", "w")
    SERVER_LOG[:] = [out / "server.log"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    base = "http://127.0.0.1:%d" % port
    try:
        deadline = time.time() + 60
        while True:
            if proc.poll() is not None:
                pytest.fail("the server exited (%s) before it answered:\n%s" % (proc.returncode,
                                                                             (out / "server.log").read_text()))
            try:
                get_json(base + "/v1/models")
                break
            except OSError:
                if time.time() > deadline:
                    pytest.fail("the server did not answer within 60 s:\n" + (out / "server.log").read_text())
                time.sleep(0.2)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@pytest.fixture(scope="module")
def browser():
    binary, driver_path, why = find_browser()
    if why:
        pytest.skip(why)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1200,900", "--no-first-run", "--disable-extensions"):
        opts.add_argument(arg)
    # the driver is given by path, so Selenium Manager never tries to download one
    drv = webdriver.Chrome(service=Service(executable_path=driver_path), options=opts)
    drv.set_page_load_timeout(30)
    yield drv
    drv.quit()


def wait_for(drv, script, timeout=30, what="condition"):
    """Poll a JS expression until it is truthy; returns its value."""
    deadline = time.time() + timeout
    while True:
        value = drv.execute_script("return (" + script + ");")
        if value:
            return value
        if time.time() > deadline:
            page = drv.execute_script("return document.getElementById('messages').innerText + "
                                      "' | status: ' + document.getElementById('status').innerText;")
            log = SERVER_LOG[0].read_text()[-3000:] if SERVER_LOG else ""
            raise AssertionError("timed out after %ss waiting for %s (%s); the page shows: %s\nserver log:\n%s"
                                 % (timeout, what, script, page, log))
        time.sleep(0.05)


# records the growth of the last assistant bubble: every text length it shows, in order
WATCH = """
window.__lengths = [];
const target = document.getElementById('messages');
window.__obs && window.__obs.disconnect();
window.__obs = new MutationObserver(() => {
  const all = document.querySelectorAll('.msg.assistant .content');
  if (!all.length) return;
  const n = all[all.length - 1].textContent.length;
  if (window.__lengths[window.__lengths.length - 1] !== n) window.__lengths.push(n);
});
window.__obs.observe(target, {childList: true, subtree: true, characterData: true});
"""


def send(drv, text):
    from selenium.webdriver.common.by import By

    box = drv.find_element(By.ID, "input")
    box.clear()
    box.send_keys(text)
    drv.execute_script(WATCH)
    drv.find_element(By.ID, "send").click()
    wait_for(drv, "window.minillmChat.state.busy === false && "
                  "window.minillmChat.history.length > 0 && "
                  "window.minillmChat.history[window.minillmChat.history.length - 1].role === 'assistant'",
             what="the reply to finish")
    return drv.execute_script("return window.__lengths;")


def test_chat_page_streams_keeps_history_and_shows_errors(browser, server, tmp_path):
    from selenium.webdriver.common.by import By

    drv = browser
    drv.get(server + "/")
    assert drv.title == "minillm chat"
    # the model list comes from /v1/models: the base model and its LoRA, so the choice is enabled
    ids = [m["id"] for m in get_json(server + "/v1/models")["data"]]
    assert len(ids) == 2, ids
    options = wait_for(drv, "Array.from(document.querySelectorAll('#model option')).map(o => o.value)",
                       what="the model list")
    assert options == ids
    assert drv.find_element(By.ID, "model").is_enabled()
    # sampled (greedy, a random model with tied embeddings repeats its last token: blank lines)
    for field, value in (("max_tokens", "48"), ("temperature", "1")):
        drv.find_element(By.ID, field).clear()
        drv.find_element(By.ID, field).send_keys(value)

    # turn 1: the reply streams in, the bubble's text growing over several updates
    lengths = send(drv, "Hello, who are you?")
    bubbles = drv.find_elements(By.CSS_SELECTOR, ".msg.assistant .content")
    assert len(bubbles) == 1 and bubbles[0].text.strip(), "no reply text"
    assert len([n for n in lengths if n > 0]) >= 3 and lengths == sorted(lengths), lengths
    print("reply 1 grew through %d lengths: %s" % (len(lengths), lengths))
    first = drv.execute_script("return window.minillmChat.state.lastRequest;")
    assert first["stream"] is True and first["max_tokens"] == 48 and first["temperature"] == 1 and first["model"] == ids[0]
    assert first["messages"] == [{"role": "user", "content": "Hello, who are you?"}]
    reply1 = drv.execute_script("return window.minillmChat.history[1].content;")
    # the server's own count (usage, asked for with stream_options.include_usage) is the prompt rendered
    # from exactly these messages, thinking off: the empty think block prefilled
    tok = Tokenizer.load()
    usage1 = drv.execute_script("return window.minillmChat.state.lastUsage;")
    assert usage1["prompt_tokens"] == len(tok.render_prompt(first["messages"]) + tok.encode(THINK_OFF_PREFILL))

    # turn 2, on the LoRA with thinking on: the request carries the whole conversation
    drv.execute_script("const s = document.getElementById('model'); s.value = arguments[0];"
                       "s.dispatchEvent(new Event('change'));", ids[1])
    drv.find_element(By.ID, "thinking").click()
    send(drv, "And what can you do?")
    second = drv.execute_script("return window.minillmChat.state.lastRequest;")
    assert second["model"] == ids[1] and second["open_thinking"] is True
    assert second["messages"] == [{"role": "user", "content": "Hello, who are you?"},
                                  {"role": "assistant", "content": reply1},
                                  {"role": "user", "content": "And what can you do?"}]
    usage2 = drv.execute_script("return window.minillmChat.state.lastUsage;")
    assert usage2["prompt_tokens"] == len(tok.render_prompt(second["messages"], open_thinking=True)), (usage1, usage2)
    assert usage2["prompt_tokens"] > usage1["prompt_tokens"]   # the server got the first turn too
    assert len(drv.find_elements(By.CSS_SELECTOR, ".msg.user")) == 2
    assert len(drv.find_elements(By.CSS_SELECTOR, ".msg.assistant")) == 2
    shot = tmp_path / "chat_page.png"
    drv.save_screenshot(str(shot))
    assert shot.stat().st_size > 1000
    print("screenshot:", shot)

    # Stop: a long reply cut short keeps what came, and that is what the history holds (thinking off
    # again: with it on, the open think block would take the whole reply as reasoning)
    drv.find_element(By.ID, "thinking").click()
    drv.find_element(By.ID, "max_tokens").clear()
    drv.find_element(By.ID, "max_tokens").send_keys("700")
    drv.find_element(By.ID, "input").send_keys("Tell me a long story.")
    drv.find_element(By.ID, "send").click()
    wait_for(drv, "document.querySelectorAll('.msg.assistant').length === 3 && "
                  "document.querySelectorAll('.msg.assistant .content')[2].textContent.length > 0",
             what="the third reply to start")
    drv.find_element(By.ID, "stop").click()
    wait_for(drv, "window.minillmChat.state.busy === false", what="the stopped reply to end")
    stopped = drv.execute_script("const b = document.querySelectorAll('.msg.assistant')[2];"
                                 "return [b.dataset.finish, b.querySelector('.content').textContent,"
                                 "        window.minillmChat.history];")
    assert stopped[0] == "stopped" and stopped[1], stopped[:2]
    assert len(stopped[2]) == 6 and stopped[2][5] == {"role": "assistant", "content": stopped[1]}

    # an error from the server ({"error": {"message": ...}}, 4xx) is shown, and the failed turn
    # leaves the history (its text goes back into the input box)
    drv.execute_script("const s = document.getElementById('model'); const o = document.createElement('option');"
                       "o.value = o.textContent = 'minillm:no_such_model'; s.appendChild(o); s.value = o.value;")
    box = drv.find_element(By.ID, "input")
    box.send_keys("this one fails")
    drv.find_element(By.ID, "send").click()
    err = wait_for(drv, "(document.querySelector('.msg .error') || {}).textContent", what="the error message")
    assert "no_such_model" in err or "model" in err.lower(), err
    assert drv.execute_script("return window.minillmChat.history.length;") == 6
    assert drv.find_element(By.ID, "input").get_attribute("value") == "this one fails"

    # clear chat forgets everything
    drv.find_element(By.ID, "clear").click()
    assert drv.execute_script("return window.minillmChat.history.length;") == 0
    assert drv.find_elements(By.CSS_SELECTOR, ".msg") == []


def test_chat_page_is_self_contained():
    """Nothing fetched from anywhere but this server: no http(s) URLs in src/href/url()/fetch."""
    import re

    html = PAGE.read_text(encoding="utf-8")
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", html)
    assert not re.search(r"url\(\s*['\"]?(https?:)?//", html)
    assert not re.search(r"""fetch\(\s*["'`]https?:""", html)
    assert "@import" not in html
