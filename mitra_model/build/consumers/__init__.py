"""Prove the artifacts where they are consumed: onnxruntime-node, and onnxruntime-web in a browser.

Three layers, one module each:
- `fixture`: what Python writes for the JS checkers: fixed inputs in the consumer I/O contract and
  Python ONNX Runtime's outputs for one model file or the support-cache pair (`write_fixture`,
  `read_fixture`, the `Fixture` schema).
- `runtimes`: where the JS side lives (`consumers/` at the repository root) and what is installed:
  Node.js, the pinned npm packages (`ensure_node_modules`), Chromium, their versions.
- `checks`: run a fixture in a runtime and judge it against Python ORT under a tolerance
  (`check_in_node`, `check_in_browser`), giving a `ConsumerResult` and its manifest record.

Importing this package needs neither torch nor onnxruntime (scripts/setup.sh imports it to install
the npm packages); only writing a fixture does.
"""

from mitra_model.build.consumers.checks import (
    CaseResult,
    ConsumerResult,
    check_in_browser,
    check_in_node,
    check_where_consumed,
    require_passed,
)
from mitra_model.build.consumers.fixture import (
    DEFAULT_CASES,
    DEFAULT_SEED,
    FIXTURE_NAME,
    FIXTURE_SCHEMA_ID,
    Fixture,
    FixtureCase,
    FixtureTensor,
    python_ort_outputs,
    read_fixture,
    write_fixture,
)
from mitra_model.build.consumers.runtimes import (
    CHROMIUM_INSTALL_COMMAND,
    CONSUMERS_DIR,
    NODE_RUNTIME,
    NPM_CI_COMMAND,
    WEB_RUNTIME,
    ensure_node_modules,
    find_chromium,
    find_node,
    package_version,
)

__all__ = [
    "CHROMIUM_INSTALL_COMMAND",
    "CONSUMERS_DIR",
    "DEFAULT_CASES",
    "DEFAULT_SEED",
    "FIXTURE_NAME",
    "FIXTURE_SCHEMA_ID",
    "NODE_RUNTIME",
    "NPM_CI_COMMAND",
    "WEB_RUNTIME",
    "CaseResult",
    "ConsumerResult",
    "Fixture",
    "FixtureCase",
    "FixtureTensor",
    "check_in_browser",
    "check_in_node",
    "check_where_consumed",
    "ensure_node_modules",
    "find_chromium",
    "find_node",
    "package_version",
    "python_ort_outputs",
    "read_fixture",
    "require_passed",
    "write_fixture",
]
