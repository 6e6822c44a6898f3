"""The command lines in the README's and ``docs/cli.md``'s bash code blocks against the real CLI.

Every line of a ```` ```bash ```` block is parsed by the parser of the program it names (our
console scripts, the benchmark scripts, ``torchx run`` with our component, ``torchrun``, ``make``
targets) and its ``--config`` files are loaded with its ``dotted.key=value`` overrides by the run
config loader, so a renamed flag or config key fails here instead of in a user's shell. The cheap
commands (``dtn-synth``, ``dtn-prepare``) also run, on tiny data; ``dtn-model-stats``,
``dtn-plan`` and the README's train -> predict -> export -> analyze chain run in the slow tests.

How the docs write commands, and how this test reads them:
- ``\\`` continues a line; ``# ...`` is a comment; ``A && B`` and ``A; B`` are two commands.
- ``[--flag VALUE]`` is optional and ``a|b`` lists alternatives: the command is checked without
  the optional parts and with them, once per alternative.
- An ALL-CAPS word (``CFG``, ``RAW_DIR``, ``K``) is a placeholder, replaced from ``PLACEHOLDERS``;
  ``...`` stands for arguments shown elsewhere and is dropped.
- Command-output blocks are not tagged ``bash``. Inline spans count as commands only for
  ``python ...`` and ``make ...``; an inline ``dtn-...`` span is prose (a flag named in a
  sentence).
"""

from __future__ import annotations

import argparse
import glob
import importlib
import importlib.util
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Dict, Iterator, List, Sequence, Tuple

import pytest
import tomllib

from dtn_torchrec.train.config import load_run_config

REPO = Path(__file__).resolve().parent.parent
DOCUMENTS = ("README.md", "docs/cli.md")
COMMAND_FENCES = ("```bash", "```sh", "```shell")

# Placeholder -> value used when parsing and running. "{data}"/"{raw}" are a tiny prepared
# dataset and its raw files; relative paths resolve in a sandbox that mirrors the repository.
PLACEHOLDERS = {
    "CFG": "configs/dtn_demo.yaml",
    "FILE": "configs/dtn_demo.yaml",
    "RAW_DIR": "{raw}",
    "RAW": "{raw}",
    "DATA": "{data}",
    "DIR": "{data}",
    "RUNS": "runs/bench",
    "K": "2",
    "N": "2",
    "M": "2",
    "S": "0",
    "V": "0",
    "OUT": "out.json",
    "NAME": "test",
}
# Sizes that make the documented data commands cheap enough to run in a test.
TINY_ARGS = {"--train-rows": "300", "--test-rows": "100"}
RUN_FAST = ("dtn-synth", "dtn-prepare")
RUN_SLOW = ("dtn-model-stats", "dtn-plan")


@dataclass(frozen=True)
class DocCommand:
    """One command line of a document, after expanding optional parts and alternatives."""

    where: str  # "README.md:123"
    argv: Tuple[str, ...]
    note: str = ""  # the line's trailing comment, e.g. "refused, exit 1"

    @property
    def program(self) -> str:
        return self.argv[0]

    def __str__(self) -> str:
        return f"{self.where}: {shlex.join(self.argv)}"


def _code_lines(path: Path) -> Iterator[Tuple[int, str]]:
    """(line number, logical line) of every bash code block, continuations joined."""
    in_block, pending, start = False, "", 0
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        stripped = line.strip()
        if stripped.startswith("```"):
            in_block = not in_block and stripped.startswith(COMMAND_FENCES)
            continue
        if not in_block:
            continue
        if not pending:
            start = number
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        yield start, pending + stripped
        pending = ""


def _split_commands(tokens: List[str]) -> List[List[str]]:
    commands, current = [], []
    for token in tokens:
        if token in ("&&", ";"):
            commands.append(current)
            current = []
        else:
            current.append(token)
    commands.append(current)
    return [c for c in commands if c]


