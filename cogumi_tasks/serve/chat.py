"""The chat UI: a Gradio 6 app that talks to the gateway over HTTP only.

Streamed answers come through the official ``openai`` client (the session id in the ``X-Cogumi-Session`` header and
the ``user`` field); feedback and the session's earlier turns through ``POST /v1/feedback`` and
``GET /v1/sessions/{id}``. The model dropdown is the manual override (``cogumi-auto`` lets the gateway route); the
panel lists, for each answer of this page, the route, reason, confidence and escalation from the stream's final
metadata chunk (key ``cogumi``). The session id lives in the browser's localStorage, so a reload shows the earlier
turns from the gateway's session memory (queries and their routes: the gateway keeps no answers). Routing,
thresholds and escalation stay in the gateway; this module only shows what it returns.

    cogumi chat --api http://127.0.0.1:8300/v1 --api-key-env COGUMI_API_KEY
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import gradio as gr

DEFAULT_MODEL = "cogumi-auto"
SESSION_HEADER = "X-Cogumi-Session"


class GatewayError(RuntimeError):
    """The gateway answered with an error or could not be reached; the message says which."""


class Gateway:
    """The gateway's HTTP surface as the chat needs it (one ``openai`` and one ``httpx`` client, thread-safe)."""

    def __init__(self, api_base: str, api_key: str, timeout_s: float = 120.0, max_tokens: int | None = None):
        import httpx
        from openai import OpenAI

        self.api_base = api_base.rstrip("/")
        self.max_tokens = max_tokens
        self.client = OpenAI(base_url=self.api_base, api_key=api_key, timeout=timeout_s, max_retries=0)
        self.http = httpx.Client(base_url=self.api_base + "/", timeout=timeout_s,
                                 headers={"Authorization": f"Bearer {api_key}"})

    def models(self) -> list[str]:
        """The model ids ``GET /v1/models`` lists, in the gateway's order."""
        with self._errors("GET /v1/models"):
            return [m.id for m in self.client.models.list()]

    def turns(self, session: str) -> list[dict[str, Any]]:
        """The session's turns the gateway still holds (``GET /v1/sessions/{id}``), oldest first."""
        with self._errors(f"GET /v1/sessions/{session}"):
            response = self.http.get(f"sessions/{session}")
            _raise_for(response)
            return sorted(response.json()["turns"], key=lambda t: t["seq"])

    def feedback(self, request_id: str, value: str) -> None:
        """Send thumbs ``up`` or ``down`` for the answer ``request_id``."""
        with self._errors("POST /v1/feedback"):
            _raise_for(self.http.post("feedback", json={"request_id": request_id, "value": value}))

    def stream(self, model: str, messages: list[dict[str, str]], session: str) -> Iterator[str | dict[str, Any]]:
        """Stream one answer: the content deltas (``str``), then the final metadata (``dict``, key ``cogumi``)."""
        extra = {} if self.max_tokens is None else {"max_tokens": self.max_tokens}
        with self._errors("POST /v1/chat/completions"):
            stream = self.client.chat.completions.create(model=model, messages=messages, stream=True, user=session,
                                                         extra_headers={SESSION_HEADER: session}, **extra)
            for chunk in stream:
                meta = (chunk.model_extra or {}).get("cogumi")
                if meta:
                    yield dict(meta)
                for choice in chunk.choices:
                    if choice.delta.content:
                        yield choice.delta.content

    def _errors(self, what: str):
        return _GatewayErrors(what, self.api_base)


class _GatewayErrors:
    """Turn the clients' errors into one :class:`GatewayError` naming the call and the gateway's message."""

    def __init__(self, what: str, api_base: str):
        self.what, self.api_base = what, api_base

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type, exc, tb) -> bool:
        import httpx
        import openai

        if exc is None or isinstance(exc, GatewayError):
            return False
        if isinstance(exc, openai.APIStatusError):
            raise GatewayError(f"{self.what}: HTTP {exc.status_code}: {_message(exc.body) or exc.message}") from exc
        if isinstance(exc, (openai.APIConnectionError, httpx.TransportError)):
            raise GatewayError(f"{self.what}: gateway unreachable at {self.api_base} ({exc})") from exc
        return False


