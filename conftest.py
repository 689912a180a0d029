"""Run each suite in its own process when pytest is called with no paths.

TensorFlow and Triton abort when imported into one process, and pytest imports every test module
while collecting. So `uv run pytest` (args from `testpaths`) starts one child pytest per suite and
returns the worst exit code; `uv run pytest packages/rwkv-ops-jax/tests` runs in-process as usual.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

_CHILD = "RWKV_OPS_PYTEST_CHILD"


def pytest_cmdline_main(config):
    if os.environ.get(_CHILD):
        return None
    if config.args_source != config.ArgsSource.TESTPATHS:
        return None
    suites = [p for p in config.getini("testpaths") if os.path.isdir(os.path.join(str(config.rootpath), p))]
    extra = [a for a in config.invocation_params.args]
    env = dict(os.environ, **{_CHILD: "1"})
    worst = 0
    results = []
    totals = {"passed": 0, "failed": 0, "skipped": 0, "error": 0}
    for suite in suites:
        print(f"\n===== {suite} (own process) =====", flush=True)
        proc = subprocess.Popen([sys.executable, "-m", "pytest", suite, *extra], env=env,
                                cwd=str(config.rootpath), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, bufsize=1)
        summary = ""
        for line in proc.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            if re.search(r"\d+ (passed|failed|skipped|errors?|deselected)", line) and " in " in line:
                summary = line
        code = proc.wait()
        for count, kind in re.findall(r"(\d+) (passed|failed|skipped|errors?)", summary):
            totals["error" if kind.startswith("error") else kind] += int(count)
        if code == 5:  # no tests collected in this suite
            code = 0
        results.append((suite, code))
        worst = max(worst, code)
    print("\n===== suites =====")
    for suite, code in results:
        print(f"{'ok    ' if code == 0 else 'FAILED'} {suite} (exit {code})")
    failed = totals["failed"] + totals["error"]
    print(f"total: {totals['passed']} passed, {failed} failed, {totals['skipped']} skipped", flush=True)
    return worst
