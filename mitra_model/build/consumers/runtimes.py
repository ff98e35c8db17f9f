"""The consumer runtimes on this machine: Node.js, the pinned npm packages, Chromium; and where the
JS side lives.

The JS side (node-check.mjs, browser-check.mjs, browser/, lib/, package.json, package-lock.json) is
package data, `mitra_model/data/consumers` (in a checkout a symlink to `consumers/`). Where it runs,
CONSUMERS_DIR, is decided here and nowhere else:
- from a checkout (an editable install, or the source tree itself): `consumers/` in place, as the
  README's `cd consumers && node ...` expects;
- from an installed wheel, whose site-packages must stay untouched: a copy in the user's cache,
  `$XDG_CACHE_HOME/mitra-build/consumers-<digest of the packaged JS files>` (~/.cache by default),
  made by `ensure_node_modules`. The digest covers every packaged file, so an upgrade that changes
  any of them gets a fresh folder instead of stale scripts beside old node_modules.

The JS packages are pinned in `package-lock.json`; `ensure_node_modules` installs them with
`npm ci` and `ONNXRUNTIME_NODE_INSTALL=skip`: onnxruntime-node's install script otherwise tries to
download CUDA binaries; the CPU binaries ship in the package.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shlex
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from importlib.resources import files
from importlib.resources.abc import Traversable
from pathlib import Path

from mitra_model.build.config import ConsumerRuntime
from mitra_model.errors import ConfigError, OutputError

PACKAGED_JS: Traversable = files("mitra_model") / "data" / "consumers"
NODE_MODULES = "node_modules"


def _packaged_files(folder: Traversable = PACKAGED_JS, prefix: str = "") -> Iterator[tuple[str, Traversable]]:
    """(relative name, file) of every packaged JS-side file; a checkout's node_modules is not one."""
    for entry in sorted(folder.iterdir(), key=lambda e: e.name):
        if entry.name == NODE_MODULES or entry.name.startswith("."):
            continue
        if entry.is_dir():
            yield from _packaged_files(entry, f"{prefix}{entry.name}/")
        else:
            yield f"{prefix}{entry.name}", entry


def _runs_from_checkout() -> bool:
    """True in a source tree (an editable install, PYTHONPATH, `python -m` in the checkout), where
    data/consumers is the symlink to the checkout's consumers/; False for an installed wheel, which
    holds the files themselves. (Install metadata cannot tell: a checkout's own mitra_build.egg-info
    shadows the editable install's dist-info when Python runs from the checkout's root.)"""
    return Path(str(PACKAGED_JS)).is_symlink()


def _cache_dir() -> Path:
    """Where an installed wheel's JS side runs: a writable per-user cache keyed by the files' digest."""
    digest = hashlib.sha256()
    for name, entry in _packaged_files():
        digest.update(name.encode() + b"\0" + entry.read_bytes() + b"\0")
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return root / "mitra-build" / f"consumers-{digest.hexdigest()[:16]}"


def _consumers_dir() -> Path:
    if _runs_from_checkout():
        return Path(str(PACKAGED_JS)).resolve()  # the checkout's consumers/ (data/consumers links to it)
    return _cache_dir()


CONSUMERS_DIR = _consumers_dir()
NODE_CHECK_SCRIPT = CONSUMERS_DIR / "node-check.mjs"
BROWSER_CHECK_SCRIPT = CONSUMERS_DIR / "browser-check.mjs"
BROWSER_PAGE_DIR = CONSUMERS_DIR / "browser"  # index.html + check.mjs
JS_LIB_DIR = CONSUMERS_DIR / "lib"  # fixture.mjs, imported by the node script and the page
NODE_MODULES_DIR = CONSUMERS_DIR / NODE_MODULES

NODE_RUNTIME: ConsumerRuntime = "onnxruntime-node"
WEB_RUNTIME: ConsumerRuntime = "onnxruntime-web"
WEB_RUNTIME_DIST = NODE_MODULES_DIR / WEB_RUNTIME / "dist"  # what the page imports, and its .wasm

NPM_CI_COMMAND = f"cd {shlex.quote(str(CONSUMERS_DIR))} && ONNXRUNTIME_NODE_INSTALL=skip npm ci"
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
    return json.loads((PACKAGED_JS / "package.json").read_text(encoding="utf-8"))["dependencies"]


def _materialize_js() -> None:
    """Copy the packaged JS files into CONSUMERS_DIR when it is a cache folder that lacks them.

    The copy is made in a sibling temp folder and renamed into place, so a concurrent or interrupted
    run never leaves a half-copied folder behind the final name.
    """
    if CONSUMERS_DIR.is_dir():
        return  # the checkout's consumers/, or a complete copy (its name is the digest of its files)
    CONSUMERS_DIR.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".consumers-", dir=CONSUMERS_DIR.parent))
    try:
        for name, entry in _packaged_files():
            target = staging / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(entry.read_bytes())
        try:
            staging.rename(CONSUMERS_DIR)
        except OSError:
            if not CONSUMERS_DIR.is_dir():  # lost a race to an identical copy: fine; anything else is not
                raise
    except OSError as exc:
        raise OutputError(f"cannot copy the consumer scripts into {CONSUMERS_DIR}: {exc.strerror or exc}; "
                          "set XDG_CACHE_HOME to a writable folder") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def package_version(package: str) -> str | None:
    """The version of `package` installed in CONSUMERS_DIR/node_modules, or None when it is not installed."""
    try:
        return json.loads((NODE_MODULES_DIR / package / "package.json").read_text(encoding="utf-8"))["version"]
    except (FileNotFoundError, KeyError, json.JSONDecodeError):
        return None


def ensure_node_modules(*, timeout_s: float = 600) -> Path:
    """Make CONSUMERS_DIR/node_modules hold exactly the pinned packages; run `npm ci` when it does not.

    From an installed wheel this first copies the packaged JS files into CONSUMERS_DIR (a cache folder).

    Args:
        timeout_s: how long `npm ci` may take.

    Returns:
        The node_modules folder.

    Raises:
        ConfigError: node or npm is missing, or `npm ci` failed (its output's tail is in the message).
    """
    find_node()
    _materialize_js()
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