def _message(body: object) -> str:
    """The message of an OpenAI-style error body ``{"error": {"message": ...}}`` (or a ``detail``), else ``""``."""
    if isinstance(body, dict):
        error = body.get("error", body)
        if isinstance(error, dict) and (error.get("message") or error.get("detail")):
            return str(error.get("message") or error["detail"])[:500]
    return ""


def _raise_for(response) -> None:
    if response.status_code >= 400:
        try:
            text = _message(response.json())
        except ValueError:
            text = ""
        raise GatewayError(f"{response.request.method} {response.request.url.path}: HTTP {response.status_code}: "
                           f"{text or response.text[:200]}")


def turns_as_messages(turns: list[dict[str, Any]]) -> list[dict[str, str]]:
    """The session's earlier turns as chat messages: each query, and in place of its answer (the gateway keeps
    none) the route, confidence and outcome it had."""
    shown: list[dict[str, str]] = []
    for turn in turns:
        shown.append({"role": "user", "content": str(turn["query"])})
        shown.append({"role": "assistant", "content": f"*earlier answer (not kept): route {turn['route']}, "
                                                      f"confidence {_number(turn.get('confidence'))}, "
                                                      f"{turn.get('outcome', 'pending')}*"})
    return shown


def _number(value: object) -> str:
    return "–" if value is None else f"{float(value):.3g}"  # 3 significant digits: a calibrated 0.0045 stays 0.0045


def routes_table(answers: list[dict[str, Any]]) -> str:
    """The panel: one row per answer of this page (model asked, route, reason, confidence, escalation, feedback)."""
    if not answers:
        return "*No answer yet: each answer's route, reason and confidence appear here.*"
    rows = ["| # | model | route | reason | confidence | escalated | feedback |", "|---|---|---|---|---|---|---|"]
    for i, a in enumerate(answers, 1):
        rows.append(f"| {i} | {a['model']} | {a.get('route', '?')} | {a.get('reason', '?')} | "
                    f"{_number(a.get('confidence'))} | {'yes' if a.get('escalated') else 'no'} | "
                    f"{a.get('feedback') or ''} |")
    return "\n".join(rows)


def tally(answers: list[dict[str, Any]]) -> str:
    """Feedback given in this page's session: thumbs up and down over the answers rated."""
    up = sum(a.get("feedback") == "up" for a in answers)
    down = sum(a.get("feedback") == "down" for a in answers)
    return f"Feedback this session: {up} up, {down} down (of {len(answers)} answers)"


