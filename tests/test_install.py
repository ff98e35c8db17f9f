"""mitra-build installs like a library: the wheel carries its data, and the installed CLI works from any
folder without reading or writing the checkout or site-packages.

The wheel is built from a copy of the checkout (`pip wheel --no-deps --no-build-isolation`: offline,
and no build/ folder in the checkout) and installed into a fresh venv outside it. That venv reuses the
toolchain already in this interpreter's site-packages through a .pth line (a .pth line adds a folder
but runs none of its .pth files, so the checkout's editable-install hook stays out): no download.
Every command runs under an audit hook that logs each file opened, created, renamed or removed.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path
from typing import Any

import pytest
from s3_fixtures import make_build

from mitra_model.release.publish import publish_build

pytestmark = pytest.mark.install

CHECKOUT = Path(__file__).resolve().parents[1]
TOOLCHAIN_SITE = Path(sysconfig.get_paths()["purelib"]).resolve()  # the checkout's .venv site-packages
SOURCES = ("pyproject.toml", "README.md", "mitra_model", "flows", "config", "consumers")

# Installed into the test venv only: logs file events of every Python process started there, as JSON
# lines, to $MITRA_AUDIT_LOG. The log is opened before the hook, and written with os.write (which
# raises no audit event), so the hook never sees itself.
AUDIT_MODULE = '''
import json, os, sys
_log = os.environ.get("MITRA_AUDIT_LOG")
if _log:
    _fd = os.open(_log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    _WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
    _CHANGES = {"os.mkdir", "os.rename", "os.remove", "os.rmdir", "os.symlink", "os.link", "shutil.rmtree"}

    def _hook(event, args):
        if event == "open" and args and isinstance(args[0], (str, bytes, os.PathLike)):
            path, mode, flags = args[0], args[1], args[2] if len(args) > 2 else 0
            writes = any(c in (mode or "") for c in "wax+") or bool((flags or 0) & _WRITE_FLAGS)
            paths = [path]
        elif event in _CHANGES:
            writes, paths = True, [a for a in args if isinstance(a, (str, bytes, os.PathLike))]
        else:
            return
        for path in paths:
            path = os.path.abspath(os.fsdecode(path))
            os.write(_fd, (json.dumps({"event": event, "path": path, "write": writes}) + "\\n").encode())

    sys.addaudithook(_hook)
'''


def _copy_sources(target: Path) -> Path:
    """The checkout's packaged parts, symlinks kept (mitra_model/data links to config/ and consumers/)."""
    target.mkdir(parents=True)
    ignore = shutil.ignore_patterns("node_modules", "__pycache__", "*.egg-info")  # mitra_model/build is code
    for name in SOURCES:
        source = CHECKOUT / name
        if source.is_dir():
            shutil.copytree(source, target / name, symlinks=True, ignore=ignore)
        else:
            shutil.copy2(source, target / name)
    return target


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("wheel")
    source = _copy_sources(root / "src")
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation", "-w", str(root / "dist")],
        capture_output=True, text=True, timeout=300,
    )
    assert built.returncode == 0, built.stdout + built.stderr
    (found,) = (root / "dist").glob("mitra_build-*.whl")
    return found


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory, wheel: Path) -> Path:
    """A fresh venv with the wheel installed, seeing this interpreter's toolchain."""
    root = tmp_path_factory.mktemp("venv") / "env"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True, timeout=120)
    python = root / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    (site / "zz_toolchain.pth").write_text(f"{TOOLCHAIN_SITE}\n")  # appended after the venv's own site-packages
    installed = subprocess.run([str(python), "-m", "pip", "install", "--no-deps", "--no-index", str(wheel)],
                               capture_output=True, text=True, timeout=300)
    assert installed.returncode == 0, installed.stdout + installed.stderr
    (site / "_mitra_audit.py").write_text(AUDIT_MODULE)
    (site / "zz_audit.pth").write_text("import _mitra_audit\n")
    return root


