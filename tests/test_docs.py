"""The documentation is executable: every fenced block and every documented command of README.md and docs/*.md.

Blocks are found by a Markdown parser (markdown-it-py) and their info string decides what happens:

* ``bash``: run offline on the CPU, each block alone in a fresh scratch directory in which the
  repository's ``storyboards/``, ``scripts/`` and ``docs/`` resolve, with ``slotgen`` and ``python``
  meaning ``python -m slotgen`` / the interpreter of this checkout; any failing line fails the block.
* ``bash norun`` (GPU, network, real weights or a long run): parse-level truth of every command line.
* ``python``: executed the same way; ``python norun``: every import resolves.
* ``yaml`` (a storyboard when it has ``prompts``: it must validate), ``json`` (must parse), ``text``
  (output, trees, grammars: not run). A fence without one of these info strings is an error.

Parse-level truth, also for every inline code span that is a command (``slotgen ...``, ``python
scripts/...``, usage notation such as ``[--seed N]`` allowed): the program exists; a ``slotgen``
subcommand and each ``--flag`` exist as visible options of typer's click command objects; a script's
arguments are parsed by the script's own argparse parser (unknown or missing required flags fail);
``python -m M`` finds ``M``; ``pip install`` extras exist in pyproject.toml. Every repository path a doc
names (a relative link, or inline code such as ``scripts/x.py`` or ``tests/test_x.py::test_name``) exists.

Execution is ``slow`` (each block starts torch in a subprocess); every parse-level check is in the quick
loop. Each test id is ``FILE:LINE`` of the block or span it checks.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import importlib
import importlib.util
import io
import json
import os
import re
import runpy
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import pytest
import typer
from markdown_it import MarkdownIt

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
INFO_STRINGS = {"bash", "bash norun", "python", "python norun", "yaml", "json", "text"}
SCRATCH_LINKS = ("storyboards", "scripts", "docs")
BLOCK_TIMEOUT_S = 600  # a runnable block takes well under 30 s on an idle machine; this only stops a hang
# Programs a `bash norun` block may name that exist only on the machines it is meant for.
GPU_MACHINE_PROGRAMS = {"nvidia-smi"}
SHELL_BUILTINS = {"cd", "export", "set", "unset", "source", ".", "echo", "true", "false", "exit", "test", "["}
SHELL_KEYWORDS = {"do", "then", "else", "done", "fi", "{", "}"}
SHELL_OPERATORS = {";", "&&", "||", "|", "&"}
ENV_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
PLACEHOLDER_FLAG = re.compile(r"^--[A-Z][A-Z0-9_]*$")  # `--KEY VALUE` in usage notation: any memory key


@dataclass(frozen=True)
class Block:
    path: Path
    line: int  # 1-based line of the opening fence
    info: str
    text: str

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(REPO)}:{self.line}"


def _parser() -> MarkdownIt:
    return MarkdownIt("commonmark").enable("table")


def fenced_blocks(path: Path) -> list[Block]:
    return [Block(path, tok.map[0] + 1, " ".join(tok.info.split()), tok.content)
            for tok in _parser().parse(path.read_text(encoding="utf-8")) if tok.type == "fence"]


def _is_command(text: str) -> bool:
    words = text.split()
    while words and ENV_ASSIGNMENT.match(words[0]):
        words = words[1:]
    if not words:
        return False
    if words[0] == "slotgen":
        return len(words) > 1
    return words[0] in ("python", "python3") and len(words) > 1 and (words[1].startswith("scripts/") or words[1] == "-m")


def _inline_children(path: Path):
    """The doc's lines and every (inline token, child token) pair markdown-it finds in it."""
    lines = path.read_text(encoding="utf-8").splitlines()
    pairs = [(tok, child) for tok in _parser().parse("\n".join(lines)) if tok.type == "inline" and tok.map is not None
             for child in tok.children or []]
    return lines, pairs


