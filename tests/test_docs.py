"""The README and the docs site, checked so that they cannot drift from the code.

- `mkdocs build --strict` builds the site offline into a temporary folder (a broken link, a missing
  page in the nav, a docstring mkdocstrings cannot render: each fails the build).
- Every fenced ```python block of README.md and docs/*.md runs, on the embedded model, unless the line
  before it is `<!-- not-run: REASON -->`. A page's blocks run in order in one namespace, as the cells
  of one notebook: inside one event loop (so `await` works at the top level and a block can reuse the
  engine an earlier one made), except blocks that call `asyncio.run(...)`, which are scripts and run
  outside it. After a page, every engine it left running must pass `check_invariants()` and is stopped.
- The knob table of docs/python-api.md is checked against `EngineConfig`: every field is there, with
  its default, and each range is tried at its ends and just past them.
- The error table of docs/python-api.md is evaluated on that page's engine, where the table stands.
- Relative links of README.md and bench/results/README.md, and `bench/...` paths quoted in the docs,
  name files that exist.
"""

from __future__ import annotations

import ast
import asyncio
import dataclasses
import inspect
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).absolute().parents[1]
DOCS = ROOT / "docs"
PAGES = [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]

FENCE = re.compile(r"^(?P<indent>[ \t]*)```(?P<lang>\w*)[^\n]*\n(?P<body>.*?)^(?P=indent)```[ \t]*$", re.S | re.M)
NOT_RUN = re.compile(r"<!--\s*not-run:\s*(.*?)\s*-->\s*$")
TABLE_MARK = re.compile(r"^<!--\s*(knob-table|error-table)\b.*-->\s*$", re.M)


@dataclasses.dataclass
class Item:
    """One thing to run on a page, in page order: a code block or a checked table."""

    kind: str  # "python", "skipped", "knob-table", "error-table"
    line: int
    text: str


def page_items(page: Path) -> list[Item]:
    """The page's python blocks (run or skipped, with the reason) and its marked tables, in order."""
    text = page.read_text()
    items: list[Item] = []
    for m in FENCE.finditer(text):  # fences may be indented (inside a list item)
        if m.group("lang") != "python":
            continue
        before = text[: m.start()].rstrip().splitlines()
        line = text.count("\n", 0, m.start()) + 1
        skip = NOT_RUN.search(before[-1]) if before else None
        if skip:
            assert skip.group(1), f"{page.name}:{line}: a not-run marker must give its reason"
            items.append(Item("skipped", line, skip.group(1)))
        else:
            items.append(Item("python", line, textwrap.dedent(m.group("body"))))
    for m in TABLE_MARK.finditer(text):
        rows = []
        for row in text[m.end():].lstrip("\n").splitlines():
            if not row.startswith("|"):
                break
            rows.append(row)
        items.append(Item(m.group(1), text.count("\n", 0, m.start()) + 1, "\n".join(rows)))
    return sorted(items, key=lambda i: i.line)


def table_rows(table: str) -> list[list[str]]:
    """Cells of a Markdown table, header and rule dropped; `code` spans unwrapped."""
    rows = []
    for row in table.splitlines()[2:]:
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", row.strip().strip("|"))]
        rows.append([c[1:-1] if len(c) > 1 and c.startswith("`") and c.endswith("`") else c for c in cells])
    return rows