def _expand(tokens: List[str]) -> List[Tuple[str, ...]]:
    """The minimal variant (optional parts dropped) and one full variant per alternative."""
    marked: List[Tuple[bool, List[str]]] = []  # (optional, alternatives)
    depth = 0
    for token in tokens:
        if token.startswith("[-"):
            depth += 1
            token = token[1:]
        optional = depth > 0
        while depth > 0 and token.endswith("]"):
            depth -= 1
            token = token[:-1]
        alternatives = token.split("|") if "|" in token and not token.startswith("-") else [token]
        marked.append((optional, alternatives))
    width = max(len(alts) for _, alts in marked)
    variants = [tuple(alts[0] for optional, alts in marked if not optional)]
    for i in range(width):
        variants.append(tuple(alts[min(i, len(alts) - 1)] for _, alts in marked))
    return list(dict.fromkeys(variants))


# Inline code spans that are whole commands: `python -m module ...`, `python path.py ...`,
# `make target`. An inline `dtn-... --flag` is prose naming a flag; full dtn-* commands go in
# bash blocks.
_INLINE_COMMAND = re.compile(r"`((?:python3? (?:-m \S+|\S+\.py)|make )[^`]*)`")


def _inline_lines(path: Path) -> Iterator[Tuple[int, str]]:
    in_block = False
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if line.strip().startswith("```"):
            in_block = not in_block
        elif not in_block:
            yield from ((number, m.group(1)) for m in _INLINE_COMMAND.finditer(line))


def doc_commands(document: str) -> List[DocCommand]:
    """Every command of ``document``'s bash blocks and inline command spans, expanded (see the
    module docstring)."""
    path = REPO / document
    commands = []
    for number, line in sorted([*_code_lines(path), *_inline_lines(path)]):
        tokens = shlex.split(line, comments=True)
        comment = re.search(r"(?:^|\s)#\s*(.*)$", line)
        note = comment.group(1) if comment else ""
        for command in _split_commands(tokens):
            while command and re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", command[0]):
                command = command[1:]  # leading environment assignments
            if command and command[0] not in ("export", "cd"):
                commands.extend(
                    DocCommand(f"{document}:{number}", v, note) for v in _expand(command)
                )
    return commands


def all_commands() -> List[DocCommand]:
    """The commands of every document, each distinct command line once (first place it appears)."""
    first: Dict[Tuple[str, ...], DocCommand] = {}
    for document in DOCUMENTS:
        if (REPO / document).exists():
            for command in doc_commands(document):
                first.setdefault(command.argv, command)
    return list(first.values())


# ---- resolving placeholders -------------------------------------------------------------------


def _resolve(token: str, paths: Dict[str, str]) -> str:
    def one(word: str) -> str:
        if re.fullmatch(r"[A-Z][A-Z0-9_]*", word):
            if word not in PLACEHOLDERS:
                raise AssertionError(f"placeholder {word!r} unknown: add it to PLACEHOLDERS")
            return PLACEHOLDERS[word].format(**paths)
        return word

    if "=" in token and not token.startswith("-"):
        key, _, value = token.partition("=")
        return f"{key}={one(value)}"
    return one(token)


def resolve_argv(argv: Sequence[str], paths: Dict[str, str]) -> List[str]:
    """Placeholders replaced, ``...`` dropped, globs (``configs/*.yaml``) expanded in the repo."""
    out: List[str] = []
    for token in argv:
        if token == "...":
            continue
        token = _resolve(token, paths)
        if "*" in token and not token.startswith("-"):
            matches = sorted(glob.glob(token, root_dir=REPO))
            assert matches, f"{token!r} matches no file in the repository"
            out.extend(matches)
        else:
            out.append(token)
    return out


# ---- parsing with the real parsers ------------------------------------------------------------


class _Parsed(Exception):
    def __init__(self, namespace: argparse.Namespace) -> None:
        super().__init__("parsed")
        self.namespace = namespace


