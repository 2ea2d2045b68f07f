"""Who may reach the API server and the UI: no key, no address beyond loopback (unless the operator
says --insecure-no-auth); keys and logins from a file or the environment, not only argv."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import httpx
import pytest
from test_serve import lora_studio_command

from lora_studio.access import is_loopback, read_secret
from lora_studio.cli import main
from lora_studio.errors import ConfigError
from lora_studio.serve.local import free_port

MISSING_BASE = "/no/such/base-model"  # the command fails when it loads it: after the access check


def serve(capsys, *args: str) -> str:
    """Run `lora-studio serve` with a base that cannot load; the error it stops at."""
    assert main(["serve", "--base", MISSING_BASE, *args]) == 2
    return capsys.readouterr().err


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "localhost", "::1", "[::1]"])
def test_loopback_addresses(host):
    assert is_loopback(host)


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.20", "10.0.0.1", "example.com"])
def test_addresses_other_machines_can_reach(host):
    assert not is_loopback(host)


def test_serve_beyond_loopback_without_a_key_is_refused_before_the_model_loads(capsys, monkeypatch):
    monkeypatch.delenv("LORA_STUDIO_API_KEY", raising=False)
    error = serve(capsys, "--host", "0.0.0.0")
    assert error.startswith("error: --host 0.0.0.0 lets other machines reach the model API")
    assert "--api-key-file" in error and "--insecure-no-auth" in error and MISSING_BASE not in error


def test_serve_beyond_loopback_goes_on_with_a_key_or_insecure_no_auth(capsys, monkeypatch, tmp_path):
    monkeypatch.delenv("LORA_STUDIO_API_KEY", raising=False)
    key_file = tmp_path / "key"
    key_file.write_text("s3cret-key\n")
    assert "lets other machines" not in serve(capsys, "--host", "0.0.0.0", "--api-key-file", str(key_file))
    assert "lets other machines" not in serve(capsys, "--host", "0.0.0.0", "--insecure-no-auth")
    monkeypatch.setenv("LORA_STUDIO_API_KEY", "from-env")
    assert "lets other machines" not in serve(capsys, "--host", "0.0.0.0")


def test_bad_key_files_are_one_line_errors_that_do_not_quote_the_file(capsys, tmp_path):
    empty, two_lines = tmp_path / "empty", tmp_path / "two"
    empty.write_text("\n")
    two_lines.write_text("key-one\nkey-two\n")
    assert "cannot read it" in serve(capsys, "--api-key-file", str(tmp_path / "missing"))
    assert "exactly one non-empty line" in serve(capsys, "--api-key-file", str(empty))
    error = serve(capsys, "--api-key-file", str(two_lines))
    assert "exactly one non-empty line" in error and "key-one" not in error
    assert "both given" in serve(capsys, "--api-key", "k", "--api-key-file", str(empty))


@pytest.mark.parametrize("bad", [["--max-body-mb", "0"], ["--max-queue", "-1"]])
def test_serve_checks_its_limits(capsys, bad):
    assert bad[0] in serve(capsys, *bad)


@pytest.mark.subprocess
def test_the_server_requires_the_key_from_its_key_file(tiny_model_dir, tmp_path):
    key_file = tmp_path / "key"
    key_file.write_text("key-from-a-file\n")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "LORA_STUDIO_API_KEY"}
    cmd = [*lora_studio_command(), "serve", "--base", str(tiny_model_dir), "--port", str(port)]
    log = tmp_path / "server.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([*cmd, "--api-key-file", str(key_file)], stdout=out, stderr=out, env=env)
    url = f"http://127.0.0.1:{port}/v1/models"
    try:
        deadline = time.time() + 120
        while True:
            assert proc.poll() is None and time.time() < deadline, log.read_text()[-2000:]
            try:
                status = httpx.get(url, timeout=2).status_code
                break
            except httpx.HTTPError:
                time.sleep(0.3)
        assert status == 401
        headers = {"Authorization": "Bearer key-from-a-file"}
        assert httpx.get(url, headers=headers, timeout=10).status_code == 200
    finally:
        proc.terminate()
        proc.wait(timeout=15)


# --- the UI ------------------------------------------------------------------------------------
@pytest.mark.subprocess
def test_ui_beyond_loopback_without_a_login_is_refused():
    # a subprocess with a timeout: were the check gone, the UI would start and never return
    env = {k: v for k, v in os.environ.items() if k != "LORA_STUDIO_UI_AUTH"}
    done = subprocess.run(
        [*lora_studio_command(), "ui", "--host", "0.0.0.0", "--port", str(free_port())],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.startswith("error: --host 0.0.0.0 lets other machines reach the web UI")
    assert all(word in done.stderr for word in ["--auth-file", "LORA_STUDIO_UI_AUTH", "--insecure-no-auth"])


def test_ui_login_from_a_file_or_the_environment(tmp_path, monkeypatch, capsys):
    from lora_studio.cli.ui import UI_AUTH_ENV, parse_auth

    monkeypatch.delenv(UI_AUTH_ENV, raising=False)
    login = tmp_path / "login"
    login.write_text("ann:pa55word\n")
    assert parse_auth(read_secret(None, str(login), UI_AUTH_ENV, "--auth")) == ("ann", "pa55word")
    monkeypatch.setenv(UI_AUTH_ENV, "bob:hunter2")
    assert parse_auth(read_secret(None, None, UI_AUTH_ENV, "--auth")) == ("bob", "hunter2")
    login.write_text("no-colon-here\n")
    assert main(["ui", "--auth-file", str(login)]) == 2
    assert "USER:PASSWORD" in (err := capsys.readouterr().err) and "no-colon-here" not in err


def test_read_secret_refuses_two_sources():
    with pytest.raises(ConfigError, match="both given"):
        read_secret("a", str(Path(__file__)), "UNUSED_ENV", "--auth")