def inline_commands(path: Path) -> list[Block]:
    """Inline code spans that are commands, with the line they are on."""
    lines, pairs = _inline_children(path)
    found = []
    for tok, child in pairs:
        if child.type == "code_inline" and _is_command(child.content):
            words = child.content.split()
            # the line holding the span's start (a span may wrap; its words are what the line shows)
            line = next((i + 1 for n in (3, 2, 1) for i in range(tok.map[0], tok.map[1])
                         if " ".join(words[:n]) in lines[i]), tok.map[0] + 1)
            found.append(Block(path, line, "inline", child.content))
    return found


ALL_BLOCKS = [b for p in DOCS for b in fenced_blocks(p)]
INLINE = [b for p in DOCS for b in inline_commands(p)]


def _ids(blocks):
    return [b.where for b in blocks]


# ---------------------------------------------------------------------------------------------------
# Parse-level truth


def _slotgen_command():
    """The click command object typer builds for ``slotgen`` (typer ships its own copy of click, so the
    command objects are used by their interface: a group's ``commands``, an option's ``opts``)."""
    from slotgen.cli import app

    return typer.main.get_command(app)


def _usage_token(token: str) -> str:
    """A token of usage notation without its brackets: ``[--seed`` → ``--seed``, ``N]`` → ``N``."""
    return token.lstrip("[(").rstrip("])")


def check_slotgen(args: list[str]) -> list[str]:
    """Problems with ``slotgen ARGS``: the subcommand path and every flag must exist (visible options)."""
    cmd, path, args = _slotgen_command(), ["slotgen"], [_usage_token(a) for a in args]
    while hasattr(cmd, "commands") and args and not args[0].startswith("-"):
        name = args.pop(0)
        sub = cmd.commands.get(name)
        if sub is None or getattr(sub, "hidden", False):
            return [f"`{' '.join(path)}` has no subcommand {name!r}"]
        cmd, path = sub, [*path, name]
    flags = {"--help"}
    for p in cmd.params:
        if p.param_type_name == "option" and not p.hidden:
            flags.update(p.opts)
            flags.update(p.secondary_opts)
    problems = []
    for a in args:
        if a == "--" or PLACEHOLDER_FLAG.match(a):
            continue
        name = a.split("=", 1)[0]
        if (name.startswith("--") or re.fullmatch(r"-[A-Za-z]", name)) and name not in flags:
            problems.append(f"`{' '.join(path)}` has no option {name}")
    return problems


class _ParserBuilt(Exception):
    """Raised in place of a script's work once it built its argparse parser and asked it to parse."""

    def __init__(self, parser: argparse.ArgumentParser):
        super().__init__()
        self.parser = parser


def _uses_argparse(source: str) -> bool:
    return any(isinstance(n, ast.Attribute) and n.attr == "ArgumentParser" for n in ast.walk(ast.parse(source)))


def script_parser(script: Path) -> argparse.ArgumentParser:
    """The argparse parser ``script`` builds when run: the script runs until it asks the parser to parse."""

    def stop(self, *_args, **_kwargs):
        raise _ParserBuilt(self)

    with mock.patch.object(argparse.ArgumentParser, "parse_args", stop), \
            mock.patch.object(argparse.ArgumentParser, "parse_known_args", stop), \
            mock.patch.object(sys, "argv", [str(script)]), contextlib.redirect_stdout(io.StringIO()):
        try:
            runpy.run_path(str(script), run_name="__main__")
        except _ParserBuilt as built:
            return built.parser
    raise AssertionError(f"{script} imports argparse but never parsed its arguments")


