"""The README's commands exist and CI runs exactly the README's test command."""

from __future__ import annotations

import re

from mitra_model.cli import build_parser
from mitra_model.config import REPO_ROOT

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