def test_the_wheel_holds_the_data_files_and_no_node_modules(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    for name in ("mitra-build.toml", "manifest.schema.json", "consumers/package.json", "consumers/package-lock.json",
                 "consumers/node-check.mjs", "consumers/browser-check.mjs", "consumers/lib/fixture.mjs",
                 "consumers/lib/layout.mjs", "consumers/browser/index.html", "consumers/browser/check.mjs"):
        assert f"mitra_model/data/{name}" in names, f"{name} is not in the wheel"
    assert not [n for n in names if "node_modules" in n]
    with zipfile.ZipFile(wheel) as archive:  # the real bytes, not symlinks
        assert archive.read("mitra_model/data/mitra-build.toml") == (CHECKOUT / "config" / "mitra-build.toml").read_bytes()
    metadata = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("/METADATA"))).decode()
    base = [line for line in metadata.splitlines() if line.startswith("Requires-Dist:") and "extra ==" not in line]
    assert not [line for line in base if any(heavy in line for heavy in ("torch", "onnx", "prefect", "numpy"))], base


class Installed:
    """The installed CLI, run from a working directory with no config/ folder, audited."""

    def __init__(self, venv: Path, workdir: Path, audit_log: Path) -> None:
        self.venv, self.workdir, self.audit_log = venv, workdir, audit_log

    def run(self, *args: str, timeout: float = 300, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        return subprocess.run([str(self.venv / "bin" / "mitra-build"), *args], cwd=self.workdir, env=self._env(env),
                              capture_output=True, text=True, timeout=timeout)

    def python(self, code: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(self.venv / "bin" / "python"), "-c", code], cwd=self.workdir, env=self._env(),
                              capture_output=True, text=True, timeout=120)

    def _env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        inherited = {k: v for k, v in os.environ.items() if k not in ("MITRA_BUILD_CONFIG", "PYTHONPATH")}
        # PYTHONDONTWRITEBYTECODE: Python's own bytecode cache is not mitra-build's doing; keep it out of the audit
        return {**inherited, "MITRA_AUDIT_LOG": str(self.audit_log), "XDG_CACHE_HOME": str(self.workdir / "cache"),
                "PYTHONDONTWRITEBYTECODE": "1", **(extra or {})}

    def events(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.audit_log.read_text().splitlines()]


@pytest.fixture()
def installed(venv: Path, tmp_path: Path) -> Installed:
    workdir = tmp_path / "work"
    workdir.mkdir()
    return Installed(venv, workdir, tmp_path / "audit.jsonl")


def _under(path: str, folder: Path) -> bool:
    return Path(path) == folder or folder in Path(path).parents


def _assert_clean(events: list[dict[str, Any]], venv: Path) -> None:
    """Nothing read from the checkout (its .venv is the toolchain), nothing written to it or to site-packages."""
    toolchain_venv = TOOLCHAIN_SITE.parents[2]  # .venv/lib/pythonX.Y/site-packages -> .venv
    read = sorted({e["path"] for e in events if _under(e["path"], CHECKOUT) and not _under(e["path"], toolchain_venv)})
    assert not read, f"the installed package touched the checkout: {read[:10]}"
    site_packages = Path(sysconfig.get_paths(vars={"base": str(venv), "platbase": str(venv)})["purelib"])
    assert any(_under(e["path"], site_packages / "mitra_model") for e in events), "the audit hook saw nothing"
    written = sorted({e["path"] for e in events if e["write"] and (
        _under(e["path"], CHECKOUT) or _under(e["path"], site_packages) or _under(e["path"], TOOLCHAIN_SITE))})
    assert not written, f"the installed package wrote into the checkout or site-packages: {written[:10]}"


