"""Secrets never leave: a hub that echoes the Authorization header in its error answers gets the
token redacted everywhere we write (messages, logs, the CLI's stderr, Prefect's database), whichever
way the token was supplied, and the 401 message says truthfully whether a token was sent."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import huggingface_hub
import pytest
from local_hub import LocalHub

from mitra_model.build.hub import resolve_revision
from mitra_model.errors import HubAuthError, HubUnreachableError

REPO = "acme/secret-mitra"
TOKEN = "hf_secretSECRETsecret9999"
FAST = {"retry_delay_s": 0.01, "timeout_s": 5.0, "max_attempts": 3}


@pytest.fixture(autouse=True)
def _hermetic(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)


@pytest.fixture()
def echoing_hub(local_hub: LocalHub) -> LocalHub:
    local_hub.add_commit(REPO, {"config.json": b"{}", "model.safetensors": b"x" * 64})
    local_hub.require_token(REPO, "hf_theRIGHTone0000")
    local_hub.echo_authorization = True
    return local_hub


def _supply(how: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> str | None:
    if how == "environment":
        monkeypatch.setenv("HF_TOKEN", TOKEN)
        return None
    if how == "saved login":
        (tmp_path / "login").write_text(TOKEN)
        monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "login"))
        return None
    return TOKEN


@pytest.mark.parametrize("how", ["parameter", "environment", "saved login"])
def test_a_refused_token_is_redacted_and_reported_as_sent(echoing_hub: LocalHub, how: str, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    token = _supply(how, monkeypatch, tmp_path)
    with caplog.at_level(logging.INFO), pytest.raises(HubAuthError) as info:
        resolve_revision(REPO, endpoint=echoing_hub.endpoint, token=token, **FAST)
    message = str(info.value)
    assert TOKEN not in message and "<token>" in message  # the echo was there, and redacted
    assert "was refused" in message and "no token was sent" not in message
    assert info.value.__cause__ is None and info.value.__suppress_context__  # no unredacted original chained
    assert TOKEN not in caplog.text


def test_no_token_says_none_was_sent(echoing_hub: LocalHub) -> None:
    with pytest.raises(HubAuthError, match="no token was sent"):
        resolve_revision(REPO, endpoint=echoing_hub.endpoint, **FAST)


def test_retry_warnings_and_the_5xx_error_are_redacted(echoing_hub: LocalHub, monkeypatch: pytest.MonkeyPatch,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    echoing_hub.fail_next(5, status=500)
    with caplog.at_level(logging.WARNING), pytest.raises(HubUnreachableError) as info:
        resolve_revision(REPO, endpoint=echoing_hub.endpoint, **FAST)
    assert "retry" in caplog.text and TOKEN not in caplog.text
    assert TOKEN not in str(info.value)


def test_the_token_reaches_no_stderr_no_log_and_not_prefects_database(echoing_hub: LocalHub, tmp_path: Path) -> None:
    """The whole CLI run, with its own Prefect home: stderr, stdout and every file Prefect wrote."""
    home = tmp_path / "prefect-home"
    env = {**os.environ, "HF_TOKEN": TOKEN, "PREFECT_HOME": str(home), "HF_HUB_OFFLINE": "0",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1"}
    config = tmp_path / "config.toml"
    from configs import write_config

    write_config(config, variants=[{"name": "secret", "repo_id": REPO, "task": "classification"}])
    done = subprocess.run(
        [sys.executable, "-m", "mitra_model.cli", "run", "--config", str(config), "--hub-endpoint", echoing_hub.endpoint,
         "--artifacts", str(tmp_path / "artifacts"), "--no-publish"],
        capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path,
    )
    assert done.returncode == 2, done.stdout + done.stderr
    assert "refused" in done.stderr and "<token>" in done.stderr
    assert TOKEN not in done.stdout + done.stderr
    written = [p for p in home.rglob("*") if p.is_file()]
    assert any(p.suffix == ".db" for p in written), written  # the run did go through Prefect's database
    for path in written:
        assert TOKEN.encode() not in path.read_bytes(), path
