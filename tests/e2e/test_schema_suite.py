"""Fifty JSON schemas of varied shapes through the gateway with the official `openai` SDK: each one
asked once whole and once streamed, and every output must parse and validate against its schema.

No output can run out of tokens: every string has a maxLength, every array a maxItems, every
integer a minimum and a maximum, every object additionalProperties false (llguidance lets an open
object grow extra keys) and every number a multipleOf besides its bounds (llguidance bounds a plain
number's fraction digits by nothing: the 135M model wrote "33.4781738793792552827..." to the end of
its max_tokens). `test_schemas_fit_max_tokens` checks each schema's longest output (a token per
character at worst, for ASCII) leaves MARGIN tokens spare, so a finish other than "stop" is a
failure, not bad luck. Each multipleOf is a power of two (0.5, 0.25, 0.125): jsonschema checks a
float multipleOf by float division, which fails 0.07 against 0.01.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import jsonschema
import openai
import pytest

from tests.e2e.conftest import Platform

MODEL = "smollm2-135m-instruct"
MAX_TOKENS = 512
MARGIN = 128  # tokens MAX_TOKENS keeps beyond a schema's longest output
WORKERS = 8  # the model's max_num_seqs: all in flight at once, none waiting

Schema = dict[str, Any]


# --- builders: closed objects, bounded strings and integers ---


def obj(props: Schema, required: list[str] | None = None) -> Schema:
    """A closed object; every property required unless `required` says otherwise."""
    return {
        "type": "object",
        "properties": props,
        "required": list(props) if required is None else required,
        "additionalProperties": False,
    }


def s(max_length: int, **extra: Any) -> Schema:
    return {"type": "string", "maxLength": max_length, **extra}


def pattern(regex: str, max_length: int) -> Schema:
    return {"type": "string", "pattern": regex, "maxLength": max_length}


def i(minimum: int, maximum: int, **extra: Any) -> Schema:
    return {"type": "integer", "minimum": minimum, "maximum": maximum, **extra}


def n(minimum: float, maximum: float, step: float = 0.25, **extra: Any) -> Schema:
    """A bounded number with a step: see the module's docstring."""
    return {"type": "number", "minimum": minimum, "maximum": maximum, "multipleOf": step, **extra}


def arr(items: Schema, min_items: int, max_items: int) -> Schema:
    return {"type": "array", "items": items, "minItems": min_items, "maxItems": max_items}


BOOL: Schema = {"type": "boolean"}
DATE = r"^20[0-9]{2}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])$"
HHMM = r"^([01][0-9]|2[0-3]):[0-5][0-9]$"
IATA = r"^[A-Z]{3}$"
FLIGHT = r"^[A-Z]{2}[0-9]{3,4}$"


