"""The README's commands exist and CI runs exactly the README's test command."""

from __future__ import annotations

import argparse
import re
import shlex
from pathlib import Path

import pytest

from mitra_model.cli.main import build_parser

REPO_ROOT = Path(__file__).resolve().parents[1]  # the checkout (the library itself assumes none)
README = (REPO_ROOT / "README.md").read_text()


def test_the_two_commands_exist_and_ci_runs_the_test_command() -> None:
    assert "    ./scripts/demo.sh\n" in README and "    ./scripts/test.sh\n" in README
    for script in ("scripts/demo.sh", "scripts/test.sh", "scripts/setup.sh", "scripts/deploy.sh"):
        path = REPO_ROOT / script
        assert path.is_file() and path.stat().st_mode & 0o111, f"{script} missing or not executable"
    ci = (REPO_ROOT / ".ci" / "run").read_text()
    assert re.search(r"^\./scripts/test\.sh\s*$", ci, re.M), ".ci/run must run the README's test command"


def test_every_documented_cli_form_parses() -> None:
    parser = build_parser()
    forms = re.findall(r"^    mitra-build (\w+) (.*)$", README, re.M)
    assert {name for name, _ in forms} >= {"synth", "export", "verify", "run"}
    subcommands = parser._subparsers._group_actions[0].choices  # noqa: SLF001 - argparse has no public API
    for name, rest in forms:
        assert name in subcommands, f"README documents `mitra-build {name}`, the CLI lacks it"
        documented = set(re.findall(r"--[a-z][a-z0-9-]*", rest))
        known = {opt for action in subcommands[name]._actions for opt in action.option_strings}
        assert documented <= known, f"`mitra-build {name}` documents unknown options {documented - known}"


def test_config_is_accepted_before_and_after_the_subcommand(tmp_path) -> None:
    parser = build_parser()
    chosen = tmp_path / "other.toml"
    assert parser.parse_args(["run", "--config", str(chosen)]).config == chosen
    assert parser.parse_args(["--config", str(chosen), "run"]).config == chosen
    assert parser.parse_args(["run"]).config is None


def test_every_benchmark_result_the_readme_cites_is_committed() -> None:
    cited = set(re.findall(r"bench/(results-[\w-]+\.md)", README))
    assert cited, "the README cites no benchmark results"
    missing = sorted(name for name in cited if not (REPO_ROOT / "bench" / name).is_file())
    assert not missing, f"README cites benchmark results that are not in bench/: {missing}"


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    return build_parser()._subparsers._group_actions[0].choices  # noqa: SLF001 - argparse has no public API


@pytest.mark.parametrize("name", sorted(_subcommands()))
def test_every_subcommand_has_an_example_that_parses_and_help_on_every_option(name: str) -> None:
    command = _subcommands()[name]
    examples = re.findall(r"^  (mitra-build .*)$", command.epilog or "", re.M)
    assert examples, f"`mitra-build {name} --help` shows no example (argparse epilog)"
    assert isinstance(command.formatter_class, type) and issubclass(command.formatter_class, argparse.RawDescriptionHelpFormatter)
    for example in examples:
        argv = shlex.split(example, comments=True)[1:]
        assert argv[0] == name, f"an example of `{name}` runs another command: {example}"
        build_parser().parse_args(argv)  # exits (SystemExit) on an example that does not parse
    bare = [action.option_strings for action in command._actions if action.option_strings and not action.help]  # noqa: SLF001
    assert not bare, f"`mitra-build {name}` options without help text: {bare}"
    summary = {a.dest: a.help for a in build_parser()._subparsers._group_actions[0]._choices_actions}  # noqa: SLF001
    assert summary.get(name), f"`mitra-build {name}` has no one-line help in `mitra-build --help`"


def test_top_level_options_have_help() -> None:
    parser = build_parser()
    assert all(a.help for a in parser._actions if a.option_strings)  # noqa: SLF001


def _concrete(form: str) -> list[str]:
    """A README synopsis as one command line: first of each `a|b`, optional parts kept, placeholders filled."""
    form = re.sub(r"\s\|\s[^\]]*", "", form)  # `[--precision int8 | --fp32-only]`: keep the first option
    form = form.replace("[", "").replace("]", "")
    words = [word.split("|")[0] for word in shlex.split(form, comments=True)]
    return ["1" if word == "N" else word for word in words]


def test_every_documented_cli_line_parses() -> None:
    """Each `    mitra-build ...` line of the README parses as a whole (values, choices and all)."""
    lines = re.findall(r"^    (mitra-build [\w-]+ .*)$", README, re.M)
    assert len(lines) >= 8
    for line in lines:
        argv = _concrete(line)[1:]
        try:
            build_parser().parse_args(argv)
        except SystemExit:
            pytest.fail(f"README documents `{line}`, which the CLI does not parse (as {argv})")
