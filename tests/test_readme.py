"""Every command line in the README's code blocks parses with the real parser (parsed only, nothing runs), so the
documentation and the command line cannot drift apart: `featstore ...` and `python tools/...`, with each optional
`[--flag VALUE]` group, and each `#   --flag VALUE | VALUE` line of the flag list under the extract command."""
from __future__ import annotations

import re
import shlex
from functools import cache
from pathlib import Path

import pytest
from conftest import load_tool

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"

# README placeholders -> a value of the right kind (an int flag refuses "N"); kept small on purpose: a new placeholder
# in the README fails here until it is named
PLACEHOLDERS = {"N": "2", "K": "2", "S": "448", "K/N": "0/2", "NAME": "none", "PATH": "weights.pth", "JSON": "{}",
                "ADDRESS": "tcp://127.0.0.1:8786", "F": "dinov2_q_last", "DIR": "out", "ROOT": "data"}
# `...` stands for "the flags shown above"; these are the ones a command needs before anything else parses
REQUIRED = {("featstore", "extract"): ["--data_dir", "DIR", "--output_dir", "store.zarr"]}


def bash_blocks(text: str) -> list[str]:
    return re.findall(r"^```bash\n(.*?)^```", text, flags=re.MULTILINE | re.DOTALL)


def variants(line: str) -> list[str]:
    """The line without its optional `[...]` groups, with each alternative of each group alone, and with every group
    (first alternatives) at once."""
    groups = re.findall(r"\[([^\[\]]+)\]", line)
    base = re.sub(r"\s*\[[^\[\]]+\]", "", line)
    out = [base]
    for g in groups:
        out += [f"{base} {alt.strip()}" for alt in g.split(" | ")]
    if len(groups) > 1:
        out.append(f"{base} {' '.join(g.split(' | ')[0] for g in groups)}")
    return out


def commands(text: str) -> list[tuple[str, ...]]:
    """(program, args...) of every `featstore ...` / `python tools/X.py ...` in the bash blocks: backslash continuations
    joined, comments dropped, `cmd1 && cmd2` split, a launcher prefix (`torchrun ... featstore ...`) skipped."""
    found = []
    for block in bash_blocks(text):
        for line in block.replace("\\\n", " ").splitlines():
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            for variant in variants(line):
                lex = shlex.shlex(variant, posix=True, punctuation_chars=True)
                lex.whitespace_split, lex.commenters = True, "#"
                segment: list[str] = []
                for tok in [*lex, ";"]:
                    if tok not in ("&&", "||", ";", "|", "&"):
                        segment.append(tok)
                        continue
                    cmd = program(segment)
                    if cmd and cmd not in found:
                        found.append(cmd)
                    segment = []
    return found


def program(tokens: list[str]) -> tuple[str, ...] | None:
    for i, tok in enumerate(tokens):
        if tok == "featstore":
            return ("featstore", *tokens[i + 1:])
        if tok == "python" and i + 1 < len(tokens) and tokens[i + 1].startswith("tools/"):
            return (tokens[i + 1], *tokens[i + 2:])
    return None


def flag_lines(text: str) -> list[tuple[tuple[str, ...], str, str | None]]:
    """(command, flag, value) for each `#   --flag V1 | V2` line under a command in a bash block (value None: a switch)."""
    out = []
    for block in bash_blocks(text):
        cmd = None
        for line in block.replace("\\\n", " ").splitlines():
            s = line.strip()
            if not s.startswith("#"):
                found = commands(f"```bash\n{line}\n```")
                cmd = found[0] if found else cmd
                continue
            spec = re.split(r"\s{2,}", s.lstrip("#").strip())[0]
            if not spec.startswith("--") or cmd is None:
                continue
            flag = None
            for part in re.split(r"\s+\|\s+", spec):
                words = part.split()
                if words[0].startswith("--"):
                    flag, words = words[0], words[1:]
                    if not words:
                        out.append((cmd, flag, None))
                for word in words:
                    out += [(cmd, flag, v) for v in word.split("|")]
    return out