# (name, shape, prompt, schema)
CASES: list[tuple[str, str, str, Schema]] = [
    # --- flat objects, required and optional properties ---
    (
        "book",
        "flat",
        "Describe a book you like.",
        obj(
            {
                "title": s(40),
                "author": s(40),
                "year": i(1450, 2025),
                "pages": i(1, 3000),
                "genre": s(20),
            },
            required=["title", "author", "year"],
        ),
    ),
    (
        "contact_card",
        "flat",
        "Give the contact card of a colleague.",
        obj(
            {"name": s(30), "company": s(30), "phone": s(20), "city": s(25)},
            required=["name", "company"],
        ),
    ),
    (
        "weather_report",
        "flat",
        "Report today's weather in Lisbon.",
        obj(
            {
                "city": s(30),
                "temperature_c": n(-50, 60, 0.5),
                "condition": s(20),
                "humidity_pct": i(0, 100),
            },
            required=["city", "temperature_c", "condition"],
        ),
    ),
    (
        "product",
        "flat",
        "Describe a product sold in an online shop.",
        obj(
            {"sku": s(12), "name": s(40), "price": n(0, 10000), "in_stock": BOOL, "color": s(15)},
            required=["sku", "name", "price", "in_stock"],
        ),
    ),
    # --- nested objects, 2 to 4 levels ---
    (
        "user_profile",
        "nested",
        "Create a user profile for a new customer.",
        obj({"username": s(20), "address": obj({"street": s(40), "city": s(30), "zip": s(10)})}),
    ),
    (
        "company",
        "nested",
        "Describe a technology company and where its headquarters are.",
        obj(
            {
                "name": s(30),
                "headquarters": obj(
                    {
                        "city": s(30),
                        "country": s(30),
                        "coordinates": obj({"lat": n(-90, 90), "lon": n(-180, 180)}),
                    }
                ),
            }
        ),
    ),
    (
        "order",
        "nested",
        "Give an online order for a pair of shoes.",
        obj(
            {
                "order_id": s(16),
                "customer": obj(
                    {
                        "name": s(30),
                        "shipping": obj(
                            {"address": obj({"line": s(40), "city": s(30)}), "express": BOOL},
                        ),
                    }
                ),
            }
        ),
    ),
    (
        "game_character",
        "nested",
        "Create a character for a fantasy role-playing game.",
        obj(
            {
                "name": s(25),
                "stats": obj({"strength": i(1, 20), "agility": i(1, 20), "wisdom": i(1, 20)}),
                "equipment": obj({"weapon": obj({"name": s(25), "damage": i(1, 100)}), "armor": s(20)}),
            }
        ),
    ),
    # --- arrays with minItems / maxItems ---
    (
        "shopping_list",
        "array",
        "Write a shopping list for a picnic.",
        obj({"store": s(25), "items": arr(s(25), 1, 5)}),
    ),
    (
        "lottery_ticket",
        "array",
        "Pick five lottery numbers between 1 and 49.",
        obj({"draw_date": pattern(DATE, 10), "numbers": arr(i(1, 49), 5, 5)}),
    ),
    (
        "blog_tags",
        "array",
        "List tags for a blog post about Italian cooking.",
        arr(s(15), 2, 4),
    ),
    (
        "hiking_route",
        "array",
        "Give a short hiking route as latitude/longitude waypoints.",
        obj(
            {
                "name": s(30),
                "waypoints": arr(
                    {
                        "type": "array",
                        "prefixItems": [n(-90, 90), n(-180, 180)],
                        "items": False,
                        "minItems": 2,
                        "maxItems": 2,
                    },
                    2,
                    4,
                ),
            }
        ),
    ),
    # --- arrays of objects ---
    (
        "invoice",
        "array_of_objects",
        "Give an invoice for some office supplies.",
        obj(
            {
                "invoice_number": pattern(r"^INV-[0-9]{5}$", 9),
                "lines": arr(
                    obj({"description": s(25), "quantity": i(1, 100), "unit_price": n(0, 1000)}), 1, 3
                ),
                "currency": {"enum": ["EUR", "USD", "GBP"]},
            }
        ),
    ),
    (
        "recipe",
        "array_of_objects",
        "Give a recipe for pancakes.",
        obj(
            {
                "title": s(40),
                "ingredients": arr(obj({"name": s(16), "amount": s(10)}), 2, 4),
                "steps": arr(s(30), 1, 2),
            }
        ),
    ),
    (
        "team_roster",
        "array_of_objects",
        "List the members of a small software team.",
        obj(
            {
                "team": s(30),
                "members": arr(
                    obj(
                        {
                            "name": s(30),
                            "role": {"enum": ["developer", "designer", "tester", "manager"]},
                            "age": i(18, 70),
                        }
                    ),
                    1,
                    4,
                ),
            }
        ),
    ),
    (
        "flight_board",
        "array_of_objects",
        "Show the next departures on an airport board.",
        arr(
            obj(
                {
                    "flight": pattern(FLIGHT, 6),
                    "from": pattern(IATA, 3),
                    "to": pattern(IATA, 3),
                    "departure": pattern(HHMM, 5),
                }
            ),
            1,
            3,
        ),
    ),
    # --- enums: strings, numbers, mixed ---
    (
        "support_ticket",
        "enum",
        "Triage this support ticket: the app crashes when I upload a photo.",
        obj(
            {
                "priority": {"enum": ["low", "medium", "high", "critical"]},
                "category": {"type": "string", "enum": ["bug", "feature", "question"]},
                "summary": s(40),
            }
        ),
    ),
    (
        "shoe_size",
        "enum",
        "Recommend a running shoe and its size.",
        obj(
            {
                "brand": s(20),
                "size_eu": {"enum": [36, 37.5, 39, 40.5, 42, 44]},
                "width": {"enum": ["narrow", "regular", "wide"]},
            }
        ),
    ),
    (
        "survey_answer",
        "enum",
        "Answer a customer satisfaction survey question.",
        obj({"question": s(40), "answer": {"enum": ["yes", "no", 1, 2, 3, None, True]}}),
    ),
    (
        "traffic_light",
        "enum",
        "Which traffic light colour tells a driver to stop?",
        {"enum": ["red", "amber", "green"]},
    ),
    # --- const ---
    (
        "webhook_event",
        "const",
        "Give the webhook payload sent when a user signs up.",
        obj({"version": {"const": 2}, "event": {"const": "user.created"}, "user_id": i(1, 999999)}),
    ),
    (
        "geojson_point",
        "const",
        "Give the location of the Eiffel Tower as a GeoJSON point.",
        obj(
            {
                "type": {"const": "Point"},
                "coordinates": {
                    "type": "array",
                    "prefixItems": [n(-180, 180), n(-90, 90)],
                    "items": False,
                    "minItems": 2,
                    "maxItems": 2,
                },
            }
        ),
    ),
    (
        "service_config",
        "const",
        "Write the configuration of a web service.",
        obj(
            {
                "kind": {"const": "config"},
                "enabled": {"const": True},
                "defaults": {"const": {"retries": 3, "timeout_s": 30}},
                "name": s(30),
            }
        ),
    ),
    # --- anyOf / oneOf ---
    (
        "payment",
        "any_one_of",
        "Describe how a customer paid for groceries.",
        obj(
            {
                "amount": n(0, 10000),
                "method": {
                    "oneOf": [
                        obj({"kind": {"const": "card"}, "last4": pattern(r"^[0-9]{4}$", 4)}),
                        obj({"kind": {"const": "cash"}, "currency": {"enum": ["EUR", "USD", "GBP"]}}),
                        obj(
                            {
                                "kind": {"const": "transfer"},
                                "iban": pattern(r"^[A-Z]{2}[0-9]{2}[A-Z0-9]{10,20}$", 24),
                            }
                        ),
                    ]
                },
            }
        ),
    ),
    (
        "setting_value",
        "any_one_of",
        "Give one setting of a text editor and its value.",
        obj({"key": s(20), "value": {"anyOf": [i(0, 1000), s(20), BOOL]}}),
    ),
    (
        "shape",
        "any_one_of",
        "Describe a geometric shape.",
        {
            "oneOf": [
                obj({"shape": {"const": "circle"}, "radius": n(0, 100)}),
                obj({"shape": {"const": "rectangle"}, "width": n(0, 100), "height": n(0, 100)}),
                obj({"shape": {"const": "triangle"}, "sides": arr(n(0, 100), 3, 3)}),
            ]
        },
    ),
    (
        "reach_me",
        "any_one_of",
        "How can the support team reach you?",
        obj(
            {
                "name": s(30),
                "contact": {"anyOf": [obj({"email": s(40, format="email")}), obj({"phone": s(20)})]},
                "best_time": {"oneOf": [pattern(HHMM, 5), {"type": "null"}]},
            }
        ),
    ),
    # --- integers and numbers with bounds ---
    (
        "thermostat",
        "numeric",
        "Set the thermostat for a cosy evening.",
        obj({"target_c": n(5, 30), "humidity_pct": i(0, 100), "eco_mode": BOOL}),
    ),
    (
        "restaurant_rating",
        "numeric",
        "Rate a restaurant you visited.",
        obj(
            {
                "restaurant": s(30),
                "stars": i(1, 5),
                "score": {"type": "number", "exclusiveMinimum": 0, "maximum": 10, "multipleOf": 0.5},
                "votes": i(0, 1000000),
            }
        ),
    ),
    (
        "bank_account",
        "numeric",
        "Summarise a savings account.",
        obj(
            {
                "balance": n(-10000, 1000000),
                "interest_rate": {
                    "type": "number",
                    "exclusiveMinimum": 0,
                    "exclusiveMaximum": 1,
                    "multipleOf": 0.125,
                },
                "overdraft_limit": i(0, 5000, multipleOf=100),
            }
        ),
    ),
    (
        "sensor_sample",
        "numeric",
        "Report a reading from a laboratory temperature sensor.",
        obj(
            {
                "sensor": s(20),
                "reading_c": n(-273.25, 1000),
                "samples": {"type": "integer", "exclusiveMinimum": 0, "maximum": 50},
                "tolerance": n(0.5, 5, 0.5),
            }
        ),
    ),
    # --- strings: pattern, minLength / maxLength, format ---
    (
        "parcel",
        "string",
        "Give the tracking details of a parcel.",
        obj(
            {
                "tracking_code": pattern(r"^[A-Z]{3}-[0-9]{4}$", 8),
                "shipped_on": s(10, format="date"),
                "recipient": s(30, minLength=3),
            }
        ),
    ),
    (
        "calendar_event",
        "string",
        "Add a dentist appointment to my calendar.",
        obj({"title": s(40, minLength=5), "date": pattern(DATE, 10), "start": pattern(HHMM, 5)}),
    ),
    (
        "newsletter_signup",
        "string",
        "Sign a reader up for a newsletter.",
        obj(
            {
                "email": s(40, format="email"),
                "name": s(30, minLength=2),
                "country_code": pattern(r"^[A-Z]{2}$", 2),
            }
        ),
    ),
    (
        "vehicle",
        "string",
        "Register a car.",
        obj(
            {
                "plate": pattern(r"^[A-Z]{2}-[0-9]{3}-[A-Z]{2}$", 9),
                "vin": pattern(r"^[A-HJ-NPR-Z0-9]{17}$", 17),
                "owner": s(30, minLength=3),
            }
        ),
    ),
    (
        "color_palette",
        "string",
        "Suggest a colour palette for a website.",
        obj({"name": s(20, minLength=3), "colors": arr(pattern(r"^#[0-9a-f]{6}$", 7), 2, 5)}),
    ),
    # --- booleans ---
    (
        "feature_flags",
        "boolean",
        "Which features are switched on in the mobile app?",
        obj(
            {"dark_mode": BOOL, "beta": BOOL, "notifications": BOOL, "analytics": BOOL},
            required=["dark_mode", "beta", "notifications"],
        ),
    ),
    ("fact_check", "boolean", "Is water wet? Answer true or false.", BOOL),
    (
        "checklist",
        "boolean",
        "Give a packing checklist for a weekend trip.",
        obj({"task": s(30), "done": BOOL, "subtasks": arr(obj({"name": s(20), "done": BOOL}), 0, 3)}),
    ),
    # --- nullable types ---
    (
        "person_name",
        "nullable",
        "Give the full name of a famous scientist.",
        obj({"first": s(20), "middle": {"type": ["string", "null"], "maxLength": 20}, "last": s(20)}),
    ),
    (
        "flight_status",
        "nullable",
        "What is the status of flight BA117?",
        obj(
            {
                "flight": pattern(FLIGHT, 6),
                "delay_minutes": {"type": ["integer", "null"], "minimum": 0, "maximum": 600},
                "gate": {"type": ["string", "null"], "pattern": r"^[A-Z][0-9]{1,2}$", "maxLength": 3},
            }
        ),
    ),
    (
        "employee",
        "nullable",
        "Describe an employee of a bakery.",
        obj(
            {
                "name": s(30),
                "manager": {"anyOf": [obj({"name": s(30), "employee_id": i(1, 9999)}), {"type": "null"}]},
                "end_date": {"type": ["string", "null"], "format": "date", "maxLength": 10},
            }
        ),
    ),
    (
        "sensor_status",
        "nullable",
        "Report the state of a humidity sensor.",
        obj(
            {
                "value": {"type": ["number", "null"], "minimum": 0, "maximum": 100, "multipleOf": 0.5},
                "unit": {"enum": ["percent", "g/m3", None]},
                "healthy": {"type": ["boolean", "null"]},
            }
        ),
    ),
    # --- $defs and $ref (not recursive) ---
    (
        "shipment",
        "defs_ref",
        "Give the sender and recipient of a shipment.",
        {
            "$defs": {"address": obj({"name": s(30), "city": s(30), "postcode": s(10)})},
            **obj({"sender": {"$ref": "#/$defs/address"}, "recipient": {"$ref": "#/$defs/address"}}),
        },
    ),
    (
        "family",
        "defs_ref",
        "Describe a family with its parent and children.",
        {
            "$defs": {"person": obj({"name": s(25), "age": i(0, 110)})},
            **obj({"parent": {"$ref": "#/$defs/person"}, "children": arr({"$ref": "#/$defs/person"}, 0, 3)}),
        },
    ),
    (
        "timetable",
        "defs_ref",
        "Give a school timetable for Monday morning.",
        {
            "$defs": {
                "time": pattern(HHMM, 5),
                "subject": {"enum": ["maths", "history", "biology", "music", "sport"]},
                "slot": obj(
                    {
                        "start": {"$ref": "#/$defs/time"},
                        "end": {"$ref": "#/$defs/time"},
                        "subject": {"$ref": "#/$defs/subject"},
                    }
                ),
            },
            **obj({"day": {"const": "monday"}, "slots": arr({"$ref": "#/$defs/slot"}, 1, 4)}),
        },
    ),
    (
        "football_match",
        "defs_ref",
        "Give the result of a football match.",
        {
            "$defs": {
                "score": i(0, 20),
                "team": obj({"name": s(30), "goals": {"$ref": "#/$defs/score"}}),
            },
            **obj(
                {
                    "home": {"$ref": "#/$defs/team"},
                    "away": {"$ref": "#/$defs/team"},
                    "date": pattern(DATE, 10),
                }
            ),
        },
    ),
    # --- additionalProperties false (closed objects, bounded maps) ---
    (
        "server_settings",
        "closed",
        "Write the settings of a web server.",
        obj({"host": s(30), "port": i(1, 65535), "tls": BOOL, "workers": i(1, 64)}, required=[]),
    ),
    (
        "stock_levels",
        "closed",
        "Give the stock levels of a few fruits in a shop.",
        # Closed, not a map (patternProperties or additionalProperties as a schema): llguidance may
        # repeat a map's key, '{"fruit": 2, "fruit": 3}', which minProperties then rejects.
        obj(
            {"apples": i(0, 999), "pears": i(0, 999), "plums": i(0, 999), "cherries": i(0, 999)},
            required=["apples", "pears"],
        ),
    ),
    (
        "translation",
        "closed",
        "Translate 'good morning' into French.",
        obj(
            {
                "source": {"enum": ["en", "fr", "de", "es"]},
                "target": {"enum": ["en", "fr", "de", "es"]},
                "text": s(40),
                "translation": s(40),
                "meta": obj({"formal": BOOL, "confidence": n(0, 1, 0.125)}, required=["formal"]),
            }
        ),
    ),
]
SEEDS = {name: 1000 + k for k, (name, *_) in enumerate(CASES)}


