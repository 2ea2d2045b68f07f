"""`lora-studio ui`: serve the web UI (loopback only unless --host says otherwise)."""

from __future__ import annotations

import argparse
import logging
import os

from ..errors import ConfigError
from . import add_remote_code_flag, add_threads_flag
from .options import add_exposure_options, command

log = logging.getLogger(__name__)

UI_AUTH_ENV = "LORA_STUDIO_UI_AUTH"


def register(sub: argparse._SubParsersAction) -> None:
    p = command(sub, "ui", run_ui)
    add_exposure_options(
        p,
        port=7860,
        secret="auth",
        secret_help=f"require this USER:PASSWORD login for every page (visible in ps: prefer --auth-file "
        f"or ${UI_AUTH_ENV}, used when neither option is given)",
        file_help="read USER:PASSWORD from this file",
        exposed="anyone who connects can train and download",
    )
    p.add_argument(
        "--max-upload-mb",
        type=float,
        default=None,
        help="largest data file a user may upload, in MB (default: 200)",
    )
    add_threads_flag(p, "the UI's chat")
    add_remote_code_flag(p)


def parse_auth(value: str | None) -> tuple[str, str] | None:
    if value is None:
        return None
    user, sep, password = value.partition(":")
    if not sep or not user or not password:  # the value is a secret: never echo it
        raise ConfigError("the UI login: expected USER:PASSWORD with both parts non-empty")
    return user, password


def run_ui(args: argparse.Namespace) -> int:
    """Start the web UI (train, watch, chat, compare, export in a browser).

    Start the LoRA Studio web UI. It binds 127.0.0.1 unless --host is given; another --host needs a
    login (--auth-file, $LORA_STUDIO_UI_AUTH or --auth)."""
    from ..access import read_secret, require_auth_beyond_loopback

    auth = parse_auth(read_secret(args.auth, args.auth_file, UI_AUTH_ENV, "--auth"))
    if not 0 < args.port < 65536:
        raise ConfigError(f"--port: expected a port number from 1 to 65535, got {args.port}")
    if args.max_upload_mb is not None and args.max_upload_mb <= 0:
        raise ConfigError(f"--max-upload-mb: expected a positive size, got {args.max_upload_mb}")
    require_auth_beyond_loopback(
        args.host,
        has_auth=auth is not None,
        insecure=args.insecure_no_auth,
        what="the web UI (training, files, downloads)",
        secret="login",
        how=f"--auth-file FILE (USER:PASSWORD) or ${UI_AUTH_ENV}",
    )
    from ..home import studio_home
    from ..threads import set_label

    set_label("the UI's chat")  # how a job training under the same studio home names it

    # Before gradio is imported: its uploads go under the studio's folder, and it phones no one.
    os.environ.setdefault("GRADIO_TEMP_DIR", str(studio_home() / "gradio"))
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    from ui.app import build_app, launch
    from ui.uploads import DEFAULT_MAX_UPLOAD_MB

    max_mb = args.max_upload_mb or DEFAULT_MAX_UPLOAD_MB
    app = build_app(max_upload_mb=max_mb, host=args.host)
    launch(app, host=args.host, port=args.port, auth=auth, max_upload_mb=max_mb)
    return 0