def _console_scripts() -> Dict[str, str]:
    with open(REPO / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["project"]["scripts"]


def _load_script(path: str) -> ModuleType:
    """A script such as ``benchmarks/throughput.py``, imported as its own ``python PATH`` would."""
    file = (REPO / path).resolve()
    if (file.parent / "__init__.py").exists():
        return importlib.import_module(f"{file.parent.name}.{file.stem}")
    sys.path.insert(0, str(file.parent))
    try:
        spec = importlib.util.spec_from_file_location(f"_doc_{file.stem}", file)
        assert spec is not None and spec.loader is not None, f"cannot import {path}"
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(file.parent))


def _check_runs_as_script(path: str, where: str) -> None:
    """``python PATH`` puts only PATH's directory on ``sys.path``: a module that imports its own
    package (``from benchmarks.common import ...``) must be run as ``python -m package.module``."""
    file = REPO / path
    assert file.is_file(), f"{where}: no file {path}"
    package = file.parent.name
    if (file.parent / "__init__.py").exists():
        own_imports = re.search(
            rf"^\s*(from\s+\.|from\s+{package}[.\s]|import\s+{package}\b)",
            file.read_text(),
            flags=re.MULTILINE,
        )
        module = f"{package}.{file.stem}"
        assert not own_imports, f"{where}: imports its package; write `python -m {module}`"


_PARSE_METHODS = (
    "parse_args",
    "parse_known_args",
    "parse_intermixed_args",
    "parse_known_intermixed_args",
)


def parse_with_main(main: Callable[..., Any], args: List[str], where: str) -> argparse.Namespace:
    """The namespace ``main(args)`` parses, stopping the program right after its parse (whichever
    of argparse's parse methods it calls; the nested calls they make run normally)."""
    originals = {name: getattr(argparse.ArgumentParser, name) for name in _PARSE_METHODS}
    depth = [0]

    def stopping(name: str) -> Callable[..., Any]:
        def parse(self: argparse.ArgumentParser, *a: Any, **kw: Any) -> Any:
            depth[0] += 1
            try:
                result = originals[name](self, *a, **kw)
            finally:
                depth[0] -= 1
            if depth[0] == 0:
                raise _Parsed(result[0] if isinstance(result, tuple) else result)
            return result

        return parse

    for name in _PARSE_METHODS:
        setattr(argparse.ArgumentParser, name, stopping(name))
    try:
        main(args)
    except _Parsed as parsed:
        return parsed.namespace
    except SystemExit as e:
        raise AssertionError(f"{where}: the parser refused {shlex.join(args)} (exit {e.code})")
    finally:
        for name, method in originals.items():
            setattr(argparse.ArgumentParser, name, method)
    raise AssertionError(f"{where}: main() returned without parsing a command line")


def check_configs(namespace: argparse.Namespace, where: str) -> int:
    """Loads each ``--config``/``--configs`` file with the command's overrides; returns how many."""
    paths: List[str] = []
    for name in ("config", "configs"):
        value = getattr(namespace, name, None)
        if isinstance(value, str):
            paths.append(value)
        elif isinstance(value, list):
            paths.extend(value)
    overrides = getattr(namespace, "overrides", None) or []
    for path in paths:
        try:
            load_run_config(REPO / path if not os.path.isabs(path) else path, overrides)
        except Exception as e:  # noqa: BLE001 - name the document line with the loader's reason
            raise AssertionError(f"{where}: {path} {overrides}: {e}") from e
    return len(paths)


def _makefile_targets() -> List[str]:
    text = (REPO / "Makefile").read_text()
    return re.findall(r"^([A-Za-z0-9_.-]+):", text, flags=re.MULTILINE)