# --- the longest output a schema allows, in characters (= tokens at worst for ASCII) ---


def longest(schema: Schema, root: Schema) -> int:
    if "$ref" in schema:
        return longest(root["$defs"][schema["$ref"].removeprefix("#/$defs/")], root)
    if "const" in schema:
        return len(_dumps(schema["const"]))
    if "enum" in schema:
        return max(len(_dumps(v)) for v in schema["enum"])
    for key in ("anyOf", "oneOf"):
        if key in schema:
            return max(longest(branch, root) for branch in schema[key])
    kind = schema["type"]
    if isinstance(kind, list):
        return max(longest({**schema, "type": k}, root) for k in kind)
    if kind == "object":
        assert schema.get("additionalProperties") is False, "an open object can grow without bound"
        props = schema["properties"]  # named properties only, no maps: see stock_levels
        return 2 + sum(len(_dumps(k)) + 2 + longest(v, root) + 2 for k, v in props.items())
    if kind == "array":
        prefix = schema.get("prefixItems", [])
        if prefix:
            assert schema.get("items") is False
            return 2 + sum(longest(v, root) + 2 for v in prefix)
        return 2 + schema["maxItems"] * (longest(schema["items"], root) + 2)
    if kind == "string":
        return schema["maxLength"] + 2
    if kind == "integer":
        low = schema.get("minimum", schema.get("exclusiveMinimum"))
        high = schema.get("maximum", schema.get("exclusiveMaximum"))
        return max(len(str(low)), len(str(high)))
    if kind == "number":
        assert "multipleOf" in schema, "a plain number's fraction digits are unbounded"
        low = schema.get("minimum", schema.get("exclusiveMinimum"))
        high = schema.get("maximum", schema.get("exclusiveMaximum"))
        fraction = len(repr(float(schema["multipleOf"])).partition(".")[2])
        return max(len(str(int(low))), len(str(int(high)))) + 1 + fraction
    if kind == "boolean":
        return 5
    assert kind == "null", kind
    return 4


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(", ", ": "))


