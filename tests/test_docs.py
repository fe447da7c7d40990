"""README.md in step with the command line: the "Every knob" table of section Deploying
names every flag of the services (`layervault coordinator|agent|up`) and of `layervault
ray up`, and every flag it names exists.

The table's columns are knob, default, meaning and `ray up`. A service flag counts as
documented where it is written (in backticks) in the first three; a `ray up` flag where it
is written in the `ray up` column (or the column says "the same flags": those of the row's
knob), or anywhere as `ray up --flag` / `ray ... --flag`.
"""

from __future__ import annotations

import argparse
import pathlib
import re

import pytest

from layervault.cli import build_parser

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
SERVICES = ("", "coordinator", "agent", "up")  # "": the top level, whose flags (--log-level) come before the service
RAY_UP = "ray up"
COLUMNS = ["knob", "default", "meaning", "`ray up`"]

# Flags the table leaves out on purpose, each with its reason.
NOT_IN_TABLE = {
    "--help",  # argparse's own, on every command
}

# `ray up --timeout`, `ray down --grace`, `ray ... --address` (every ray command) or a bare `--flag`.
FLAG = re.compile(r"(?:\bray (\w+|\.\.\.) [^`]*?)?(--[a-z][a-z0-9-]*)")


def _parsers() -> dict[str, argparse.ArgumentParser]:
    """Every command's parser by the words that name it: "" (the top level), "agent", "ray up", ..."""
    found: dict[str, argparse.ArgumentParser] = {}

    def walk(parser: argparse.ArgumentParser, words: tuple[str, ...]) -> None:
        found[" ".join(words)] = parser
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, child in action.choices.items():
                    walk(child, (*words, name))

    walk(build_parser(), ())
    return found


def _long_options(parser: argparse.ArgumentParser) -> set[str]:
    return {option for action in parser._actions for option in action.option_strings if option.startswith("--")}


def _knob_rows() -> list[list[str]]:
    """The cells of each row of the table that follows "Every knob" in section Deploying."""
    text = README.read_text()
    assert "\n### Deploying\n" in text, "README.md has no section Deploying"
    section = re.split(r"\n#{2,3} ", text.split("\n### Deploying\n", 1)[1], maxsplit=1)[0]
    assert "Every knob" in section, "section Deploying has no 'Every knob' table"
    lines = section.split("Every knob", 1)[1].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    table = [line for line in lines[start:] if line.strip()]
    table = table[:next((i for i, line in enumerate(table) if not line.startswith("|")), len(table))]
    header, separator, *body = ([cell.strip() for cell in line.strip().strip("|").split("|")] for line in table)
    assert header == COLUMNS and set("".join(separator)) <= set("-: ")
    for row in body:
        assert len(row) == len(COLUMNS), f"a row of {len(row)} cells (a '|' inside a cell?): {row}"
    return body


def _mentions() -> list[tuple[int, str, str, str]]:
    """(column, command, flag, row's first cell) for each flag in backticks in the table; command is
    "" for a bare flag, "ray X" for `ray X ... --flag`, "ray ..." for every ray command."""
    out = []
    for row in _knob_rows():
        for column, cell in enumerate(row):
            if column == 3 and cell.startswith("the same flags"):
                cell = row[0]  # `ray up` takes the knob's own flags
            for span in re.findall(r"`([^`]*)`", cell):
                for sub, flag in FLAG.findall(span):
                    out.append((column, f"ray {sub}" if sub else "", flag, row[0]))
    return out


@pytest.fixture(scope="module")
def parsers() -> dict[str, argparse.ArgumentParser]:
    return _parsers()


def test_the_knob_table_names_every_flag_of_the_services_and_ray_up(parsers):
    mentions = _mentions()
    in_service_columns = {flag for column, command, flag, _ in mentions if column < 3 and not command}
    for_ray_up = {flag for column, command, flag, _ in mentions
                  if command in (RAY_UP, "ray ...") or (column == 3 and not command)}

    missing = {f"layervault {name}".strip(): sorted(_long_options(parsers[name]) - NOT_IN_TABLE - in_service_columns)
               for name in SERVICES}
    missing[f"layervault {RAY_UP}"] = sorted(_long_options(parsers[RAY_UP]) - NOT_IN_TABLE - for_ray_up)
    missing = {name: flags for name, flags in missing.items() if flags}
    assert not missing, f"flags missing from README.md's knob table (section Deploying): {missing}"


def test_every_flag_the_knob_table_names_exists(parsers):
    service_flags = set().union(*(_long_options(parsers[name]) for name in SERVICES))
    ray_commands = [name for name in parsers if name.startswith("ray ")]
    wrong = []
    for column, command, flag, row in _mentions():
        if command == "ray ...":
            where = ray_commands
        elif command:
            where = [command] if command in parsers else []
        else:
            where = [RAY_UP] if column == 3 else None
        exists = (flag in service_flags if where is None
                  else bool(where) and all(flag in _long_options(parsers[name]) for name in where))
        if not exists:
            wrong.append(f"row {row}, column {COLUMNS[column]}: {command + ' ' if command else ''}{flag}")
    assert not wrong, "README.md's knob table names flags the CLI does not have:\n" + "\n".join(wrong)


def test_the_table_is_found_and_read():
    """Guards the two tests above against passing on an empty parse."""
    mentions = _mentions()
    assert len(_knob_rows()) >= 20
    assert (0, "", "--staging-mib", "`--staging-mib`") in mentions
    assert (3, "ray down", "--grace", "`--grace`") in mentions
    assert (0, "ray ...", "--address", "`ray ... --address` / `RAY_ADDRESS`") in mentions
    assert (3, "", "--tls-ca", "`--tls-cert`, `--tls-key`, `--tls-ca`") in mentions  # "the same flags"