def _check_torchx(args: List[str], where: str) -> None:
    from torchx.cli import argparse_util
    from torchx.cli.cmd_run import CmdRun
    from torchx.specs.builders import parse_args as parse_component_args

    assert args and args[0] == "run", f"{where}: only `torchx run` is documented"
    # torchx's CLI is one parse per process: its actions remember the options already seen.
    argparse_util.torchxconfig.called_args.clear()
    argparse_util.ArgOnceAction.called_args.clear()
    parser = argparse.ArgumentParser(prog="torchx run")
    CmdRun().add_arguments(parser)
    run_args = parser.parse_args(args[1:])
    component, *component_args = run_args.component_name_and_args
    file, _, function = component.partition(":")
    component_fn = getattr(_load_script(file), function)
    script_args = list(parse_component_args(component_fn, component_args).script_args)
    if script_args and script_args[0] == "--":
        script_args = script_args[1:]
    if script_args:  # `-- ...` elides the dtn-train arguments shown elsewhere
        module = importlib.import_module("dtn_torchrec.cli.train")
        check_configs(parse_with_main(module.main, script_args, where), where)


def _check_torchrun(args: List[str], where: str) -> None:
    from torch.distributed.run import get_args_parser

    parsed = get_args_parser().parse_args(args)
    assert parsed.module, f"{where}: documented torchrun lines start a module (-m)"
    module = importlib.import_module(parsed.training_script)
    check_configs(parse_with_main(module.main, list(parsed.training_script_args), where), where)


def check_command(command: DocCommand, paths: Dict[str, str]) -> None:
    """Parses one documented command with the parser of the program it names."""
    argv = resolve_argv(command.argv, paths)
    program, args = argv[0], argv[1:]
    where = str(command)
    scripts = _console_scripts()
    if program in scripts:
        module_name, _, function = scripts[program].partition(":")
        main = getattr(importlib.import_module(module_name), function)
        check_configs(parse_with_main(main, args, where), where)
    elif program in ("python", "python3", ".venv/bin/python"):
        if args[0] == "-m":
            main = importlib.import_module(args[1]).main
            args = args[2:]
        else:
            _check_runs_as_script(args[0], where)
            main = _load_script(args[0]).main
            args = args[1:]
        check_configs(parse_with_main(main, args, where), where)
    elif program == "torchx":
        _check_torchx(args, where)
    elif program == "torchrun":
        _check_torchrun(args, where)
    elif program == "make":
        missing = set(args) - set(_makefile_targets())
        assert not missing, f"{where}: no Makefile target {sorted(missing)}"
    elif program == "pip":
        pass  # the GPU install recipe: pip's own command line, not ours
    else:
        raise AssertionError(f"{where}: unknown program {program!r}: teach this test or fix it")


# ---- tests ------------------------------------------------------------------------------------

COMMANDS = all_commands()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Dict[str, str]:
    """A tiny synthetic raw set and its prepared dataset (absolute paths)."""
    from dtn_torchrec.cli import prepare, synth

    root = tmp_path_factory.mktemp("tiny")
    raw, data = root / "raw", root / "data"
    # 1200 train rows after the valid split: two batches of the demo configs' 512.
    assert (
        synth.main(
            [
                "--output",
                str(raw),
                "--train-rows",
                "1500",
                "--test-rows",
                "300",
                "--id-scale",
                "0.002",
                "--history-scale",
                "0.1",
            ]
        )
        == 0
    )
    assert (
        prepare.main(
            [
                "--format",
                "aliccp-raw",
                "--input",
                str(raw),
                "--output",
                str(data),
                "--valid-fraction",
                "0.2",
                "--quiet",
            ]
        )
        == 0
    )
    return {"raw": str(raw), "data": str(data)}


def _sandbox(tmp_path: Path, paths: Dict[str, str]) -> Path:
    """A working directory that looks like the repository, with the documented data paths
    (``data/demo``, ``data/new``) pointing to the tiny dataset."""
    for name in ("configs", "launchers", "benchmarks"):
        (tmp_path / name).symlink_to(REPO / name)
    (tmp_path / "data").mkdir()
    for name in ("demo", "new"):
        (tmp_path / "data" / name).symlink_to(paths["data"])
    return tmp_path


def test_documents_have_commands() -> None:
    for document in DOCUMENTS:
        assert (REPO / document).exists(), f"{document} is missing"
        assert doc_commands(document), f"{document} has no ```bash command block"