def test_installed_cli_synth_export_verify_pull(installed: Installed, s3_store, s3_client, tmp_path: Path) -> None:
    assert not (installed.workdir / "config").exists()
    where = installed.python("import mitra_model, mitra_model.build.config as c; print(mitra_model.__file__); print(c.config_path())")
    assert where.returncode == 0, where.stderr
    package_file, config_file = where.stdout.split()
    assert _under(package_file, installed.venv) and _under(config_file, installed.venv), where.stdout  # the packaged default

    version = installed.run("--version")
    assert version.returncode == 0 and "mitra-build 0.1.0" in version.stdout and "torch 2.13.0" in version.stdout

    snap, model, report = "snap", "model.onnx", "report.json"
    done = installed.run("synth", "--task", "classification", "--size", "tiny", "--output", snap, "--seed", "5")
    assert done.returncode == 0, done.stderr
    done = installed.run("export", "--snapshot", snap, "--output", model)
    assert done.returncode == 0, done.stderr
    done = installed.run("verify", "--snapshot", snap, "--onnx", model, "--report", report)
    assert done.returncode == 0, done.stderr
    assert json.loads((installed.workdir / report).read_text())["passed"] is True

    # pull: a tiny build published to the test's SeaweedFS, pulled by URL with the installed CLI (no config)
    publish_build(make_build(tmp_path / "build", seed=11), client=s3_client, store=s3_store)
    done = installed.run("pull", f"s3://{s3_store.bucket}/{s3_store.prefix}/mitra-classifier", "--dest", "pulled",
                         "--endpoint-url", s3_store.endpoint_url, "--quiet")
    assert done.returncode == 0, done.stderr
    assert (installed.workdir / "pulled" / "model.onnx").is_file()

    _assert_clean(installed.events(), installed.venv)


def test_installed_consumer_scripts_run_from_a_cache_copy(installed: Installed, wheel: Path) -> None:
    """From a wheel, the JS side is copied to $XDG_CACHE_HOME/mitra-build/consumers-<digest> (never
    site-packages), where `npm ci` would install node_modules; a checkout keeps consumers/."""
    done = installed.python(
        "from mitra_model.build.consumers import runtimes as r\n"
        "r._materialize_js()\n"
        "print(r.CONSUMERS_DIR)\n"
        "print(r.NPM_CI_COMMAND)\n"
    )
    assert done.returncode == 0, done.stderr
    folder = Path(done.stdout.splitlines()[0])
    assert folder.parent == installed.workdir / "cache" / "mitra-build" and folder.name.startswith("consumers-")
    copied = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    prefix = "mitra_model/data/consumers/"
    packaged = sorted(n[len(prefix):] for n in zipfile.ZipFile(wheel).namelist() if n.startswith(prefix))
    assert copied == packaged and "node-check.mjs" in copied and "package-lock.json" in copied
    assert str(folder) in done.stdout.splitlines()[1]
    _assert_clean(installed.events(), installed.venv)


def test_a_missing_extra_is_named(installed: Installed) -> None:
    """Without torch (hidden from the installed CLI), `export` names the [build] extra: exit 2, one paragraph."""
    hide = installed.workdir / "hide"
    hide.mkdir()
    # A fake, empty `torch` distribution would say "installed"; removing the real one is not ours to do.
    # So point the check at a metadata view without it: a finder that reports torch as absent.
    (hide / "sitecustomize.py").write_text(
        "import importlib.metadata as m\n"
        "_version = m.version\n"
        "def version(name):\n"
        "    if name.lower() == 'torch':\n"
        "        raise m.PackageNotFoundError(name)\n"
        "    return _version(name)\n"
        "m.version = version\n"
    )
    done = installed.run("export", "--snapshot", "snap", "--output", "m.onnx", env={"PYTHONPATH": str(hide)})
    assert done.returncode == 2, done.stderr
    assert "needs the [build] extra" in done.stderr and "pip install 'mitra-build[build]'" in done.stderr
    assert "Traceback" not in done.stderr
    version = installed.run("--version", env={"PYTHONPATH": str(hide)})
    assert "torch not installed" in version.stdout


@pytest.mark.skipif(shutil.which("npm") is None or shutil.which("node") is None, reason="Node.js with npm not installed")
def test_installed_wheel_runs_npm_ci_in_the_cache_copy(installed: Installed) -> None:
    done = installed.python("from mitra_model.build.consumers import ensure_node_modules\nprint(ensure_node_modules())")
    assert done.returncode == 0, done.stderr
    node_modules = Path(done.stdout.strip())
    assert node_modules.parent.parent == installed.workdir / "cache" / "mitra-build"
    assert (node_modules / "onnxruntime-node" / "package.json").is_file()
    _assert_clean(installed.events(), installed.venv)


