"""The ``README.md`` model card that records how a merged model was made."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence


def _yaml_str(s: str) -> str:
    """A YAML double-quoted scalar (JSON string syntax is a subset of it)."""
    return json.dumps(s, ensure_ascii=False)


def _fence(text: str) -> str:
    """A backtick fence longer than any backtick run inside ``text`` (at least three)."""
    longest = max((len(m) for m in re.findall(r"`+", text)), default=0)
    return "`" * max(3, longest + 1)


def _cell(s: str) -> str:
    return s.replace("|", "\\|").replace("\n", " ")


def _front_matter(base_model: str | None) -> list[str]:
    lines = ["---", "library_name: transformers", "tags:", "- mergeforge", "- merge"]
    if base_model:
        lines += ["base_model:", f"- {_yaml_str(base_model)}"]
    return [*lines, "---"]


def _reversible(rows: Sequence[tuple[str, str]]) -> list[str]:
    if not rows:
        return []
    return [
        "## Reversible: every input can be rebuilt",
        "",
        "`artifacts/` holds what `mergeforge recover` needs to rebuild each input model. "
        "Relative reconstruction error (‖rebuilt − input‖ / ‖input − base‖):",
        "",
        "| input | relative error |",
        "| --- | --- |",
        *(f"| `{_cell(m)}` | {e} |" for m, e in rows),
        "",
    ]


def render_model_card(
    *,
    recipe_yaml: str,
    version: str,
    methods: Sequence[tuple[str, str]],
    inputs: Sequence[tuple[str, str]],
    opt_ins: Sequence[str],
    base_model: str | None,
    reversible: Sequence[tuple[str, str]] = (),
) -> str:
    """Markdown model card with YAML front matter (``library_name``, ``tags``, ``base_model``).

    Sections: how the model was made (merge methods with paper links), the recipe verbatim in a
    YAML block, the input files with their sha256, the opt-ins that changed behaviour (or
    "none"), for reversible merges the saved artifacts with each input's reconstruction error
    (``reversible`` is ``(model, error)``), and the mergeforge version. ``methods`` is
    ``(name, paper_url)``, ``inputs`` is ``(path, sha256)``. The same arguments always give the same text.
    """
    method_lines = [
        f"- **{name}**" + (f" — [paper]({url})" if url else "") for name, url in methods
    ]
    fence = _fence(recipe_yaml)
    lines = [
        *_front_matter(base_model),
        "",
        "# Merged model",
        "",
        f"This model was made by merging pretrained checkpoints with mergeforge {version}.",
        "",
        "## How it was made",
        "",
        *(method_lines or ["- (no merge method recorded)"]),
        "",
        f"Base model: `{base_model}`" if base_model else "No base model was used.",
        "",
        "## Recipe",
        "",
        f"{fence}yaml",
        recipe_yaml.rstrip("\n"),
        fence,
        "",
        "## Inputs",
        "",
        "| file | sha256 |",
        "| --- | --- |",
        *(f"| `{_cell(path)}` | `{digest}` |" for path, digest in inputs),
        "",
        "## Opt-ins in effect (they change behaviour)",
        "",
        *([f"- {_cell(o)}" for o in opt_ins] or ["none"]),
        "",
        *_reversible(reversible),
        "## Version",
        "",
        f"Made with mergeforge {version}.",
    ]
    return "\n".join(lines) + "\n"