def create_chat(api_base: str, api_key: str, *, title: str = "Cogumi chat", timeout_s: float = 120.0,
                max_tokens: int | None = None) -> gr.Blocks:
    """The chat app for the gateway at ``api_base`` (``http://host:port/v1``), authenticating with ``api_key``."""
    import gradio as gr

    gateway = Gateway(api_base, api_key, timeout_s=timeout_s, max_tokens=max_tokens)

    def on_load(session: str | None):
        session = session or uuid.uuid4().hex
        notes, choices, earlier = [f"Session `{session}`"], [DEFAULT_MODEL], []
        try:
            choices = gateway.models()
            earlier = turns_as_messages(gateway.turns(session))
        except GatewayError as exc:
            notes.append(f"**{exc}**")
        value = DEFAULT_MODEL if DEFAULT_MODEL in choices else choices[0]
        return (session, gr.Dropdown(choices=choices, value=value), earlier, earlier, [], [],
                routes_table([]), tally([]), " · ".join(notes))

    def on_send(text: str, model: str, session: str, earlier: list, messages: list, answers: list):
        if not text.strip():
            yield gr.skip(), earlier + messages, messages, answers, gr.skip(), gr.skip(), gr.skip()
            return
        messages = [*messages, {"role": "user", "content": text}]
        shown = [*earlier, *messages, {"role": "assistant", "content": ""}]
        yield "", shown, messages, answers, gr.skip(), gr.skip(), "…"
        reply, meta = "", None
        try:
            for part in gateway.stream(model, messages, session):
                if isinstance(part, dict):
                    meta = part
                    continue
                reply += part
                shown[-1] = {"role": "assistant", "content": reply}
                yield gr.skip(), shown, messages, answers, gr.skip(), gr.skip(), gr.skip()
        except GatewayError as exc:
            # the failed question stays out of the history sent next time; the error is shown, not hidden
            yield text, [*earlier, *messages[:-1]], messages[:-1], answers, gr.skip(), gr.skip(), f"**{exc}**"
            return
        messages = [*messages, {"role": "assistant", "content": reply}]
        status = "" if meta else "**The gateway sent no `cogumi` metadata chunk for this answer.**"
        answers = [*answers, {"model": model, "feedback": None, **(meta or {})}]
        yield gr.skip(), [*earlier, *messages], messages, answers, routes_table(answers), tally(answers), status

    def on_feedback(value: str, answers: list):
        if not answers or not answers[-1].get("request_id"):
            return answers, gr.skip(), gr.skip(), "**No answer with a request id to rate yet.**"
        try:
            gateway.feedback(answers[-1]["request_id"], value)
        except GatewayError as exc:
            return answers, gr.skip(), gr.skip(), f"**{exc}**"
        answers = [*answers[:-1], {**answers[-1], "feedback": value}]
        return answers, routes_table(answers), tally(answers), f"Thumbs {value} sent for answer {len(answers)}."

    with gr.Blocks(title=title, analytics_enabled=False) as demo:
        session = gr.BrowserState(None, storage_key="cogumi-session")
        earlier = gr.State([])  # the session's turns from the gateway's memory, shown above this page's
        messages = gr.State([])  # this page's conversation, sent with each request
        answers = gr.State([])  # per answer: the model asked, the gateway's metadata, the feedback given
        gr.Markdown(f"## {title}")
        with gr.Row():
            with gr.Column(scale=1):
                chatbot = gr.Chatbot(label="Conversation", elem_id="cogumi-chat", height=460, feedback_options=None)
                with gr.Row():
                    box = gr.Textbox(placeholder="Ask something and press Enter", show_label=False, scale=5,
                                     elem_id="cogumi-input")
                    send = gr.Button("Send", variant="primary", scale=1, elem_id="cogumi-send")
            with gr.Column(scale=1):
                model = gr.Dropdown(choices=[DEFAULT_MODEL], value=DEFAULT_MODEL, label="Model (manual override)",
                                    info="cogumi-auto: the gateway routes each question", elem_id="cogumi-model")
                routes = gr.Markdown(routes_table([]), elem_id="cogumi-routes")
                with gr.Row():
                    up = gr.Button("Thumbs up", elem_id="cogumi-up")
                    down = gr.Button("Thumbs down", elem_id="cogumi-down")
                score = gr.Markdown(tally([]), elem_id="cogumi-tally")
                status = gr.Markdown("", elem_id="cogumi-status")

        demo.load(on_load, inputs=[session],
                  outputs=[session, model, earlier, chatbot, messages, answers, routes, score, status])
        send_inputs = [box, model, session, earlier, messages, answers]
        send_outputs = [box, chatbot, messages, answers, routes, score, status]
        send.click(on_send, send_inputs, send_outputs)
        box.submit(on_send, send_inputs, send_outputs)
        chatbot.clear(lambda: ([], []), None, [earlier, messages])  # a fresh conversation; the tally stays
        up.click(lambda a: on_feedback("up", a), [answers], [answers, routes, score, status])
        down.click(lambda a: on_feedback("down", a), [answers], [answers, routes, score, status])
    return demo


def launch_chat(api_base: str, api_key: str, *, host: str = "127.0.0.1", port: int = 7860, block: bool = True,
                **kwargs: Any) -> gr.Blocks:
    """Serve :func:`create_chat` on ``host:port`` (loopback by default); ``block=False`` returns once it listens."""
    demo = create_chat(api_base, api_key, **kwargs)
    demo.queue(default_concurrency_limit=8)
    demo.launch(server_name=host, server_port=port, prevent_thread_lock=not block, quiet=True, show_error=True,
                footer_links=[])
    return demo