def check_script(script: Path, args: list[str], *, usage: bool) -> list[str]:
    """Problems with ``python SCRIPT ARGS``, decided by the script's own argparse parser: every flag must be
    one of its option strings (exactly, no abbreviation) and every required option present; a concrete
    command line (not usage notation with placeholders) must also parse."""
    name = script.relative_to(REPO) if script.is_relative_to(REPO) else script
    if not script.is_file():
        return [f"no script {name}"]
    if not _uses_argparse(script.read_text(encoding="utf-8")):
        return [f"{name} takes no arguments"] if args else []
    parser = script_parser(script)
    options = {o: a for a in parser._actions for o in a.option_strings}  # argparse's own table of its options
    flags = {a.split("=", 1)[0] for a in args if a.startswith("-") and a != "-"}
    problems = [f"{name} has no option {f}" for f in sorted(flags - set(options))]
    problems += [f"{name} needs {a.option_strings[0]}" for a in parser._actions
                 if a.required and a.option_strings and not flags & set(a.option_strings)]
    if not problems and not usage:
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            try:
                parser.parse_args(args)
            except SystemExit:
                problems.append(f"{name} {' '.join(args)}: {err.getvalue().strip().splitlines()[-1]}")
    return problems


def _extras() -> set[str]:
    data = tomllib.loads((REPO / "pyproject.toml").read_text())
    return set(data["project"].get("optional-dependencies", {}))


def check_pip(args: list[str]) -> list[str]:
    problems = []
    for a in args:
        m = re.fullmatch(r"(?:\.|slotgen)\[([a-z0-9_,-]+)\]", a)
        if m:
            problems += [f"pyproject.toml has no extra {e!r}" for e in m.group(1).split(",") if e not in _extras()]
    return problems


def check_command(words: list[str], *, runs: bool, usage: bool) -> list[str]:
    """Parse-level problems of one simple command (``words`` after the shell's quoting)."""
    while words and ENV_ASSIGNMENT.match(words[0]):
        words = words[1:]
    while words and words[0] in SHELL_KEYWORDS:
        words = words[1:]
    if not words or words[0] in ("for", "while", "if", "case"):
        return []
    prog, args = words[0], words[1:]
    if prog == "slotgen":
        return check_slotgen(args)
    if prog in ("python", "python3"):
        if args[:1] == ["-m"] and len(args) > 1:
            if args[1] == "slotgen":
                return check_slotgen(args[2:])
            return [] if importlib.util.find_spec(args[1]) else [f"no Python module {args[1]!r}"]
        if args and args[0].endswith(".py"):
            return check_script(REPO / args[0], [_usage_token(a) for a in args[1:]] if usage else args[1:], usage=usage)
        return []
    if prog == "pip":
        return check_pip(args)
    if prog.startswith("scripts/"):
        script = REPO / prog
        return [] if script.is_file() and os.access(script, os.X_OK) else [f"no executable {prog}"]
    if prog in SHELL_BUILTINS or shutil.which(prog) or (not runs and prog in GPU_MACHINE_PROGRAMS):
        return []
    return [f"no program {prog!r} on PATH"]


def shell_commands(text: str) -> list[list[str]]:
    """The simple commands of a shell block: ``\\`` continuations joined, comments dropped, split at operators."""
    commands = []
    for line in text.replace("\\\n", " ").splitlines():
        words: list[str] = []
        for w in shlex.split(line, comments=True):
            if w in SHELL_OPERATORS:
                commands.append(words)
                words = []
            elif w.endswith(";") and len(w) > 1:
                words.append(w[:-1])
                commands.append(words)
                words = []
            else:
                words.append(w)
        commands.append(words)
    return [c for c in commands if c]


def parse_problems(block: Block) -> list[str]:
    if block.info == "inline":  # usage notation: `a | b` are alternatives of one command, not a pipe
        return check_command(shlex.split(block.text), runs=False, usage=True)
    if block.info.startswith("bash"):
        return [p for c in shell_commands(block.text) for p in check_command(c, runs=block.info == "bash", usage=False)]
    if block.info.startswith("python"):
        return import_problems(block.text)
    if block.info == "json":
        try:
            json.loads(block.text)
        except json.JSONDecodeError as e:
            return [f"invalid JSON: {e}"]
    if block.info == "yaml":
        import yaml

        data = yaml.safe_load(block.text)
        if isinstance(data, dict) and "prompts" in data:
            from slotgen.errors import SlotgenError
            from slotgen.storyboard import parse_storyboard

            try:
                parse_storyboard(block.text, block.where)
            except SlotgenError as e:
                return [f"invalid storyboard: {e}"]
    return []


