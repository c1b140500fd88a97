"""Structured outputs and tool calls through `kvserve serve` on the embedded SmolLM2-135M-Instruct,
driven by the official openai client: JSON-schema answers parse and validate against their schema
on 20 varied schemas, json_object answers are objects, vLLM's structured_outputs / guided_*
fields constrain to a regex or a choice, tool calls parse streamed and not (a named function, a
required call, Hermes-style calls under auto), and bad specs are a 400 naming the field."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import openai
import pytest
import requests

from kvserve.server.tools import ToolPlan, ToolStream, parse_calls


def S(**kw) -> dict:
    """A string schema."""
    return dict(type="string", **kw)


def OBJ(props: dict, req: list | None = None) -> dict:
    """An object schema: these properties, all required unless req says which."""
    return {
        "type": "object",
        "properties": props,
        "required": list(req if req is not None else props),
        "additionalProperties": False,
    }


# twenty schemas of varied shapes: nested objects, enums, arrays, bounded numbers, patterns,
# optional and nullable fields, anyOf, const, a top-level array
SCHEMAS = [
    (
        "person",
        OBJ({"name": S(maxLength=30), "age": {"type": "integer", "minimum": 0, "maximum": 120}}),
    ),
    ("colour", OBJ({"colour": {"enum": ["red", "green", "blue"]}})),
    (
        "point",
        OBJ(
            {
                "x": {"type": "number", "minimum": -10, "maximum": 10},
                "y": {"type": "number", "minimum": -10, "maximum": 10},
            }
        ),
    ),
    (
        "tags",
        OBJ({"tags": {"type": "array", "items": S(maxLength=12), "minItems": 1, "maxItems": 4}}),
    ),
    (
        "address",
        OBJ({"street": S(maxLength=40), "city": S(maxLength=30), "zip": S(pattern="^[0-9]{5}$")}),
    ),
    (
        "nested",
        OBJ(
            {
                "user": OBJ(
                    {
                        "id": {"type": "integer", "minimum": 1, "maximum": 9999},
                        "email": S(maxLength=40),
                    }
                ),
                "active": {"type": "boolean"},
            }
        ),
    ),
    (
        "order",
        OBJ(
            {
                "items": {
                    "type": "array",
                    "maxItems": 3,
                    "items": OBJ(
                        {
                            "sku": S(maxLength=10),
                            "qty": {"type": "integer", "minimum": 1, "maximum": 9},
                        }
                    ),
                },
                "total": {"type": "number", "minimum": 0},
            }
        ),
    ),
    (
        "weather",
        OBJ(
            {
                "city": S(maxLength=20),
                "temp_c": {"type": "number", "minimum": -50, "maximum": 60},
                "sky": {"enum": ["sunny", "cloudy", "rain", "snow"]},
            }
        ),
    ),
    (
        "book",
        OBJ(
            {
                "title": S(maxLength=40),
                "year": {"type": "integer", "minimum": 1400, "maximum": 2030},
                "authors": {
                    "type": "array",
                    "items": S(maxLength=30),
                    "minItems": 1,
                    "maxItems": 3,
                },
            }
        ),
    ),
    ("flag", OBJ({"ok": {"type": "boolean"}})),
    (
        "rating",
        OBJ({"stars": {"type": "integer", "minimum": 1, "maximum": 5}, "comment": S(maxLength=60)}),
    ),
    (
        "matrix",
        OBJ(
            {
                "rows": {
                    "type": "array",
                    "minItems": 2,
                    "maxItems": 2,
                    "items": {
                        "type": "array",
                        "minItems": 2,
                        "maxItems": 2,
                        "items": {"type": "integer", "minimum": 0, "maximum": 9},
                    },
                }
            }
        ),
    ),
    ("optional", OBJ({"name": S(maxLength=20), "nick": S(maxLength=20)}, req=["name"])),
    (
        "anyof",
        OBJ(
            {
                "value": {
                    "anyOf": [
                        {"type": "integer", "minimum": 0, "maximum": 100},
                        {"type": "string", "maxLength": 10},
                    ]
                }
            }
        ),
    ),
    ("nullable", OBJ({"middle_name": {"type": ["string", "null"], "maxLength": 20}})),
    (
        "event",
        OBJ(
            {
                "name": S(maxLength=30),
                "day": {"enum": ["mon", "tue", "wed", "thu", "fri"]},
                "hour": {"type": "integer", "minimum": 0, "maximum": 23},
            }
        ),
    ),
    (
        "inventory",
        OBJ(
            {
                "counts": OBJ(
                    {
                        "apples": {"type": "integer", "minimum": 0, "maximum": 99},
                        "pears": {"type": "integer", "minimum": 0, "maximum": 99},
                    }
                )
            }
        ),
    ),
    ("const", OBJ({"kind": {"const": "greeting"}, "text": S(maxLength=40)})),
    (
        "list_of_people",
        {
            "type": "array",
            "minItems": 1,
            "maxItems": 3,
            "items": OBJ(
                {"name": S(maxLength=20), "age": {"type": "integer", "minimum": 0, "maximum": 99}}
            ),
        },
    ),
    (
        "price",
        OBJ(
            {
                "amount": {"type": "number", "exclusiveMinimum": 0, "maximum": 1000},
                "currency": {"enum": ["EUR", "USD", "GBP"]},
            }
        ),
    ),
]
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city now",
        "parameters": OBJ({"city": S(maxLength=30), "unit": {"enum": ["celsius", "fahrenheit"]}}),
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "The local time in a city",
        "parameters": OBJ({"city": S(maxLength=30)}),
    },
}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def server(server_factory):
    return server_factory("--max-num-seqs", "20")


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=300)


def _chat(client, **kw):
    kw.setdefault("max_tokens", 200)
    return client.chat.completions.create(model="SmolLM2-135M-Instruct", temperature=0, **kw)


def test_twenty_schemas_answer_json_that_validates(client):
    def ask(item):
        name, schema = item
        out = _chat(
            client,
            messages=[{"role": "user", "content": f"Give an example {name} as JSON."}],
            response_format={
                "type": "json_schema",
                "json_schema": {"name": name, "schema": schema, "strict": True},
            },
        )
        return name, schema, out.choices[0]

    with ThreadPoolExecutor(len(SCHEMAS)) as pool:  # one batch in the engine
        answers = list(pool.map(ask, SCHEMAS))
    for name, schema, choice in answers:
        assert choice.finish_reason == "stop", (name, choice.message.content)
        jsonschema.validate(json.loads(choice.message.content), schema)
    # the constraint is real: the same questions unconstrained are mostly not JSON
    free = [
        _chat(
            client,
            messages=[{"role": "user", "content": f"Give an example {n} as JSON."}],
            max_tokens=40,
        )
        .choices[0]
        .message.content
        for n, _ in SCHEMAS[:5]
    ]
    assert sum(_parses(t) for t in free) < 5


def _parses(text: str) -> bool:
    try:
        json.loads(text)
        return True
    except ValueError:
        return False


def test_json_object_and_streamed_json(client):
    out = _chat(
        client,
        messages=[{"role": "user", "content": "Describe a cat."}],
        response_format={"type": "json_object"},
    )
    assert isinstance(json.loads(out.choices[0].message.content), dict)
    schema = SCHEMAS[0][1]
    stream = _chat(
        client,
        messages=[{"role": "user", "content": "A person as JSON."}],
        stream=True,
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "person", "schema": schema},
        },
    )
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    jsonschema.validate(json.loads(text), schema)


def test_vllm_structured_outputs_regex_and_choice(client):
    out = client.completions.create(
        model="SmolLM2-135M-Instruct",
        prompt="My phone number is",
        max_tokens=20,
        temperature=0,
        extra_body={"structured_outputs": {"regex": r" \d{3}-\d{4}"}},
    )
    import re

    assert re.fullmatch(r" \d{3}-\d{4}", out.choices[0].text)
    out = _chat(
        client,
        messages=[{"role": "user", "content": "Is the sky green?"}],
        extra_body={"guided_choice": ["yes", "no", "maybe"]},
    )
    assert out.choices[0].message.content in ("yes", "no", "maybe")


def test_a_named_tool_call_parses_streamed_and_not(client):
    choice = {"type": "function", "function": {"name": "get_weather"}}
    out = _chat(client, messages=ASK, tools=[WEATHER, TIME], tool_choice=choice)
    msg = out.choices[0].message
    assert msg.content is None and len(msg.tool_calls) == 1
    call = msg.tool_calls[0]
    assert call.type == "function" and call.function.name == "get_weather" and call.id
    jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])
    assert out.choices[0].finish_reason == "stop"  # OpenAI's for a forced function
    chunks = list(
        _chat(client, messages=ASK, tools=[WEATHER, TIME], tool_choice=choice, stream=True)
    )
    deltas = [d for c in chunks if c.choices for d in (c.choices[0].delta.tool_calls or [])]
    assert deltas[0].id and deltas[0].function.name == "get_weather"
    assert len(deltas) > 2  # the arguments arrive in pieces
    arguments = "".join(d.function.arguments or "" for d in deltas)
    assert arguments == call.function.arguments  # greedy: the same call


def test_a_required_call_parses_streamed_and_not(client):
    out = _chat(
        client,
        messages=ASK,
        tools=[WEATHER, TIME],
        tool_choice="required",
        parallel_tool_calls=False,
    )
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls" and len(choice.message.tool_calls) == 1
    call = choice.message.tool_calls[0]
    assert call.function.name in ("get_weather", "get_time")
    tool = WEATHER if call.function.name == "get_weather" else TIME
    jsonschema.validate(json.loads(call.function.arguments), tool["function"]["parameters"])
    chunks = list(
        _chat(
            client,
            messages=ASK,
            tools=[WEATHER, TIME],
            tool_choice="required",
            parallel_tool_calls=False,
            stream=True,
        )
    )
    deltas = [d for c in chunks if c.choices for d in (c.choices[0].delta.tool_calls or [])]
    assert [(d.function.name, d.function.arguments) for d in deltas] == [
        (call.function.name, call.function.arguments)
    ]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    # the call goes back as history, with the tool's answer; the model answers in text
    follow = _chat(
        client,
        max_tokens=30,
        tools=[WEATHER, TIME],
        messages=ASK
        + [
            {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
            {"role": "tool", "tool_call_id": call.id, "content": '{"temp": 21}'},
        ],
    )
    assert follow.choices[0].message.content


def test_auto_reads_hermes_calls_and_streams_text():
    plan = ToolPlan("auto", (WEATHER, TIME), ("get_weather", "get_time"))
    text = '<tool_call>\n{"name": "get_time", "arguments": {"city": "Oslo"}}\n</tool_call>'
    content, calls = parse_calls(plan, text)
    assert content is None and [
        (c.function.name, json.loads(c.function.arguments)) for c in calls
    ] == [("get_time", {"city": "Oslo"})]
    assert parse_calls(plan, "It is sunny.") == ("It is sunny.", [])
    # an unknown function or broken JSON is text, not a call
    assert parse_calls(plan, '<tool_call>{"name": "rm", "arguments": {}}</tool_call>')[1] == []
    stream = ToolStream(plan)
    pieces = [
        stream.feed(t, False)
        for t in (
            "<tool",
            "_call>\n",
            '{"name": "get_time", ',
            '"arguments": {"city": "Oslo"}}\n</tool_call>',
        )
    ]
    assert pieces == [[], [], [], []]  # held: it is a call
    end = stream.feed("", True)
    assert end[0]["tool_calls"][0]["function"] == {
        "name": "get_time",
        "arguments": '{"city": "Oslo"}',
    }
    stream = ToolStream(plan)
    assert (
        stream.feed("<t", False) == []
        and stream.feed("he sun", False) == [{"content": "<the sun"}]
        and stream.feed(" shines", False) == [{"content": " shines"}]
    )


def test_auto_with_the_default_model_answers(client):
    out = _chat(client, messages=ASK, tools=[WEATHER], max_tokens=60)
    choice = out.choices[0]
    assert choice.finish_reason in ("stop", "length", "tool_calls")
    assert choice.message.content or choice.message.tool_calls


@pytest.mark.parametrize(
    "body, param",
    [
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {
                        "name": "x",
                        "schema": {"type": "object", "properties": {"a": {"type": "nope"}}},
                    },
                }
            },
            "response_format",
        ),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
            "response_format",
        ),
        ({"structured_outputs": {"regex": "(unclosed"}}, "structured_outputs"),
        ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs"),
        ({"guided_choice": []}, "guided_choice"),
        ({"response_format": {"type": "json_object"}, "guided_regex": "a+"}, "guided_regex"),
        (
            {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
            "tool_choice",
        ),
        ({"tool_choice": "required"}, "tool_choice"),
        (
            {
                "tools": [WEATHER],
                "tool_choice": "required",
                "response_format": {"type": "json_object"},
            },
            "tool_choice",
        ),
        ({"functions": [{"name": "f"}]}, "functions"),
        ({"response_format": {"type": "json_object"}, "min_tokens": 3}, None),
    ],
)
def test_bad_structured_requests_are_a_400_naming_the_field(server, body, param):
    r = requests.post(
        server.url + "/v1/chat/completions",
        timeout=60,
        json={"messages": ASK, "max_tokens": 5, **body},
    )
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["message"]
    if param is not None:
        assert error["param"] == param, error
    assert requests.get(server.url + "/health", timeout=5).status_code == 200


def test_unknown_fields_are_ignored_and_logged(server):
    r = requests.post(
        server.url + "/v1/chat/completions",
        timeout=60,
        json={"messages": ASK, "max_tokens": 3, "no_such_field": 1},
    )
    assert r.status_code == 200
    assert server.wait_until(
        lambda: "request fields ignored" in server.log() and "no_such_field" in server.log()
    )