@cache
def parser(prog: str):
    if prog == "featstore":
        from featstore.cli import build_parser

        return build_parser()
    return load_tool(Path(prog).stem).build_parser()  # the tools run nothing on import (their work is under __main__)


NEGATED = {"--no_fsync": "durable", "--no_cache": "cache", "--no_plots": "plots", "--no_save": "save"}


def parse(cmd: tuple[str, ...], capsys):
    args = [PLACEHOLDERS.get(a, a) for a in cmd[1:]]
    if "..." in args:
        args.remove("...")
        need = REQUIRED.get(cmd[:2], [])
        for flag, value in zip(need[::2], need[1::2]):
            if flag not in args:
                args[1:1] = [flag, value]
    try:
        return parser(cmd[0]).parse_args(args)
    except SystemExit as e:
        pytest.fail(f"README command line `{shlex.join(cmd)}` does not parse (exit {e.code}): {capsys.readouterr().err}")


TEXT = README.read_text()
COMMANDS = commands(TEXT)
FLAGS = flag_lines(TEXT)


def test_the_readme_commands_are_found():
    """The collection itself works: the quick start, the extract line with its flag list, and the tools."""
    progs = {c[0] if c[0] != "featstore" else f"featstore {c[1]}" for c in COMMANDS}
    assert {"featstore demo", "featstore extract", "featstore export-npy", "featstore info", "featstore verify",
            "featstore stats", "featstore sample", "tools/train_encoder.py", "tools/benchmark.py"} <= progs, progs
    assert ("featstore", "demo", "--dir", "out") in [tuple(PLACEHOLDERS.get(a, a) for a in c) for c in COMMANDS]
    assert {f for _, f, _ in FLAGS} >= {"--enc_layer", "--backbone", "--codec", "--shard", "--dry_run"}
    assert ("--enc_layer", "-1,-4,6") in [(f, v) for _, f, v in FLAGS]


@pytest.mark.parametrize("cmd", COMMANDS, ids=[shlex.join(c)[:90] for c in COMMANDS])
def test_readme_command_line_parses(cmd, capsys):
    parse(cmd, capsys)


@pytest.mark.parametrize("cmd,flag,value", FLAGS, ids=[f"{f} {v}" if v else f for _, f, v in FLAGS])
def test_readme_flag_list_parses_and_gives_the_value(cmd, flag, value, capsys):
    """`--enc_layer -1,-4,6` (a value that starts with '-') is the value, not an unknown flag."""
    ns = parse((*cmd, flag) if value is None else (*cmd, flag, value), capsys)
    if flag in NEGATED:  # a flag that turns a setting off: --no_fsync sets durable=False
        assert getattr(ns, NEGATED[flag]) is False, (flag, ns)
        return
    got = getattr(ns, flag[2:].replace("-", "_"))
    assert got is True if value is None else str(got) == PLACEHOLDERS.get(value, value), (flag, value, got)


@pytest.mark.parametrize("spelling", [["--enc_layer", "-1,-4,6"], ["--enc-layer", "-1,-4,6"], ["--enc_layer=-1,-4,6"]])
def test_enc_layer_list_starting_with_a_negative_number(spelling, capsys):
    from featstore.cli import build_parser

    base = ["extract", "--data_dir", "d", "--output_dir", "o"]
    assert build_parser().parse_args([*base, *spelling]).enc_layer == "-1,-4,6"
    assert build_parser().parse_args([*base, "--enc_layer", "-4:", "--dry_run"]).enc_layer == "-4:"
    assert parser("tools/extract_features_new.py").parse_args(base[1:] + spelling).enc_layer == "-1,-4,6"


def test_a_missing_enc_layer_value_is_still_an_error(capsys):
    """Only values that start with a number are joined: `--enc_layer --dry_run` stays a missing value."""
    from featstore.cli import build_parser

    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["extract", "--data_dir", "d", "--output_dir", "o", "--enc_layer", "--dry_run"])
    assert e.value.code == 2
    assert "argument --enc_layer: expected one argument" in capsys.readouterr().err
