"""`matsearch app`: serve the search page with `streamlit run app/streamlit_app.py`, headless, on a port.

    matsearch app                                     # the Fashion-MNIST train index (built on first start)
    matsearch app --limit 5000 --port 8600            # a quick demo: only the first 5000 training images
    matsearch app --index indexes/products --model runs/products/model
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
from pathlib import Path

from .settings import add_app_arguments, resolve, to_argv

SCRIPT = Path(__file__).with_name("streamlit_app.py")
DEFAULT_PORT = 8501
DISCONNECTED_SESSION_TTL_S = 15  # long enough to survive a network blip


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_app_arguments(parser)
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port to serve on (default {DEFAULT_PORT})")
    parser.add_argument("--host", default="localhost",
                        help="address to listen on (default localhost; 0.0.0.0 for every interface)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")


def streamlit_command(args: argparse.Namespace) -> list[str]:
    """The `streamlit run` command line for parsed `matsearch app` arguments."""
    values = {key: getattr(args, key, None) for key in
              ("index", "model", "eval_json", "limit", "device", "max_upload_mb", "max_pixels", "max_files")}
    settings = resolve(values)  # fail here, with one line, on a bad value
    # Streamlit's own upload cap sits well above the page's, so the page can say what is wrong with a big file
    server_cap_mb = max(1, int(settings.max_upload_bytes / 2 ** 20 * 4) + 1)
    return [sys.executable, "-m", "streamlit", "run", str(SCRIPT),
            "--server.headless=true",
            f"--server.port={args.port}",
            f"--server.address={args.host}",
            f"--server.maxUploadSize={server_cap_mb}",
            "--server.fileWatcherType=none",
            "--server.runOnSave=false",
            "--browser.gatherUsageStats=false",
            "--client.toolbarMode=minimal",
            # a closed browser tab's session (its uploads, images, state) goes after this, not Streamlit's 2 min
            f"--server.disconnectedSessionTTL={DISCONNECTED_SESSION_TTL_S}",
            "--", *to_argv(values)]


def run(args: argparse.Namespace) -> int:
    if args.port is not None and not 0 < args.port < 65536:
        raise ValueError(f"--port must be in 1..65535, got {args.port}")
    command = streamlit_command(args)
    print(f"matsearch app: serving on http://{args.host}:{args.port}  (Ctrl-C stops it)", flush=True)
    # every session runs in its own thread: glibc's per-thread malloc arenas would keep what ten sessions once
    # used; two arenas hand freed memory back
    env = {"MALLOC_ARENA_MAX": "2", **os.environ}
    process = subprocess.Popen(command, env=env)

    def stop(signum, frame):  # `kill` of this launcher stops the server too, not just the launcher
        process.send_signal(signal.SIGTERM)

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        return process.wait()
    except KeyboardInterrupt:
        process.send_signal(signal.SIGINT)
        try:
            return process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            return process.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if process.poll() is None:  # e.g. an exception in this process: never leave the server behind
            process.kill()
            process.wait()