def test_expand_optional_parts_and_alternatives() -> None:
    tokens = shlex.split("dtn-prepare --input R [--id-mapping vocab|hash] [--skip-bad] x=[1,2]")
    assert _expand(tokens) == [
        ("dtn-prepare", "--input", "R", "x=[1,2]"),
        ("dtn-prepare", "--input", "R", "--id-mapping", "vocab", "--skip-bad", "x=[1,2]"),
        ("dtn-prepare", "--input", "R", "--id-mapping", "hash", "--skip-bad", "x=[1,2]"),
    ]


# Parsing needs no files: the data placeholders stay names.
PARSE_PATHS = {"raw": "raw", "data": "data"}


def test_a_wrong_flag_or_key_is_caught() -> None:
    with pytest.raises(AssertionError, match="parser refused"):
        check_command(
            DocCommand("x:1", ("dtn-synth", "--output", "raw", "--rows", "3")), PARSE_PATHS
        )
    with pytest.raises(AssertionError, match="train.epoch"):
        check_command(
            DocCommand("x:2", ("dtn-train", "--config", "CFG", "train.epoch=2")), PARSE_PATHS
        )


@pytest.mark.parametrize("command", COMMANDS, ids=str)
def test_command_parses(command: DocCommand, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)
    check_command(command, PARSE_PATHS)


def _run_in_process(command: DocCommand, paths: Dict[str, str]) -> int:
    argv = resolve_argv(command.argv, paths)
    argv = [TINY_ARGS.get(prev, token) for prev, token in zip([""] + argv, argv)]
    module_name, _, function = _console_scripts()[argv[0]].partition(":")
    main = getattr(importlib.import_module(module_name), function)
    return main(argv[1:])


@pytest.mark.parametrize("command", [c for c in COMMANDS if c.program in RUN_FAST], ids=str)
def test_data_command_runs(
    command: DocCommand, tiny: Dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(_sandbox(tmp_path, tiny))
    # Outputs go to fresh directories; dtn-prepare reads the tiny raw set.
    paths = dict(tiny, data=str(tmp_path / "prepared"))
    if command.program == "dtn-synth":
        paths["raw"] = str(tmp_path / "synthesised")
    assert _run_in_process(command, paths) == 0


@pytest.mark.slow
@pytest.mark.parametrize("command", [c for c in COMMANDS if c.program in RUN_SLOW], ids=str)
def test_planning_command_runs(
    command: DocCommand, tiny: Dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(_sandbox(tmp_path, tiny))
    expected = 1 if "exit 1" in command.note else 0
    assert _run_in_process(command, tiny) == expected


WORKER_COMMANDS = ("dtn-train", "dtn-predict", "dtn-analyze")


@pytest.mark.slow
@pytest.mark.parametrize("document", DOCUMENTS)
def test_train_predict_analyze_chain_runs(
    document: str, tiny: Dict[str, str], tmp_path: Path
) -> None:
    """The document's dtn-train, dtn-predict and dtn-analyze lines, in order, as separate
    processes on the tiny dataset (each rank command ends its process through ``os._exit``)."""
    sandbox = _sandbox(tmp_path, tiny)
    # One variant per line (the minimal one): the variants of a line write the same outputs.
    first_variant = {c.where: c for c in reversed(doc_commands(document))}
    chain = [c for c in reversed(first_variant.values()) if c.program in WORKER_COMMANDS]
    assert chain, f"{document} shows no dtn-train / dtn-predict / dtn-analyze line"
    bin_dir = Path(sys.executable).parent
    for command in chain:
        argv = resolve_argv(command.argv, tiny)
        result = subprocess.run(
            [str(bin_dir / argv[0]), *argv[1:]],
            cwd=sandbox,
            capture_output=True,
            text=True,
            timeout=600,
        )
        reason = " | ".join(result.stderr.strip().splitlines()[-3:])
        assert result.returncode == 0, f"{command}: exit {result.returncode}: {reason}"