def import_problems(source: str) -> list[str]:
    problems = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [(a.name, None) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names = [(node.module, a.name) for a in node.names]
        else:
            continue
        for module, name in names:
            try:
                mod = importlib.import_module(module)
            except ImportError as e:
                problems.append(f"import {module}: {e}")
                continue
            if name is not None and name != "*" and not hasattr(mod, name) \
                    and not (hasattr(mod, "__path__") and importlib.util.find_spec(f"{module}.{name}")):
                problems.append(f"from {module} import {name}: no such name")
    return problems


def test_every_fence_has_a_known_info_string():
    bad = [f"{b.where}: info string {b.info!r}" for b in ALL_BLOCKS if b.info not in INFO_STRINGS]
    assert not bad, "fences need one of " + ", ".join(sorted(INFO_STRINGS)) + ":\n" + "\n".join(bad)


@pytest.mark.parametrize("block", ALL_BLOCKS + INLINE, ids=_ids(ALL_BLOCKS + INLINE))
def test_documented_commands_parse(block):
    problems = parse_problems(block)
    assert not problems, f"{block.where}: " + f"\n{block.where}: ".join(problems)


def test_every_command_group_help_names_all_its_subcommands():
    """A group's help (``slotgen bench --help``) is documentation too: it names every subcommand."""
    groups, missing = [("slotgen", _slotgen_command())], []
    while groups:
        path, group = groups.pop()
        for name, sub in group.commands.items():
            if sub.hidden:
                continue
            if path != "slotgen" and not re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", group.help or ""):
                missing.append(f"`{path} --help` does not name {name!r}")
            if hasattr(sub, "commands"):
                groups.append((f"{path} {name}", sub))
    assert not missing, "\n".join(missing)


def referenced_paths(path: Path) -> list[tuple[int, str]]:
    """Repository paths the doc names: relative link targets and inline code such as ``scripts/x.py`` or
    ``tests/test_x.py::test_name``, with the line they are on."""
    lines, pairs = _inline_children(path)
    found = []
    for tok, child in pairs:
        if child.type == "link_open":
            ref = str(child.attrs.get("href", ""))
            if not re.match(r"^[a-z]+:|^#", ref):
                target = (path.parent / ref.split("#")[0]).resolve()
                ref = str(target.relative_to(REPO)) if target.is_relative_to(REPO) else ref
            else:
                continue
        elif child.type == "code_inline" and re.fullmatch(r"(slotgen|scripts|tests|docs|storyboards)/[\w./-]+(::\w+)?",
                                                          child.content):
            ref = child.content
        else:
            continue
        line = next((i + 1 for i in range(tok.map[0], tok.map[1]) if ref.split("::")[0].split("/")[-1] in lines[i]),
                    tok.map[0] + 1)
        found.append((line, ref))
    return found


@pytest.mark.parametrize("doc", DOCS, ids=[str(p.relative_to(REPO)) for p in DOCS])
def test_paths_the_docs_name_exist(doc):
    missing = []
    for line, ref in referenced_paths(doc):
        file, _, name = ref.partition("::")
        target = REPO / file
        if not target.exists():
            missing.append(f"{doc.relative_to(REPO)}:{line}: no {file}")
        elif name and name not in {n.name for n in ast.walk(ast.parse(target.read_text(encoding="utf-8")))
                                   if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))}:
            missing.append(f"{doc.relative_to(REPO)}:{line}: {file} defines no {name}")
    assert not missing, "\n".join(missing)


# ---------------------------------------------------------------------------------------------------
# Execution


