"""Automation family ``tool_call``: a request and 3-4 tools -> one JSON tool call.

The prompt lists the tools one per line (``- set_timer(minutes: integer, label?: string): Start a countdown
timer.``) and asks for one call; the reference is ``{"name": "set_timer", "arguments": {"minutes": 5}}``. The
checker compares name and arguments after the same normalisation as the ``tool_use`` suite (numbers numerically,
strings case-insensitively, no extra or missing keys). The payload has the suite's ``tools``/``expected`` shape.
"""

from __future__ import annotations

import json
import random
import re

from cogumi_tasks.world.base import Family, Instance

# slot -> values (strings) or ("int", lo, hi, step)
SLOTS: dict[str, tuple] = {
    "city": ("Lisbon", "Oslo", "Cairo", "Lima", "Tokyo", "Paris", "Denver", "Nairobi", "Seoul", "Dublin", "Quito",
             "Perth"),
    "unit": ("celsius", "fahrenheit"),
    "minutes": ("int", 1, 60, 1),
    "label": ("tea", "pasta", "laundry", "workout", "nap", "eggs", "bread", "parking"),
    "to": ("bob@example.com", "ana@example.com", "team@example.com", "li@example.org", "sam@example.net",
           "hr@example.com"),
    "subject": ("Lunch", "Invoice", "Meeting", "Report", "Party", "Update", "Holiday", "Budget"),
    "song": ("Blue Sky", "Night Drive", "Summer Rain", "Golden Hour", "Paper Moon", "Slow River", "Neon Lights"),
    "artist": ("The Owls", "Mira Lane", "DJ Cobalt", "Sunny Hill", "Red Canyon"),
    "amount": ("int", 5, 500, 5),
    "from": ("USD", "EUR", "GBP", "JPY", "CHF"),
    "currency": ("USD", "EUR", "GBP", "JPY", "CHF"),
    "task": ("buy milk", "call the plumber", "pay rent", "water the plants", "book a dentist visit",
             "renew my passport", "clean the garage", "send the invoice", "walk the dog", "fix the bike"),
    "time": tuple(f"{h:02d}:{m:02d}" for h in range(5, 11) for m in (0, 15, 30, 45)),
    "name": ("Maria", "Tom", "Priya", "Chen", "Sofia", "Luke", "Amara", "Diego", "Yuki", "Noah"),
    "text": ("good morning", "thank you", "where is the station", "see you soon", "how much is this", "good night"),
    "language": ("French", "German", "Spanish", "Italian", "Portuguese", "Dutch"),
    "room": ("kitchen", "bedroom", "office", "hallway", "garage", "bathroom", "attic"),
    "brightness": ("int", 10, 100, 10),
}
# tool -> (description, [(argument, slot, type, required)], [(request template, [arguments it sets])])
TOOLS: dict[str, tuple[str, list[tuple[str, str, str, bool]], list[tuple[str, list[str]]]]] = {
    "get_weather": ("Get the weather forecast for a city.",
                    [("city", "city", "string", True), ("unit", "unit", "string", False)],
                    [("What's the weather in {city}?", ["city"]),
                     ("Tell me the weather in {city} in {unit}.", ["city", "unit"])]),
    "set_timer": ("Start a countdown timer.",
                  [("minutes", "minutes", "integer", True), ("label", "label", "string", False)],
                  [("Set a timer for {minutes} minutes.", ["minutes"]),
                   ("Start a {minutes} minute timer called {label}.", ["minutes", "label"])]),
    "send_email": ("Send an email.", [("to", "to", "string", True), ("subject", "subject", "string", True)],
                   [("Email {to} with the subject {subject}.", ["to", "subject"])]),
    "play_music": ("Play a song.", [("song", "song", "string", True), ("artist", "artist", "string", False)],
                   [("Play {song} by {artist}.", ["song", "artist"]), ("Play {song}.", ["song"])]),
    "convert_currency": ("Convert an amount of money.",
                         [("amount", "amount", "number", True), ("from", "from", "string", True),
                          ("to", "currency", "string", True)],
                         [("Convert {amount} {from} to {to}.", ["amount", "from", "to"])]),
    "add_todo": ("Add an item to the to-do list.", [("task", "task", "string", True)],
                 [("Add {task} to my to-do list.", ["task"])]),
    "set_alarm": ("Set an alarm.", [("time", "time", "string", True)], [("Wake me up at {time}.", ["time"])]),
    "call_contact": ("Phone a contact.", [("name", "name", "string", True)], [("Call {name}.", ["name"])]),
    "translate_text": ("Translate text.", [("text", "text", "string", True), ("language", "language", "string", True)],
                       [("Translate {text} into {language}.", ["text", "language"])]),
    "turn_on_lights": ("Turn on the lights in a room.",
                       [("room", "room", "string", True), ("brightness", "brightness", "integer", False)],
                       [("Turn on the {room} lights at {brightness} percent.", ["room", "brightness"]),
                        ("Turn on the lights in the {room}.", ["room"])]),
}
INSTRUCTIONS = (
    "Tools:\n{tools}\nRequest: {request}\nReply with one JSON tool call.",
    "You can call these tools:\n{tools}\nUser: {request}\nAnswer with a JSON object {{\"name\": ..., "
    "\"arguments\": {{...}}}}.",
    "{request}\nChoose one of these tools and answer with its JSON call:\n{tools}",
)


