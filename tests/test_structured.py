"""Constrained output (`run --format json`, `--json-schema`) on the real SmolLM2: what the
reply must be is enforced while sampling, at any temperature, on llama.cpp and on MLX."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
from conftest import Runner, error_line

pytestmark = pytest.mark.e2e


def strict(properties: dict, **more: object) -> dict:
    return {"type": "object", "properties": properties, "required": list(properties),
            "additionalProperties": False, **more}


NAME = {"type": "string", "maxLength": 30}
# Five schemas of increasing difficulty, each with the prompt it is asked with.
SCHEMAS = {
    "flat": (strict({"name": NAME, "city": NAME}), "Invent a person and the city they live in."),
    "enums": (strict({"colour": {"enum": ["red", "green", "blue"]},
                      "size": {"enum": ["small", "medium", "large"]}}),
              "Describe a T-shirt: its colour and its size."),
    "array": (strict({"items": {"type": "array", "minItems": 2, "maxItems": 4,
                                "items": strict({"name": NAME, "price": {
                                    "type": "integer", "minimum": 0, "maximum": 1000}})}}),
              "List a few things on a shopping list with their prices."),
    "nested": (strict({"person": strict({"name": NAME, "address": strict({
                  "street": {"type": "string", "maxLength": 40},
                  "zip": {"type": "string", "pattern": "^[0-9]{5}$"}})})}),
               "Invent a person with a postal address."),
    "bounds": (strict({"year": {"type": "integer", "minimum": 1900, "maximum": 2100},
                       "rating": {"type": "integer", "minimum": 1, "maximum": 5}}),
               "Name a year and give it a rating."),
}
# temperature 0, then 1.0 with three seeds
SAMPLINGS = [("0", None), ("1.0", "1"), ("1.0", "2"), ("1.0", "3")]


def constrained(llmctl: Runner, model: str, schema_file: Path, prompt: str, temperature: str,
                seed: str | None) -> object:
    args = ["run", model, "--json-schema", str(schema_file), "--temperature", temperature,
            "--max-tokens", "200", prompt]
    if seed is not None:
        args += ["--seed", seed]
    result = llmctl(*args)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.mark.parametrize("name", list(SCHEMAS))
def test_every_reply_validates_against_its_schema(llmctl: Runner, tmp_path: Path,
                                                  name: str) -> None:
    schema, prompt = SCHEMAS[name]
    path = tmp_path / "schema.json"
    path.write_text(json.dumps(schema))
    for temperature, seed in SAMPLINGS:
        value = constrained(llmctl, "smollm2", path, prompt, temperature, seed)
        jsonschema.validate(value, schema)


def test_without_the_schema_the_model_does_not_write_such_json(llmctl: Runner) -> None:
    # The constraint is doing the work: unconstrained, at least one reply is not JSON of
    # its schema.
    failures = 0
    for schema, prompt in SCHEMAS.values():
        result = llmctl("run", "smollm2", "--temperature", "0", "--max-tokens", "200",
                        prompt + " Answer in JSON.")
        assert result.returncode == 0, result.stderr
        try:
            jsonschema.validate(json.loads(result.stdout), schema)
        except (ValueError, jsonschema.ValidationError):
            failures += 1
    assert failures >= 1


def test_format_json_parses_and_json_events_carry_the_value(llmctl: Runner) -> None:
    for temperature, seed in SAMPLINGS:
        args = ["--seed", seed] if seed else []
        result = llmctl("run", "smollm2", "--format", "json", "--temperature", temperature,
                        *args, "List three colours as a JSON array.")
        assert result.returncode == 0, result.stderr
        json.loads(result.stdout)
    events = [json.loads(line) for line in llmctl(
        "run", "smollm2", "--json-schema", json.dumps(SCHEMAS["enums"][0]), "--json",
        "--temperature", "0", SCHEMAS["enums"][1]).stdout.splitlines()]
    done = events[-1]
    text = "".join(e["text"] for e in events if e["type"] == "token")
    assert done["type"] == "done" and done["value"] == json.loads(text)
    jsonschema.validate(done["value"], SCHEMAS["enums"][0])


def test_schema_from_stdin_with_the_prompt_as_argument(llmctl: Runner) -> None:
    schema, prompt = SCHEMAS["bounds"]
    result = llmctl("run", "smollm2", "--json-schema", "-", "--temperature", "0", prompt,
                    input=json.dumps(schema))
    assert result.returncode == 0, result.stderr
    jsonschema.validate(json.loads(result.stdout), schema)


def test_a_reply_cut_before_its_json_is_whole_is_a_failure(llmctl: Runner) -> None:
    schema, prompt = SCHEMAS["nested"]
    result = llmctl("run", "smollm2", "--json-schema", json.dumps(schema), "--max-tokens",
                    "5", prompt)
    assert result.returncode == 1
    assert "cut at 5 tokens before the JSON was complete" in error_line(result)
    assert result.stdout == ""  # never half an object presented as a reply


@pytest.mark.parametrize("schema, words", [
    ('{"type": "foo"}', "not valid"),
    ("{not json", "not JSON"),
    ("[1, 2]", "not a JSON object"),
    ("missing.json", "missing.json"),
    ('{"type": "array", "uniqueItems": true}', 'Unimplemented keys: ["uniqueItems"]'),
    ('{"type": "string", "format": "colour"}', "Unknown format: colour"),
])
def test_bad_schemas_are_usage_errors(llmctl: Runner, schema: str, words: str) -> None:
    result = llmctl("run", "smollm2", "--json-schema", schema, "hi")
    assert result.returncode == 2, result.stderr
    assert words in error_line(result)


def test_format_takes_json_only_and_not_with_a_schema(llmctl: Runner) -> None:
    assert llmctl("run", "smollm2", "--format", "yaml", "hi").returncode == 2
    both = llmctl("run", "smollm2", "--format", "json", "--json-schema", "{}", "hi")
    assert both.returncode == 2 and "--json-schema" in error_line(both)


@pytest.mark.parametrize("name", list(SCHEMAS))
def test_mlx_replies_validate_too(llmctl: Runner, stored_mlx: str, tmp_path: Path,
                                  name: str) -> None:
    schema, prompt = SCHEMAS[name]
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(schema))
    for temperature, seed in SAMPLINGS:
        jsonschema.validate(
            constrained(llmctl, stored_mlx, path, prompt, temperature, seed), schema)


def test_chat_constrains_every_reply(llmctl: Runner) -> None:
    schema, _ = SCHEMAS["enums"]
    result = llmctl("chat", "smollm2", "--json-schema", json.dumps(schema), "--json",
                    "--temperature", "1.0", "--seed", "5",
                    input="Describe a T-shirt.\nAnd another one, for a child.\n")
    assert result.returncode == 0, result.stderr
    done = [e for e in map(json.loads, result.stdout.splitlines()) if e["type"] == "done"]
    assert [d["turn"] for d in done] == [1, 2]
    for event in done:
        assert event["value"] == json.loads(event["text"])
        jsonschema.validate(event["value"], schema)
    refused = llmctl("chat", "smollm2", "--json-schema", "-", input="{}")
    assert refused.returncode == 2 and "stdin" in error_line(refused)
