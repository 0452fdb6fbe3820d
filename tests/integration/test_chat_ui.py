"""The chat UI in real headless Chromium against a real gateway (the small release on the embedded llama.cpp engine):
two messages routed by cogumi-auto, the manual override switched to a modifier, thumbs-up feedback, the panel's
route/reason per answer checked against the gateway's session memory and metrics, and a reload that shows the
session's earlier turns. Screenshots of each step go to the test artifacts (tests/browser.py)."""

from __future__ import annotations

import re
import uuid

import pytest

# S's module-local fixtures: the small release and engine (``world``) and a gateway on a loopback port (``_serve``)
from tests.integration.test_serve_gateway import CODE_PROMPT, KEY, _serve, world  # noqa: F401

OVERRIDE = "cogumi-reasoning"


@pytest.fixture(scope="module")
def gateway(world):  # noqa: F811
    url, gw, stop = _serve(world, f"chat-{uuid.uuid4().hex[:6]}")
    yield url, gw
    stop()


@pytest.fixture(scope="module")
def chat_url(gateway):
    from cogumi_tasks.serve.chat import launch_chat
    from cogumi_tasks.stack.services import free_port

    port = free_port()
    demo = launch_chat(f"{gateway[0]}/v1", KEY, port=port, block=False, max_tokens=12)
    yield f"http://127.0.0.1:{port}/"
    demo.close()


def _ask(page, text: str, n: int) -> None:
    """Type ``text``, press Enter and wait for the ``n``-th answer's row in the panel."""
    page.fill("#cogumi-input textarea", text)
    page.press("#cogumi-input textarea", "Enter")
    page.locator("#cogumi-tally").filter(has_text=f"(of {n} answers)").wait_for()
    assert page.locator("#cogumi-status").inner_text().strip() == ""  # no gateway error shown


def _panel(page) -> list[dict[str, str]]:
    head = [c.strip() for c in page.locator("#cogumi-routes table thead th").all_inner_texts()]
    return [dict(zip(head, (c.strip() for c in row.locator("td").all_inner_texts()), strict=True))
            for row in page.locator("#cogumi-routes table tbody tr").all()]


def test_chat_ui_in_a_real_browser(chat_url, gateway):
    import httpx

    from cogumi_tasks.routing.planted import general_prompts
    from tests.browser import chromium_page, shot

    url, gw = gateway
    up_before = gw.metrics.sample("cogumi_feedback_total", {"route": "reasoning", "value": "up"}) or 0
    with chromium_page("chat-ui", timeout_ms=90_000) as page:
        page.goto(chat_url)
        page.locator("#cogumi-status").filter(has_text="Session").wait_for()
        session = re.search(r"Session (\S+)", page.locator("#cogumi-status").inner_text()).group(1)
        assert page.locator("#cogumi-model input").input_value() == "cogumi-auto"
        shot(page, "chat-ui/01-loaded")

        _ask(page, CODE_PROMPT, 1)
        shot(page, "chat-ui/02-first-answer")
        _ask(page, general_prompts()[0], 2)
        shot(page, "chat-ui/03-second-answer")

        page.locator("#cogumi-model input").click()
        page.get_by_role("option", name=OVERRIDE).click()
        assert page.locator("#cogumi-model input").input_value() == OVERRIDE
        shot(page, "chat-ui/04-override")
        _ask(page, "What is 2 + 3?", 3)
        shot(page, "chat-ui/05-override-answer")

        page.click("#cogumi-up")
        page.locator("#cogumi-tally").filter(has_text="1 up, 0 down").wait_for()
        shot(page, "chat-ui/06-thumbs-up")
        rows = _panel(page)
        answers = page.locator("#cogumi-chat .bot").all_inner_texts()

        # the gateway's own record of the session: the same routes, the feedback on the last answer
        turns = httpx.get(f"{url}/v1/sessions/{session}", headers={"Authorization": f"Bearer {KEY}"}).json()["turns"]
        turns.sort(key=lambda t: t["seq"])
        assert [r["model"] for r in rows] == ["cogumi-auto", "cogumi-auto", OVERRIDE]
        assert [r["route"] for r in rows] == [t["route"] for t in turns]
        assert all(r["reason"] in ("confident", "router", "escalation") for r in rows[:2])
        assert (rows[2]["route"], rows[2]["reason"], rows[2]["feedback"]) == ("reasoning", "override", "up")
        for row, turn in zip(rows[:2], turns, strict=False):  # 3 significant digits; none after an escalation
            assert row["confidence"] == "–" if row["reason"] == "escalation" else \
                float(row["confidence"]) == pytest.approx(turn["confidence"], rel=0.01)
        assert turns[2]["outcome"] == "thumbs_up"
        assert gw.metrics.sample("cogumi_feedback_total", {"route": "reasoning", "value": "up"}) == up_before + 1
        assert len(answers) == 3 and all(a.strip() for a in answers)

        # a reload keeps the session (browser storage) and shows its turns from the gateway's memory
        page.reload()
        page.locator("#cogumi-chat").filter(has_text="thumbs_up").wait_for()
        assert f"Session {session}" in page.locator("#cogumi-status").inner_text()
        history = page.locator("#cogumi-chat").inner_text()
        assert "What is 2 + 3?" in history and "route reasoning" in history
        assert all(f"route {t['route']}" in history for t in turns)
        shot(page, "chat-ui/07-reloaded-history")