@pytest.fixture
def scratch(tmp_path):
    """A scratch working directory where the repository's files resolve, and the environment to run in."""
    work, bin_dir = tmp_path / "work", tmp_path / "bin"
    work.mkdir()
    bin_dir.mkdir()
    for name in SCRATCH_LINKS:
        (work / name).symlink_to(REPO / name, target_is_directory=True)
    for name, target in (("slotgen", f'"{sys.executable}" -m slotgen'), ("python", f'"{sys.executable}"'),
                         ("python3", f'"{sys.executable}"')):
        exe = bin_dir / name
        exe.write_text(f'#!/bin/sh\nexec {target} "$@"\n')
        exe.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}", "PYTHONPATH": str(REPO),
           "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    env.pop("SLOTGEN_DEBUG", None)
    return work, env


def _run(argv, cwd, env, block):
    try:
        res = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=BLOCK_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{block.where}: still running after {BLOCK_TIMEOUT_S} s")
    assert res.returncode == 0, (f"{block.where}: exit {res.returncode}\n--- block\n{block.text}--- stderr (end)\n"
                                 + res.stderr[-3000:])
    return res


RUNNABLE = [b for b in ALL_BLOCKS if b.info in ("bash", "python")]


@pytest.mark.slow
@pytest.mark.parametrize("block", RUNNABLE, ids=_ids(RUNNABLE))
def test_documented_block_runs(block, scratch):
    work, env = scratch
    if block.info == "bash":
        _run(["bash", "-e", "-o", "pipefail", "-c", block.text], work, env, block)
    else:
        _run([sys.executable, "-c", block.text], work, env, block)


# ---------------------------------------------------------------------------------------------------
# The checker itself


def test_checker_refuses_what_does_not_exist():
    assert check_slotgen(["render", "s.yaml", "-o", "x.mp4", "--snapshot-every", "4c"]) == []
    assert check_slotgen(["bench", "speed", "[--policies", "sink]"]) == []
    assert check_slotgen(["render", "s.yaml", "--no-such-flag"]) == ["`slotgen render` has no option --no-such-flag"]
    assert check_slotgen(["bench", "nope"]) == ["`slotgen bench` has no subcommand 'nope'"]
    assert check_slotgen(["resume", "s.pt", "--window", "3"]) == ["`slotgen resume` has no option --window"]  # hidden
    assert check_command(["huggingface-cli-that-is-gone", "download"], runs=False, usage=False)
    assert check_pip(["-e", ".[no-such-extra]"]) == ["pyproject.toml has no extra 'no-such-extra'"]
    assert import_problems("from slotgen.render import no_such_function")
    assert shell_commands("A=1 slotgen render s.yaml \\\n  -o x.mp4   # note\nfor d in a b; do ln -s $d x; done\n") == [
        ["A=1", "slotgen", "render", "s.yaml", "-o", "x.mp4"], ["for", "d", "in", "a", "b"], ["do", "ln", "-s", "$d", "x"],
        ["done"]]


def test_checker_runs_a_scripts_own_parser():
    strip = REPO / "scripts" / "frame_strip.py"
    assert check_script(strip, ["--model", "DIR", "--out", "s.png"], usage=False) == []
    assert check_script(strip, ["--model", "DIR", "--no-such-flag", "1"], usage=True) == [
        "scripts/frame_strip.py has no option --no-such-flag"]
    assert check_script(strip, ["--every", "N"], usage=True) == []  # a placeholder value in usage notation
    (problem,) = check_script(strip, ["--every", "N"], usage=False)
    assert "invalid int value: 'N'" in problem
    assert check_script(REPO / "scripts" / "slot_merge_cost.py", ["--fast"], usage=False) == [
        "scripts/slot_merge_cost.py takes no arguments"]


def test_docs_are_found():
    assert {b.path.name for b in RUNNABLE} >= {"README.md"}
    assert any(b.text.startswith("slotgen render STORY.yaml") for b in INLINE)
