"""Generate the committed JSON Schema files from the models.

``python -m schemas.jsonschema`` rewrites ``schemas/json/``; ``--check`` exits 1 on drift.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from schemas.envelope import Envelope
from schemas.registry import REGISTRY

JSON_DIR = Path(__file__).parent / "json"
DIALECT = "https://json-schema.org/draft/2020-12/schema"
#: what every file says about how its keywords are read, where JSON Schema leaves room
COMMENT = (
    "Read strictly: an integer is a JSON number written without a fraction or exponent (2, "
    'never 2.0, 2e0 or "2"); a boolean is true or false; strings are taken as sent, never '
    "stripped. Patterns are ECMA 262, where $ matches only at the end of the string."
)


def render() -> dict[str, str]:
    files: dict[str, str] = {}
    for type_name, model in REGISTRY.items():
        schema = model.model_json_schema()
        schema["$schema"] = DIALECT
        schema["$comment"] = COMMENT
        schema["$id"] = f"urn:sagabus:{type_name}"
        schema["x-sagabus-type"] = type_name
        schema["x-sagabus-kind"] = model.KIND
        files[f"{type_name}.json"] = json.dumps(schema, indent=2, sort_keys=True) + "\n"
    env = Envelope.model_json_schema()
    env["$schema"] = DIALECT
    env["$comment"] = COMMENT
    env["$id"] = "urn:sagabus:envelope"
    files["envelope.json"] = json.dumps(env, indent=2, sort_keys=True) + "\n"
    return files


def drift() -> list[str]:
    expected = render()
    problems = []
    present = {p.name for p in JSON_DIR.glob("*.json")}
    for name, text in expected.items():
        path = JSON_DIR / name
        if not path.exists():
            problems.append(f"missing {name}")
        elif path.read_text() != text:
            problems.append(f"stale {name}")
    problems.extend(f"unexpected {name}" for name in sorted(present - set(expected)))
    return problems


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if "--check" in args:
        problems = drift()
        for p in problems:
            print(p)
        return 1 if problems else 0
    JSON_DIR.mkdir(exist_ok=True)
    for old in JSON_DIR.glob("*.json"):
        old.unlink()
    for name, text in render().items():
        (JSON_DIR / name).write_text(text)
    print(f"wrote {len(render())} schemas to {JSON_DIR}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