def response_format(name: str, schema: Schema) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}


def test_schemas_fit_max_tokens() -> None:
    """Each schema is a valid JSON schema whose longest output leaves MARGIN tokens spare."""
    assert len(CASES) == 50 and len(SEEDS) == 50
    for name, _, _, schema in CASES:
        jsonschema.Draft202012Validator.check_schema(schema)
        assert longest(schema, schema) <= MAX_TOKENS - MARGIN, name


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """An object as json.loads makes it, but a repeated key (which a dict would hide) is an error."""
    keys = [key for key, _ in pairs]
    if len(set(keys)) != len(keys):
        raise ValueError(f"repeated keys in an object: {keys}")
    return dict(pairs)


def _run(client: openai.OpenAI, case: tuple[str, str, str, Schema], stream: bool) -> str | None:
    """None when the output validates, else what went wrong (with the output)."""
    name, _, prompt, schema = case
    kwargs: dict[str, Any] = {
        "model": MODEL,
        "messages": [{"role": "user", "content": prompt}],
        "response_format": response_format(name, schema),
        "max_tokens": MAX_TOKENS,
        "temperature": 0.7,
        "seed": SEEDS[name],
    }
    text, finish = "", None
    try:
        if stream:
            for chunk in client.chat.completions.create(stream=True, **kwargs):
                if chunk.choices:
                    text += chunk.choices[0].delta.content or ""
                    finish = chunk.choices[0].finish_reason or finish
        else:
            done = client.chat.completions.create(**kwargs)
            text, finish = done.choices[0].message.content or "", done.choices[0].finish_reason
    except openai.APIError as exc:
        return f"request failed: {exc!r}"
    try:
        if finish != "stop":
            raise ValueError(f"finish_reason {finish!r}")
        jsonschema.validate(
            json.loads(text, object_pairs_hook=_unique_keys),
            schema,
            format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER,
        )
    except (ValueError, jsonschema.ValidationError) as exc:
        message = exc.message if isinstance(exc, jsonschema.ValidationError) else str(exc)
        return f"output {text!r}: {message}"
    return None


