"""The parameter reference of every flow, generated from its parameter model.

`python -m flywheel.flows.parameter_docs` writes `docs/flows/<group>-<name>.md`; a test
checks the files match, so the reference cannot drift from the code.
"""

from __future__ import annotations

import inspect
import json
import re
import sys
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

DOCS = Path(__file__).resolve().parents[2] / "docs" / "flows"
CONSTRAINTS = {
    "minimum": ">=",
    "maximum": "<=",
    "exclusiveMinimum": ">",
    "exclusiveMaximum": "<",
    "minLength": "length >=",
    "maxLength": "length <=",
    "minItems": "items >=",
}


def params_model(flow: Any) -> type[BaseModel]:
    """The parameter model of a flow that takes one `params` argument."""
    (param,) = inspect.signature(flow.fn).parameters.values()
    return type(param.default)


def _type(annotation: Any) -> str:
    text = str(annotation) if not isinstance(annotation, type) else annotation.__name__
    text = re.sub(r"\b(typing|flywheel(\.\w+)+)\.", "", text)
    text = re.sub(r"Literal\[(.*?)\]", lambda m: m.group(1).replace(", ", " \\| "), text)
    return text.replace("NoneType", "null").replace(" | ", " \\| ")


def _default(info: Any) -> str:
    if info.default_factory is not None:
        return "computed"  # e.g. a model folder under this machine's data folder
    if info.default is PydanticUndefined:
        return "required"
    return f"`{json.dumps(info.default)}`"


def _constraints(schema: dict) -> str:
    found = []
    for option in [schema, *schema.get("anyOf", [])]:
        found += [f"{op} {option[key]}" for key, op in CONSTRAINTS.items() if key in option]
    return ", ".join(found)


def render(name: str, flow: Any) -> str:
    """The markdown reference of one flow's parameters."""
    model = params_model(flow)
    properties = model.model_json_schema()["properties"]
    doc = (flow.__doc__ or "").strip()
    lines = [
        f"# `{name}` parameters",
        "",
        doc,
        "",
        f"Run it with `prefect deployment run {name}`, setting fields with "
        "`--param params='{...}'`; unknown fields are refused by name.",
        "",
        "| field | type | default | allowed | meaning |",
        "|---|---|---|---|---|",
    ]
    for field, info in model.model_fields.items():
        meaning = (info.description or "").replace("|", "\\|").replace("\n", " ")
        constraints = _constraints(properties.get(field, {}))
        lines.append(
            f"| `{field}` | {_type(info.annotation)} | {_default(info)} | {constraints} "
            f"| {meaning} |"
        )
    lines.append("")
    lines.append("Generated from the parameter model by `python -m flywheel.flows.parameter_docs`.")
    return "\n".join(lines) + "\n"


def expected() -> dict[Path, str]:
    """Every reference file and its text."""
    from flywheel.flows.deployments import FLOWS

    return {DOCS / f"{name.replace('/', '-')}.md": render(name, f) for name, f in FLOWS.items()}


def main() -> None:
    DOCS.mkdir(parents=True, exist_ok=True)
    files = expected()
    for stale in set(DOCS.glob("*.md")) - set(files):
        stale.unlink()
    for path, text in files.items():
        path.write_text(text)
    print(f"wrote {len(files)} files under {DOCS}", file=sys.stderr)


if __name__ == "__main__":
    main()
