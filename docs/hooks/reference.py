"""MkDocs hook: the reference pages that are generated from the code at build time, so
they cannot drift from it: every command and option (Typer's own Markdown of the app),
and the HTTP API (from the OpenAPI document ``byod serve`` publishes), rendered here,
offline, without a CDN."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from mkdocs.config.defaults import MkDocsConfig
from mkdocs.structure.files import File, Files
from mkdocs.structure.pages import Page

if TYPE_CHECKING:
    from byod.errors import ByodError

#: where the errors page takes its generated table
ERRORS_TABLE = "<!-- generated: the table of errors -->"
#: where the settings page takes its two generated tables
SETTINGS_TABLE = "<!-- generated: the settings -->"
SERVE_SETTINGS_TABLE = "<!-- generated: the settings of byod serve -->"


def on_files(files: Files, config: MkDocsConfig) -> Files:
    """Add ``reference/cli.md`` and ``reference/http-api.md``, made from the code."""
    files.append(File.generated(config, "reference/cli.md", content=cli_markdown()))
    files.append(File.generated(config, "reference/http-api.md", content=http_markdown()))
    return files


def on_page_markdown(markdown: str, page: Page, **_: Any) -> str:
    """The errors page's table, from the error classes themselves; the settings page's,
    from :mod:`byod.settings_reference`."""
    if ERRORS_TABLE in markdown:
        markdown = markdown.replace(ERRORS_TABLE, errors_markdown())
    if SETTINGS_TABLE in markdown or SERVE_SETTINGS_TABLE in markdown:
        main, serve = settings_markdown()
        markdown = markdown.replace(SETTINGS_TABLE, main)
        markdown = markdown.replace(SERVE_SETTINGS_TABLE, serve)
    return markdown


def settings_markdown() -> tuple[str, str]:
    """The two settings tables: every command's, and ``byod serve``'s."""
    from byod.settings_reference import SERVE_SETTINGS, SETTINGS

    main = ["| setting | flag | environment | default |", "|---|---|---|---|"]
    main += [
        f"| {_cell(s.what)} | {_cell(s.flag)} | {_cell(s.environment)} | {_cell(s.default)} |"
        for s in SETTINGS
    ]
    serve = ["| variable | meaning |", "|---|---|"]
    serve += [f"| {_cell(s.environment)} | {_cell(s.what)} |" for s in SERVE_SETTINGS]
    return "\n".join(main) + "\n", "\n".join(serve) + "\n"


def errors_markdown() -> str:
    """Every error class: its exit status, the HTTP status the API answers it with, what
    happened (its docstring's first paragraph) and what to do (its "What to do:"
    paragraph, else the hint the command line prints)."""
    import inspect

    from byod.api.problems import http_status

    out = ["| error | exit | HTTP | what happened | what to do |", "|---|---|---|---|---|"]
    for error in error_classes():
        doc = inspect.cleandoc(error.__doc__ or "")
        paragraphs = [p for p in doc.split("\n\n") if p.strip()]
        happened = paragraphs[0] if paragraphs else ""
        todo = next(
            (p.split(":", 1)[1] for p in paragraphs if p.startswith("What to do:")), error.hint
        )
        status, kind = http_status(error)
        base = error.__mro__[1].__name__
        article = "an" if base[0] in "AEIOU" else "a"
        parent = "" if base == "Exception" else f" ({article} `{base}`)"
        out.append(
            f"| `{error.__name__}`{parent} | {error.exit_code} | {status} `{kind}` "
            f"| {_cell(happened)} | {_cell(todo) or '-'} |"
        )
    return "\n".join(out) + "\n"


def error_classes() -> list[type[ByodError]]:
    """Every error class of :mod:`byod.errors`, in the order the module defines them."""
    import byod.errors

    return [
        obj
        for obj in vars(byod.errors).values()
        if isinstance(obj, type) and issubclass(obj, byod.errors.ByodError)
    ]


def cli_markdown() -> str:
    """Every command, group and option of ``byod``, as ``typer … utils docs`` writes them."""
    import typer.main
    from typer.cli import get_docs_for_click

    try:  # Typer 0.29 carries its own copy of Click; earlier Typers use Click itself
        from typer._click import Context
    except ImportError:  # pragma: no cover
        from click import Context

    from byod.cli import app

    command = typer.main.get_command(app)
    body = get_docs_for_click(obj=command, ctx=Context(command), name="byod", title="Commands")
    intro = (
        "Generated from the command line itself at each build (`typer byod.cli utils docs`"
        " does the same): every command, group and option. Exit status: 0 all good, 1"
        " something failed (the output says what), 2 bad usage or input.\n\n"
        "`USER` names one user by one rule: ASCII digits only is a byod user id (`byod"
        " users list` shows them); anything else is a clerk id, matched exactly.\n\n"
    )
    title, _, rest = body.partition("\n")
    return f"{title}\n\n{intro}{_escape_brackets(rest)}"


def _escape_brackets(markdown: str) -> str:
    """Square brackets of help texts (``[env: X]``, ``url[,secret]``) as text, not as the
    reference links Markdown would read them as; code spans and blocks as they are."""
    out = []
    in_code = False
    for line in markdown.split("\n"):
        if line.lstrip().startswith("```"):
            in_code = not in_code
        if in_code:
            out.append(line)
            continue
        parts = line.split("`")
        out.append(
            "`".join(
                part if n % 2 else part.replace("[", "\\[").replace("]", "\\]")
                for n, part in enumerate(parts)
            )
        )
    return "\n".join(out)


def http_markdown() -> str:
    """The HTTP API's operations, parameters, bodies and answers, from its OpenAPI
    document (the same one ``GET /openapi.json`` serves)."""
    from byod.api.document import openapi_document

    doc: dict[str, Any] = openapi_document()
    out = [
        "# HTTP API",
        "",
        f"`byod serve` speaks {doc['info']['title']} {doc['info']['version']}. This page is"
        " generated from its OpenAPI document at each build; the document itself is"
        " `GET /openapi.json` on a running service and `clients/typescript/openapi.json` in"
        " the repository.",
        "",
        doc["info"].get("description", ""),
        "",
    ]
    for path, operations in doc["paths"].items():
        for method, op in operations.items():
            out += [f"## `{method.upper()} {path}`", "", op.get("summary", ""), ""]
            if op.get("description"):
                out += [op["description"], ""]
            security = op.get("security", doc.get("security"))
            if security:
                names = sorted({name for one in security for name in one})
                out += [f"Authentication: {', '.join(names) or 'none'}.", ""]
            params = op.get("parameters", [])
            if params:
                out += ["| parameter | in | required | type | description |", "|---" * 5 + "|"]
                for param in params:
                    required = "yes" if param.get("required") else "no"
                    shape = _type(param.get("schema", {}))
                    said = _cell(param.get("description", ""))
                    name = f"`{param['name']}`"
                    out.append(f"| {name} | {param['in']} | {required} | {shape} | {said} |")
                out.append("")
            body = op.get("requestBody")
            if body:
                for media, content in body.get("content", {}).items():
                    out += [f"Request body ({media}): {_type(content.get('schema', {}))}", ""]
            out += ["| status | meaning | body |", "|---|---|---|"]
            for status, answer in op.get("responses", {}).items():
                content = answer.get("content", {})
                shape = ", ".join(_type(c.get("schema", {})) for c in content.values()) or "none"
                out.append(f"| {status} | {_cell(answer.get('description', ''))} | {shape} |")
            out.append("")
    schemas = doc.get("components", {}).get("schemas", {})
    if schemas:
        out += ["## Schemas", ""]
        for name, schema in schemas.items():
            out += [f"### {name}", "", _cell(schema.get("description", "")), ""]
            props = schema.get("properties", {})
            if props:
                required = set(schema.get("required", []))
                out += ["| field | type | required | description |", "|---|---|---|---|"]
                for field, spec in props.items():
                    out.append(
                        f"| `{field}` | {_type(spec)} | {'yes' if field in required else 'no'}"
                        f" | {_cell(spec.get('description', ''))} |"
                    )
                out.append("")
    return "\n".join(out) + "\n"


def _type(schema: dict[str, Any]) -> str:
    if "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[-1]
        return f"[{name}](#{name.lower()})"
    if "anyOf" in schema:
        return " or ".join(_type(one) for one in schema["anyOf"])
    if schema.get("type") == "array":
        return f"array of {_type(schema.get('items', {}))}"
    if "enum" in schema:
        return " \\| ".join(f"`{json.dumps(v)}`" for v in schema["enum"])
    return f"`{schema.get('type', 'any')}`"


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")