def run_block(code: str, ns: dict[str, Any], loop: asyncio.AbstractEventLoop, where: str) -> None:
    """Run one block as a notebook cell would (top-level await allowed, on the page's loop)."""
    compiled = compile(code, where, "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
    if "asyncio.run(" in code:  # a script: it brings its own event loop
        exec(compiled, ns)
        return

    async def cell() -> None:
        result = eval(compiled, ns)  # noqa: S307 - the docs' own examples
        if inspect.iscoroutine(result):
            await result

    loop.run_until_complete(asyncio.wait_for(cell(), timeout=300))


def check_knob_table(table: str) -> None:
    """Every EngineConfig field documented with its default, its range tried at both ends and past them."""
    from workbench.config import LIVE_FIELDS, EngineConfig

    fields = {f.name: f for f in dataclasses.fields(EngineConfig)}
    rows = {r[0]: r for r in table_rows(table)}
    assert set(rows) == set(fields), (f"knob table and EngineConfig differ: missing {sorted(set(fields) - set(rows))},"
                                      f" unknown {sorted(set(rows) - set(fields))}")
    for name, (_, default, allowed, live, _what) in rows.items():
        assert ast.literal_eval(default) == fields[name].default, f"{name}: documented default {default}"
        assert (live == "yes") == (name in LIVE_FIELDS), f"{name}: documented live={live}, LIVE_FIELDS {LIVE_FIELDS}"
        ok, bad = [], []
        if m := re.fullmatch(r"integer in \[(\d+), (\d+)\]", allowed):
            lo, hi = int(m.group(1)), int(m.group(2))
            ok, bad = [lo, hi], [lo - 1, hi + 1, float(lo)]
        elif m := re.fullmatch(r"number in \[([\d.]+), ([\d.]+)\]", allowed):
            lo, hi = float(m.group(1)), float(m.group(2))
            ok, bad = [lo, hi], [lo - 0.01, hi + 0.01]
        elif allowed.startswith("one of "):
            ok = [ast.literal_eval(v.strip().strip("`")) for v in allowed[len("one of "):].split(",")]
            bad = ["nonsense"]
        else:
            assert allowed in ("a torch device string", "an integer"), f"{name}: unchecked range {allowed!r}"
        for value in ok:
            EngineConfig().replace(**{name: value})
        for value in bad:
            with pytest.raises(ValueError, match=name):
                EngineConfig().replace(**{name: value})


def check_error_table(table: str, ns: dict[str, Any]) -> None:
    """Each call raises the documented exception with the documented opening, and the engine keeps serving."""
    rows = table_rows(table)
    assert rows, "empty error table"
    for call, exc_name, message in rows:
        with pytest.raises(BaseException) as info:
            eval(call, ns)  # noqa: S307 - the docs' own table
        assert type(info.value).__name__ == exc_name, f"{call}: raised {info.value!r}"
        assert str(info.value).startswith(message), f"{call}: message {str(info.value)!r}"
    engine = ns["engine"]
    assert engine.generate_batch(["Still serving?"], max_new_tokens=2, progress=False)[0].finish_reason == "length"


def finish_page(ns: dict[str, Any]) -> None:
    """Stop what the page left running, after checking that no KV block or request leaked."""
    from workbench import Engine

    for value in list(ns.values()):
        if isinstance(value, Engine) and value.is_running:
            try:
                value.check_invariants()
            finally:
                value.stop()


def page_id(page: Path) -> str:
    return str(page.relative_to(ROOT))


RUNNABLE = [p for p in PAGES if any(i.kind != "skipped" for i in page_items(p))]


@pytest.mark.parametrize("page", RUNNABLE, ids=page_id)
def test_page_examples_run(page: Path) -> None:
    items = page_items(page)
    ns: dict[str, Any] = {"__name__": "__docs__"}
    loop = asyncio.new_event_loop()
    try:
        for item in items:
            where = f"{page_id(page)}:{item.line}"
            if item.kind == "python":
                run_block(item.text, ns, loop, where)
            elif item.kind == "knob-table":
                check_knob_table(item.text)
            elif item.kind == "error-table":
                loop.run_until_complete(_off_loop(check_error_table, item.text, ns))
    finally:
        try:
            finish_page(ns)
        finally:
            loop.close()


async def _off_loop(fn: Any, *args: Any) -> None:
    """Run a blocking check from inside the page's loop without blocking that loop."""
    await asyncio.get_running_loop().run_in_executor(None, fn, *args)


def test_every_python_block_runs_or_says_why() -> None:
    """The markers are used as meant: each skip has a reason, and most blocks do run."""
    items = [i for p in PAGES for i in page_items(p)]
    ran = [i for i in items if i.kind == "python"]
    skipped = [i for i in items if i.kind == "skipped"]
    assert all(i.text for i in skipped)
    assert len(ran) >= 2 * len(skipped), f"{len(skipped)} blocks skipped against {len(ran)} run"


def test_mkdocs_build_strict(tmp_path: Path) -> None:
    """The site builds with every warning an error (links, nav, docstrings), offline."""
    try:
        import material  # noqa: F401  (mkdocs-material)
        import mkdocstrings_handlers.python  # noqa: F401
    except ImportError as exc:  # a missing docs extra is a broken set-up, not a reason to skip
        pytest.fail(f"the docs extra is not installed ({exc}); `make setup` installs it")
    missing = [p for p in ("http.md", "lab.md", "engine_threads.md") if not (DOCS / p).is_file()]
    assert not missing, f"pages in mkdocs.yml's nav are missing: {missing}"
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    html = (tmp_path / "site" / "python-api" / "index.html").read_text()
    assert "reconfigure" in html and "max_batch" in html, "mkdocstrings rendered no API reference"


def test_readme_holds_the_two_commands() -> None:
    """README's set-up is exactly `make run` and `make test` (CI runs the second)."""
    text = (ROOT / "README.md").read_text()
    commands = [line.split("#")[0].strip() for m in FENCE.finditer(text) if m.group("lang") in ("bash", "sh", "")
                for line in m.group("body").splitlines() if line.strip().startswith("make ")]
    assert commands == ["make run", "make test"], commands
    assert "make test" in (ROOT / ".ci" / "run").read_text()
    assert "OWNER" not in text, "a placeholder Binder URL"


LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


@pytest.mark.parametrize("doc", ["README.md", "bench/results/README.md", "bench/probes/README.md", "CHANGELOG.md"])
def test_relative_links_resolve(doc: str) -> None:
    path = ROOT / doc
    links = [m for m in LINK.findall(path.read_text()) if "://" not in m and not m.startswith("mailto:")]
    missing = [m for m in links if not (path.parent / m).exists()]
    assert not missing, f"{doc} links to files that do not exist: {missing}"


def test_bench_paths_in_docs_exist() -> None:
    """A result file or script the docs name by path (`bench/...`) is in the tree."""
    named = {m for p in PAGES
             for m in re.findall(r"`((?:bench|notebooks|docs)/[\w./-]+\.(?:md|json|txt|py|sh|ipynb|png))`", p.read_text())}
    missing = sorted(n for n in named if not (ROOT / n).exists())
    assert not missing, f"named in the docs but not in the tree: {missing}"


def test_results_index_names_every_record() -> None:
    """bench/results/README.md indexes each record there (twins such as NAME.json ride on NAME.md's row)."""
    results = ROOT / "bench" / "results"
    index = (results / "README.md").read_text()
    unindexed = [f.name for f in sorted(results.iterdir())
                 if f.is_file() and f.name != "README.md" and f.name.split(".")[0] + "." not in index]
    assert not unindexed, f"records missing from bench/results/README.md: {unindexed}"
