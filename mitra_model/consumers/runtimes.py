"""The consumer runtimes on this machine: Node.js, the pinned npm packages, Chromium; and where the
JS side lives.

The JS side (`consumers/` at the repository root: node-check.mjs, browser-check.mjs, browser/,
lib/fixture.mjs, package.json) is found from REPO_ROOT here and nowhere else.

The JS packages are pinned in `consumers/package-lock.json`; `ensure_node_modules` installs them with
`npm ci` and `ONNXRUNTIME_NODE_INSTALL=skip`: onnxruntime-node's install script otherwise tries to
download CUDA binaries; the CPU binaries ship in the package.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
from pathlib import Path

from ..config import REPO_ROOT, ConsumerRuntime
from ..errors import ConfigError

CONSUMERS_DIR = REPO_ROOT / "consumers"
NODE_CHECK_SCRIPT = CONSUMERS_DIR / "node-check.mjs"
BROWSER_CHECK_SCRIPT = CONSUMERS_DIR / "browser-check.mjs"
BROWSER_PAGE_DIR = CONSUMERS_DIR / "browser"  # index.html + check.mjs
JS_LIB_DIR = CONSUMERS_DIR / "lib"  # fixture.mjs, imported by the node script and the page
NODE_MODULES_DIR = CONSUMERS_DIR / "node_modules"

NODE_RUNTIME: ConsumerRuntime = "onnxruntime-node"
WEB_RUNTIME: ConsumerRuntime = "onnxruntime-web"
WEB_RUNTIME_DIST = NODE_MODULES_DIR / WEB_RUNTIME / "dist"  # what the page imports, and its .wasm

NPM_CI_COMMAND = "cd consumers && ONNXRUNTIME_NODE_INSTALL=skip npm ci"
CHROMIUM_INSTALL_COMMAND = "apt-get update && apt-get install -y chromium"
NODE_HINT = "install Node.js 20 or newer with npm (Debian 12's own `nodejs` package is 18: too old for playwright-core and @aws-sdk/client-s3)"
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
MIN_NODE_MAJOR = 20  # consumers/package.json "engines"; playwright-core and @aws-sdk/client-s3 need it


def find_node() -> Path:
    """The `node` executable on PATH.

    Returns:
        Its path.

    Raises:
        ConfigError: no `node`, or one older than MIN_NODE_MAJOR; the message says what to install.
    """
    found = shutil.which("node")
    if found is None:
        raise ConfigError(f"Node.js is not installed (no `node` on PATH): {NODE_HINT}")
    version = node_version(Path(found))
    if int(version.lstrip("v").split(".")[0]) < MIN_NODE_MAJOR:
        raise ConfigError(f"{found} is Node.js {version}; the consumer checks need Node.js >= {MIN_NODE_MAJOR}: {NODE_HINT}")
    return Path(found)


@functools.cache
def node_version(node: Path) -> str:
    """`node --version` of the executable `node`, e.g. "v20.20.2"."""
    return subprocess.run([str(node), "--version"], capture_output=True, text=True, timeout=30, check=True).stdout.strip()


def _pinned_dependencies() -> dict[str, str]:
    return json.loads((CONSUMERS_DIR / "package.json").read_text(encoding="utf-8"))["dependencies"]


def package_version(package: str) -> str | None:
    """The version of `package` installed in consumers/node_modules, or None when it is not installed."""
    try:
        return json.loads((NODE_MODULES_DIR / package / "package.json").read_text(encoding="utf-8"))["version"]
    except (FileNotFoundError, KeyError, json.JSONDecodeError):
        return None


def ensure_node_modules(*, timeout_s: float = 600) -> Path:
    """Make consumers/node_modules hold exactly the pinned packages; run `npm ci` when it does not.

    Args:
        timeout_s: how long `npm ci` may take.

    Returns:
        The node_modules folder.

    Raises:
        ConfigError: node or npm is missing, or `npm ci` failed (its output's tail is in the message).
    """
    find_node()
    pinned = _pinned_dependencies()
    if all(package_version(name) == version for name, version in pinned.items()):
        return NODE_MODULES_DIR
    npm = shutil.which("npm")
    if npm is None:
        raise ConfigError(f"npm is not installed: {NODE_HINT}; then run `{NPM_CI_COMMAND}`")
    env = {**os.environ, "ONNXRUNTIME_NODE_INSTALL": "skip", "npm_config_fund": "false", "npm_config_audit": "false"}
    try:
        done = subprocess.run(
            [npm, "ci", "--no-audit", "--no-fund"], cwd=CONSUMERS_DIR, env=env, capture_output=True, text=True,
            timeout=timeout_s,
        )
    except subprocess.TimeoutExpired:
        raise ConfigError(f"`{NPM_CI_COMMAND}` did not finish in {timeout_s:.0f} s; run it by hand to see why") from None
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-15:])
        raise ConfigError(f"`{NPM_CI_COMMAND}` failed (exit {done.returncode}):\n{tail}")
    missing = [f"{name}@{version}" for name, version in pinned.items() if package_version(name) != version]
    if missing:
        raise ConfigError(f"`npm ci` in {CONSUMERS_DIR} did not install {', '.join(missing)}: is package-lock.json in sync with package.json?")
    return NODE_MODULES_DIR


def find_chromium(explicit: Path | str | None = None) -> Path:
    """The Chromium executable.

    Args:
        explicit: use this file; default: the first of CHROMIUM_NAMES on PATH.

    Returns:
        Its path.

    Raises:
        ConfigError: `explicit` is not an executable file, or none was found on PATH; the message
            gives the Debian install command.
    """
    if explicit is not None:
        path = Path(explicit)
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise ConfigError(f"Chromium executable {path} does not exist or is not executable")
        return path
    for name in CHROMIUM_NAMES:
        if found := shutil.which(name):
            return Path(found)
    raise ConfigError(
        f"no Chromium found (looked for {', '.join(CHROMIUM_NAMES)} on PATH): install it with "
        f"`{CHROMIUM_INSTALL_COMMAND}` (Debian's package; no browser download is needed or used)"
    )