def _base_closure() -> set[str]:
    """mitra-build's base dependencies and theirs, as installed here (no extras)."""
    from importlib import metadata

    from packaging.requirements import Requirement

    seen: set[str] = set()
    todo = ["mitra-build"]
    while todo:
        name = todo.pop()
        for line in metadata.requires(name) or []:
            requirement = Requirement(line)
            if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
                continue
            key = requirement.name.lower().replace("_", "-")
            if key not in seen:
                seen.add(key)
                todo.append(requirement.name)
    return seen


@pytest.fixture(scope="module")
def slim_venv(tmp_path_factory: pytest.TempPathFactory, wheel: Path) -> Path:
    """A venv that sees only the base install: the wheel plus links to its base dependencies' files."""
    from importlib import metadata

    root = tmp_path_factory.mktemp("slim")
    visible = root / "base-deps"
    visible.mkdir()
    for name in _base_closure():
        dist = metadata.distribution(name)
        for top in {Path(str(f)).parts[0] for f in dist.files or [] if not str(f).startswith("..")}:
            source = Path(str(dist.locate_file(top)))
            if source.exists() and not (visible / top).exists():
                (visible / top).symlink_to(source)
    env = root / "env"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env)], check=True, timeout=120)
    python = env / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    (site / "zz_base_deps.pth").write_text(f"{visible}\n")
    done = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index",
                           str(wheel)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    return env


def test_the_base_install_pulls_without_the_toolchain(slim_venv: Path, tmp_path: Path) -> None:
    """Base dependencies only: the consumer's modules import without torch/numpy/ONNX/Prefect, --version
    says what is missing, and a build command names the extra instead of failing with a traceback."""
    run = functools.partial(subprocess.run, cwd=tmp_path, capture_output=True, text=True, timeout=120,
                            env={k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MITRA_BUILD_CONFIG")})
    code = ("import sys, mitra_model.release.pull, mitra_model.release.recheck, mitra_model.cli.release_commands, "
            "mitra_model.cli.main\n"
            "print(sorted(m for m in ('torch', 'numpy', 'onnx', 'onnxruntime', 'prefect') if m in sys.modules))")
    done = run([str(slim_venv / "bin" / "python"), "-c", code])
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
    version = run([str(slim_venv / "bin" / "mitra-build"), "--version"])
    assert "torch not installed" in version.stdout and "boto3 " in version.stdout
    export = run([str(slim_venv / "bin" / "mitra-build"), "export", "--snapshot", "s", "--output", "m.onnx"])
    assert export.returncode == 2 and "Traceback" not in export.stderr
    assert "needs the [build] extra" in export.stderr and "pip install 'mitra-build[build]'" in export.stderr
    pulled = tmp_path / "pulled"  # what `pull --artifact int8` leaves: re-checked offline in the base install
    pulled.mkdir()
    (pulled / "model-int8.onnx").write_bytes(b"int8 bytes")
    (pulled / "manifest.json").write_text(json.dumps({"variant": "mitra-classifier", "version": "v1", "artifacts": [
        {"name": "int8", "file": "model-int8.onnx", "sha256": hashlib.sha256(b"int8 bytes").hexdigest()},
        {"name": "fp32", "file": "model.onnx", "sha256": "0" * 64}]}))
    check = run([str(slim_venv / "bin" / "mitra-build"), "check-release", str(pulled)])
    assert check.returncode == 0 and "int8 re-hashed" in check.stdout and "not pulled: fp32" in check.stdout


def test_the_base_install_loads_the_packaged_config(slim_venv: Path, tmp_path: Path) -> None:
    done = subprocess.run([str(slim_venv / "bin" / "python"), "-c", "import mitra_model.build.config as c; c.load_config()"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