def _slot_of(tool: str, arg: str) -> str:
    return next(s for a, s, _, _ in TOOLS[tool][1] if a == arg)


def _draw(slot: str, rng: random.Random):
    spec = SLOTS[slot]
    return rng.randrange(spec[1], spec[2] + 1, spec[3]) if spec[0] == "int" else rng.choice(spec)


def tool_line(tool: str) -> str:
    desc, args, _ = TOOLS[tool]
    sig = ", ".join(f"{a}{'' if req else '?'}: {typ}" for a, _, typ, req in args)
    return f"- {tool}({sig}): {desc}"


def tool_schema(tool: str) -> dict:
    """The tool as an OpenAI-style function schema (the ``tool_use`` suite's ``tools`` entries)."""
    desc, args, _ = TOOLS[tool]
    props = {}
    for a, slot, typ, _ in args:
        prop: dict = {"type": typ}
        if SLOTS[slot][0] != "int" and typ == "string" and len(SLOTS[slot]) <= 5:
            prop["enum"] = list(SLOTS[slot])
        props[a] = prop
    return {"name": tool, "description": desc,
            "parameters": {"type": "object", "properties": props, "required": [a for a, _, _, r in args if r]}}


class ToolCalls(Family):
    name = "tool_call"
    domain = "automation"
    key_ignores = ("tools",)  # the same request with other distractors is the same task

    def sample_params(self, rng: random.Random) -> dict:
        tool = rng.choice(tuple(TOOLS))
        template = rng.randrange(len(TOOLS[tool][2]))
        args = {a: _draw(_slot_of(tool, a), rng) for a in TOOLS[tool][2][template][1]}
        others = rng.sample([t for t in TOOLS if t != tool], rng.randint(2, 3))  # 3-4 tools: short prompts
        tools = [tool, *others]
        rng.shuffle(tools)
        return {"tool": tool, "template": template, "args": args, "tools": tools}

    def render(self, params: dict, rng: random.Random) -> str:
        request = TOOLS[params["tool"]][2][params["template"]][0].format(**params["args"])
        tools = "\n".join(tool_line(t) for t in params["tools"])
        return rng.choice(INSTRUCTIONS).format(tools=tools, request=request)

    def solve(self, params: dict) -> str:
        return json.dumps({"name": params["tool"], "arguments": params["args"]})

    def payload(self, params: dict, rng: random.Random) -> dict:
        return {"tools": [tool_schema(t) for t in params["tools"]],
                "expected": {"name": params["tool"], "arguments": params["args"]}}

    def parse(self, prompt: str) -> dict | None:
        for ins in INSTRUCTIONS:
            pattern = re.escape(ins.replace("{{", "{").replace("}}", "}"))
            pattern = pattern.replace(re.escape("{tools}"), r"(?P<tools>(?:- [^\n]+\n?)+?)")
            pattern = pattern.replace(re.escape("{request}"), r"(?P<request>[^\n]+)")
            m = re.fullmatch(pattern, prompt.strip())
            if m is None:
                continue
            lines = m["tools"].strip("\n").split("\n")
            names = [ln.split("(", 1)[0][2:] for ln in lines]
            if not 3 <= len(names) <= 5 or any(n not in TOOLS or tool_line(n) != ln
                                               for n, ln in zip(names, lines, strict=True)):
                continue
            for tool in names:
                for i, (tpl, argnames) in enumerate(TOOLS[tool][2]):
                    args = _match_request(tool, tpl, argnames, m["request"])
                    if args is not None:
                        return {"tool": tool, "template": i, "args": args, "tools": names}
        return None

    def check(self, instance: Instance, answer: str) -> tuple[bool, str]:
        from cogumi_tasks.world.answers import extract_json_object, same_value

        call, want = extract_json_object(answer), instance.payload["expected"]
        if call is None:
            return False, "no JSON object in the answer"
        name, args = call.get("name"), call.get("arguments", {})
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except json.JSONDecodeError:
                return False, "arguments is a string that is not JSON"
        if name != want["name"]:
            return False, f"called {name!r}, expected {want['name']!r}"
        if not isinstance(args, dict) or not same_value(args, want["arguments"]):
            return False, f"arguments {json.dumps(args)} differ from the expected {json.dumps(want['arguments'])}"
        return True, f"called {name} with the expected arguments"


def _match_request(tool: str, tpl: str, argnames: list[str], request: str) -> dict | None:
    pattern = re.escape(tpl)
    for a in argnames:
        pattern = pattern.replace(re.escape("{" + a + "}"), f"(?P<{a}>.+?)")
    m = re.fullmatch(pattern, request)
    if m is None:
        return None
    args: dict = {}
    for a in argnames:
        spec, raw = SLOTS[_slot_of(tool, a)], m[a]
        if spec[0] == "int":
            if not raw.isdigit() or not spec[1] <= int(raw) <= spec[2]:
                return None
            args[a] = int(raw)
        elif raw in spec:
            args[a] = raw
        else:
            return None
    return args
