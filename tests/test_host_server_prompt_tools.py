"""The prompt tools on the real server: an ``/interrupt`` stops the negation splitter in the middle of a
long prompt within a second, and the server goes on to the next prompt. The server is the
session-scoped ``server`` fixture (``conftest.py``)."""
from __future__ import annotations

import time

from server_support import finished, get, post, queue, wait

POLL = 0.05


def splitter_prompt(text: str) -> dict:
    return {"1": {"class_type": "NegationSplitter", "inputs": {"text": text, "extra_negative": ""}},
            "2": {"class_type": "PreviewAny", "inputs": {"source": ["1", 1]}}}


def running(url, prompt_id) -> bool:
    return any(item[1] == prompt_id for item in get(url, "/queue")["queue_running"])


def test_an_interrupt_stops_the_splitter_within_a_second(server):
    url = server["url"]
    text = "a man without mustache, (no hat:1.2), not without courage; " * 120000  # 7 MB: many seconds to split
    prompt_id = queue(url, splitter_prompt(text))
    deadline = time.time() + 60
    while not running(url, prompt_id) and time.time() < deadline:
        time.sleep(POLL)
    time.sleep(1.5)  # inside the splitter by now
    assert finished(url, prompt_id) is None, "the prompt ended before the interrupt: make the text longer"
    sent = time.time()
    status, _ = post(url, "/interrupt", {"prompt_id": prompt_id})
    assert status == 200
    entry = wait(url, prompt_id, timeout=30, poll=POLL)
    took = time.time() - sent
    events = dict(entry["status"]["messages"])
    assert "execution_interrupted" in events and events["execution_interrupted"]["node_type"] == "NegationSplitter"
    assert took < 1.0, took
    after = wait(url, queue(url, splitter_prompt("a man without mustache")), timeout=60)
    assert after["status"]["status_str"] == "success"
