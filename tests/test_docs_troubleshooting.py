"""docs/troubleshooting.md lists every one-line error the CLI can print.

The CLI prints ``stepdistill: error: <message>`` for every ``StepdistillError`` (or subclass, such as
``ToyConfigError``) raised anywhere in ``stepdistill/``. This test parses every ``.py`` file under
``stepdistill/`` with ``ast``, finds each ``raise <StepdistillError or subclass>(<message>)`` and
takes the message's longest constant text fragment, from:

- a ``str`` constant, or the constant parts of an f-string, ``+`` concatenation or ``"...".format``;
- a name bound to such a string (a module constant such as ``MISSING_8BIT``, or a local such as
  ``usage`` in ``eval/features.py``);
- a call to a message-building function of the package (such as ``config.no_critic_message``):
  the fragments of the strings that function returns.

A helper that raises the error with its parameter as the message (``def fail(message): raise
StepdistillError(message)``) is followed too: each call of it is a site, with the message it is
passed. (``stepdistill/`` has no such helper today; the scan would find one.)

Each fragment must appear in docs/troubleshooting.md (whitespace runs and backticks are normalised
on both sides, so a fragment may sit in a code span that wraps across lines).

Skipped: messages with no constant fragment of at least ``MIN_FRAGMENT`` (12) characters. At the
time of writing that is 14 of the 313 raise sites, e.g. ``f"output_dir {out!r} is a file"`` or
``f"{key}={backend!r}; allowed: {...}"``. Rather than go unchecked, 13 of them are checked more
weakly by ``test_short_message_is_documented``: their constant parts of ``MIN_PART`` (4) or more
characters must appear in the page in order, close together. One is not checked at all:
``bench/memory.py``'s ``f"{spec['experiment']}: {record['error']}"``, which re-raises, after the
experiment's name, the error of a child process (itself one of the messages checked here).
``test_unchecked_are_few`` fails when a new message with no checkable text appears.

(``config.compose``'s ``raise StepdistillError(message)`` is checked through ``_one_line``, the
helper that builds ``message``: the fragments of its unknown-option and unknown-key returns. Its
last return passes Hydra's own first line through, which the page describes in prose.)
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "stepdistill"
PAGE = ROOT / "docs" / "troubleshooting.md"
BASE_ERROR = "StepdistillError"
MIN_FRAGMENT = 12
MIN_PART = 4  # the shortest constant part test_short_message_is_documented looks for
MAX_UNCHECKED = 1  # bench/memory.py re-raising a child's error after its name


@dataclass(frozen=True)
class RaiseSite:
    path: str  # relative to the repository root
    line: int
    fragment: str  # "" when no constant fragment reaches MIN_FRAGMENT characters
    pieces: tuple[str, ...] = ()  # every constant fragment, normalised, in source order


def _normalise(text: str) -> str:
    return re.sub(r"\s+", " ", text.replace("`", "")).strip()


def _modules() -> dict[Path, ast.Module]:
    return {p: ast.parse(p.read_text(encoding="utf-8"), filename=str(p)) for p in sorted(PACKAGE.rglob("*.py"))}


def _name(node: ast.AST) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    return None


def error_classes(modules: dict[Path, ast.Module]) -> set[str]:
    """StepdistillError and every class under stepdistill/ that derives from it (at any depth)."""
    classes = {BASE_ERROR}
    defs = [n for tree in modules.values() for n in ast.walk(tree) if isinstance(n, ast.ClassDef)]
    grew = True
    while grew:
        grew = False
        for cls in defs:
            if cls.name not in classes and any(_name(b) in classes for b in cls.bases):
                classes.add(cls.name)
                grew = True
    return classes


class _Fragments:
    """The constant text pieces a message expression can contribute."""

    def __init__(self, modules: dict[Path, ast.Module]):
        self.functions: dict[str, list[ast.FunctionDef]] = {}
        self.module_strings: dict[Path, dict[str, ast.expr]] = {}
        for path, tree in modules.items():
            consts = self.module_strings.setdefault(path, {})
            for node in tree.body:
                if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
                    consts[node.targets[0].id] = node.value
            for node in ast.walk(tree):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    self.functions.setdefault(node.name, []).append(node)

    def of(self, node: ast.expr, path: Path, scope: ast.AST | None, seen: frozenset[str] = frozenset()) -> list[str]:
        if isinstance(node, ast.Constant):
            return [node.value] if isinstance(node.value, str) else []
        if isinstance(node, ast.JoinedStr):
            return [v.value for v in node.values if isinstance(v, ast.Constant) and isinstance(v.value, str)]
        if isinstance(node, ast.BinOp):  # "a" + f"b{x}" ..., or "a %s" % x
            return self.of(node.left, path, scope, seen) + (
                self.of(node.right, path, scope, seen) if isinstance(node.op, ast.Add) else [])
        if isinstance(node, ast.IfExp):
            return self.of(node.body, path, scope, seen) + self.of(node.orelse, path, scope, seen)
        if isinstance(node, ast.Name):
            return self._name_value(node.id, path, scope, seen)
        if isinstance(node, ast.Call):
            func = node.func
            if isinstance(func, ast.Attribute) and func.attr == "format":  # "a {x} b".format(x=...)
                return [piece for frag in self.of(func.value, path, scope, seen)
                        for piece in re.split(r"\{[^{}]*\}", frag)]
            name = _name(func)
            if name and name not in seen and name in self.functions:
                return [frag for fn in self.functions[name] for ret in ast.walk(fn)
                        if isinstance(ret, ast.Return) and ret.value is not None
                        for frag in self.of(ret.value, path, fn, seen | {name})]
        return []

    def _name_value(self, name: str, path: Path, scope: ast.AST | None, seen: frozenset[str]) -> list[str]:
        if name in seen:
            return []
        seen = seen | {name}
        if scope is not None:  # a local assigned in the enclosing function
            values = [n.value for n in ast.walk(scope) if isinstance(n, ast.Assign)
                      and any(isinstance(t, ast.Name) and t.id == name for t in n.targets)]
            if values:
                return [frag for v in values for frag in self.of(v, path, scope, seen)]
        value = self.module_strings.get(path, {}).get(name)
        return self.of(value, path, None, seen) if value is not None else []


def _scopes(tree: ast.Module) -> list[ast.AST]:
    return [tree, *[n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]]


def _raised_message(node: ast.AST, classes: set[str]) -> ast.expr | None | bool:
    """The message expression of ``raise <error class>(message)`` (None if it has none), else False."""
    if not (isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call) and _name(node.exc.func) in classes):
        return False
    args = list(node.exc.args) + [k.value for k in node.exc.keywords]
    return args[0] if args else None


def _helpers(modules: dict[Path, ast.Module], classes: set[str]) -> dict[str, tuple[int, str]]:
    """Functions that raise the error with one of their parameters as the message, e.g.
    ``def fail(message): raise StepdistillError(message)``: name -> (position, parameter name)."""
    found = {}
    for tree in modules.values():
        for fn in _scopes(tree)[1:]:
            params = [a.arg for a in fn.args.posonlyargs + fn.args.args]
            params = params[1:] if params[:1] in (["self"], ["cls"]) else params
            for node in _own_nodes(fn):
                message = _raised_message(node, classes)
                if isinstance(message, ast.Name) and message.id in params + [a.arg for a in fn.args.kwonlyargs]:
                    found[fn.name] = (params.index(message.id) if message.id in params else -1, message.id)
    return found


def _site(path: Path, line: int, message: ast.expr | None, fragments: _Fragments, scope: ast.AST | None) -> RaiseSite:
    pieces = fragments.of(message, path, scope) if message is not None else []
    normalised = tuple(n for n in (_normalise(p) for p in pieces) if n)
    best = max(normalised, key=len, default="")
    return RaiseSite(str(path.relative_to(ROOT)), line, best if len(best) >= MIN_FRAGMENT else "", normalised)


def raise_sites() -> list[RaiseSite]:
    """Every ``raise <error class>(message)``, and every call of a helper that raises its argument."""
    modules = _modules()
    classes = error_classes(modules)
    fragments = _Fragments(modules)
    helpers = _helpers(modules, classes)
    sites = []
    for path, tree in modules.items():
        for scope in _scopes(tree):
            local = scope if scope is not tree else None
            for node in _own_nodes(scope):
                message = _raised_message(node, classes)
                if message is not False:
                    if not (isinstance(scope, (ast.FunctionDef, ast.AsyncFunctionDef)) and scope.name in helpers
                            and isinstance(message, ast.Name) and message.id == helpers[scope.name][1]):
                        sites.append(_site(path, node.lineno, message, fragments, local))
                elif isinstance(node, ast.Call) and _name(node.func) in helpers:
                    position, param = helpers[_name(node.func)]
                    given = [k.value for k in node.keywords if k.arg == param]
                    if not given and 0 <= position < len(node.args):
                        given = [node.args[position]]
                    if given:
                        sites.append(_site(path, node.lineno, given[0], fragments, local))
    return sorted(sites, key=lambda s: (s.path, s.line))


def _own_nodes(scope: ast.AST) -> list[ast.AST]:
    """The nodes of ``scope`` outside nested functions (each function is its own scope)."""
    out, stack = [], list(ast.iter_child_nodes(scope))
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        out.append(node)
        stack.extend(ast.iter_child_nodes(node))
    return out


SITES = raise_sites()


def test_raise_sites_are_found():
    # the scan itself works: the package raises many user errors, and the subclass is seen
    assert len(SITES) > 100
    assert "ToyConfigError" in error_classes(_modules())


@pytest.mark.parametrize("site", [s for s in SITES if s.fragment], ids=lambda s: f"{s.path}:{s.line}")
def test_message_is_documented(site: RaiseSite):
    page = _normalise(PAGE.read_text(encoding="utf-8"))
    assert site.fragment in page, (
        f"{site.path}:{site.line} raises a user error not in docs/troubleshooting.md; "
        f"add an entry containing: {site.fragment!r}")


def _short_parts(site: RaiseSite) -> list[str]:
    return [p for p in site.pieces if len(p) >= MIN_PART]


@pytest.mark.parametrize("site", [s for s in SITES if not s.fragment and _short_parts(s)],
                         ids=lambda s: f"{s.path}:{s.line}")
def test_short_message_is_documented(site: RaiseSite):
    # a message with only short constant parts: they must appear in order, close together
    parts = _short_parts(site)
    pattern = r".{0,80}?".join(re.escape(p) for p in parts)
    page = _normalise(PAGE.read_text(encoding="utf-8"))
    assert re.search(pattern, page), (
        f"{site.path}:{site.line} raises a user error not in docs/troubleshooting.md; "
        f"add an entry with these parts in this order: {parts!r}")


def test_unchecked_are_few():
    unchecked = [f"{s.path}:{s.line}" for s in SITES if not s.fragment and not _short_parts(s)]
    assert len(unchecked) <= MAX_UNCHECKED, (
        f"raise sites whose message has no constant text to look for in the page: {unchecked}; give the "
        "message some constant text (or raise MAX_UNCHECKED and say why in the module docstring)")


def test_unknown_command_line_is_documented():
    # cli.main prints this one itself (not a StepdistillError)
    assert "unknown command" in _normalise(PAGE.read_text(encoding="utf-8"))