def test_fifty_schemas_whole_and_streamed(client: openai.OpenAI) -> None:
    jobs = [(case, stream) for case in CASES for stream in (False, True)]
    # Eight long outputs share a busy 2-core machine: one may take longer than the client's 120 s.
    patient = client.with_options(timeout=600)
    started = time.perf_counter()
    with ThreadPoolExecutor(WORKERS) as pool:
        results = list(pool.map(lambda job: _run(patient, *job), jobs))
    elapsed = time.perf_counter() - started
    failures = [
        f"{case[0]} ({'streamed' if stream else 'whole'}): {error}"
        for (case, stream), error in zip(jobs, results, strict=True)
        if error is not None
    ]
    assert not failures, f"{len(failures)} of {len(jobs)} failed in {elapsed:.0f} s:\n" + "\n".join(failures)


# Keywords and schemas llguidance refuses: a 400 before anything runs, naming response_format.
REFUSED = [
    ({"type": "array", "items": {"type": "integer"}, "uniqueItems": True}, "uniqueItems"),
    ({"not": {"type": "string"}}, "not"),
    ({"if": {"type": "string"}, "then": {"maxLength": 3}}, "if"),
    ({"type": "array", "contains": {"type": "integer"}}, "contains"),
    ({"type": "object", "propertyNames": {"maxLength": 3}}, "propertyNames"),
    ({"type": "object", "properties": {"a": BOOL}, "dependentRequired": {"a": ["b"]}}, "dependentRequired"),
    ({"type": "object", "properties": {"a": BOOL}, "minProperties": 1}, "min/maxProperties"),
    ({"oneOf": [{"type": "number"}, {"type": "integer"}]}, "oneOf"),
    ({"type": "string", "format": "color"}, "Unknown format"),
    ({"type": "string", "pattern": "^(?=a)a+$"}, "look-around"),
]


@pytest.mark.parametrize(("schema", "said"), REFUSED, ids=[said for _, said in REFUSED])
def test_unsupported_keywords_are_400(platform: Platform, schema: Schema, said: str) -> None:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 4,
        "response_format": response_format("refused", schema),
    }
    headers = {"Authorization": f"Bearer {platform.admin_key}"}
    r = httpx.post(f"{platform.base_url}/chat/completions", json=body, headers=headers, timeout=60)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == "response_format" and said in error["message"], error
