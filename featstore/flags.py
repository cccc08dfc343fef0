"""featstore's command-line parsers: flags built from the config dataclasses (name, default, help text), both
spellings of every flag (--data_dir and --data-dir), values that start with a negative number (--enc_layer -1,-4,6),
and one-line usage errors. Only argparse's public API is used."""
from __future__ import annotations

import argparse
import dataclasses
import re
import sys
import textwrap
from typing import Any

WIDTH = 100


def flag(default: Any, help: str, **extra: Any) -> Any:
    """A configuration field that is also a command-line flag: `help` is its --help text; `extra` goes to
    argparse (choices, metavar, type) or names the flag differently (`flag="no_fsync"`, `negate=True`)."""
    return dataclasses.field(default=default, metadata={"help": help, **extra})


class ArgumentParser(argparse.ArgumentParser):
    """An argparse parser whose flags answer to `-` for `_` (the hyphenated spelling is rewritten before parsing:
    featstore's flags are all spelled with underscores), whose help shows each flag's default, and whose usage
    mistakes are one line (`PROG: error: ...`, exit 2) instead of the usage block."""

    def __init__(self, *args: Any, **kwargs: Any):
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        if kwargs.get("description"):
            kwargs["description"] = wrap(kwargs["description"])
        super().__init__(*args, **kwargs)
        self.negative_number_options: set[str] = set()

    def add_argument(self, *names: str, negative_numbers: bool = False, **kwargs: Any):
        """`negative_numbers`: the value may start with a negative number (`--enc_layer -1,-4,6`, `-4:`), which
        argparse alone reads as an unknown flag unless it is a single number."""
        kwargs["help"] = with_default(kwargs.get("help"), kwargs.get("default"), kwargs.get("action"))
        action = super().add_argument(*names, **kwargs)
        if negative_numbers:
            self.negative_number_options.update(action.option_strings)
        return action

    def parse_known_args(self, args=None, namespace=None):
        args = sys.argv[1:] if args is None else list(args)
        return super().parse_known_args(_join_negative_values(_underscored(args), self.negative_number_options),
                                        namespace)

    def error(self, message: str):
        self.exit(2, f"{self.prog.split()[0]}: error: {message} (see: {self.prog} --help)\n")


def wrap(text: str) -> str:
    """Paragraphs re-wrapped to WIDTH; a paragraph with indented lines (a list of examples) kept as written."""
    out = []
    for para in text.split("\n\n"):
        lines = para.splitlines()
        keep = any(line.startswith(" ") for line in lines[1:])
        out.append(para if keep else textwrap.fill(" ".join(line.strip() for line in lines), WIDTH,
                                                   break_on_hyphens=False, break_long_words=False))
    return "\n\n".join(out)


def with_default(text: str | None, default: Any, action: Any = None) -> str | None:
    """`text (default: X)` where the default says something (not None/False, not a store_true flag, not already
    in the text)."""
    if text is None or default is None or default is False or action in ("store_true", "store_false"):
        return text
    if "default" in text.lower() or default == argparse.SUPPRESS:
        return text
    return f"{text} (default: {default})"


def add_config_args(parser: argparse.ArgumentParser | Any, cls: type, exclude: tuple[str, ...] = ()) -> None:
    """One flag per field of the dataclass `cls` that carries a help text (`metadata["help"]`): `--name` with the
    field's default and a type from its default (or annotation). Metadata may rename the flag (`flag`), invert a
    bool (`negate`: `durable` -> `--no_fsync`), or pass argparse options (`choices`, `metavar`, `type`,
    `negative_numbers`)."""
    for f in dataclasses.fields(cls):
        meta = dict(f.metadata)
        if "help" not in meta or f.name in exclude:
            continue
        name = meta.pop("flag", f.name)
        negate = meta.pop("negate", False)
        kwargs: dict[str, Any] = {"help": meta.pop("help"), "dest": f.name}
        if isinstance(f.default, bool):
            kwargs["action"] = "store_false" if negate else "store_true"
            kwargs["default"] = f.default
        else:
            kwargs["default"] = f.default
            kwargs["type"] = meta.pop("type", None) or _type_of(f)
        kwargs.update(meta)
        parser.add_argument(f"--{name}", **kwargs)


def config_from_args(cls: type, args: argparse.Namespace, **overrides: Any) -> Any:
    """The dataclass `cls` from the parsed flags that add_config_args made, plus `overrides`."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if "help" in f.metadata and
              hasattr(args, f.name)}
    return cls(**{**values, **overrides})


def _type_of(f: dataclasses.Field) -> Any:
    if f.default is not None and not isinstance(f.default, str):
        return type(f.default)
    annotation = str(f.type)
    for name, t in (("int", int), ("float", float)):
        if re.fullmatch(rf"{name}( \| None)?", annotation):
            return t
    return str


def _underscored(args: list[str]) -> list[str]:
    """`--data-dir[=V]` -> `--data_dir[=V]` for every flag before a bare `--`; values are never touched."""
    out = []
    for i, a in enumerate(args):
        if a == "--":
            return out + args[i:]
        if a.startswith("--") and len(a) > 2:
            name, eq, value = a.partition("=")
            a = name.replace("-", "_").replace("__", "--", 1) + eq + value
        out.append(a)
    return out


def _join_negative_values(args: list[str], options: set[str]) -> list[str]:
    """`--opt -1,-4,6` -> `--opt=-1,-4,6` for the options that take negative numbers (the spelling argparse itself
    reads as one value); a flag after the option (`--opt --device`) is left alone, so a missing value stays an error."""
    out, i = [], 0
    while i < len(args):
        a = args[i]
        if a == "--":
            return out + args[i:]
        if a in options and i + 1 < len(args) and re.match(r"-[\d.,:]", args[i + 1]):
            out.append(f"{a}={args[i + 1]}")
            i += 2
        else:
            out.append(a)
            i += 1
    return out
