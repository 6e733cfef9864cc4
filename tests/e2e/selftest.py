#!/usr/bin/env python3
"""Checks the e2e driver itself: it must pass against the well-behaved fake server and fail,
at the right check, against each deliberately broken variant of it.

Run with the test venv's Python (it needs `openai`): $TURBINE_TEST_PYTHON selftest.py
"""

import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
CONCURRENCY = 8

# fault -> the driver check expected to fail (None: every check passes).
EXPECTED = {
    "none": None,
    "no-usage": "chat streaming + include_usage",
    "nondeterministic": "chat streaming + include_usage",
    "overrun": "chat non-streaming",
    "ignore-stop": "stop string",
    "accept-bad": "bad requests raise BadRequestError",
    "batch-drift": f"{CONCURRENCY} concurrent greedy streams",
}


def run_driver(fault):
    server = subprocess.Popen(
        [sys.executable, os.path.join(HERE, "fake_server.py"), "--port", "0", "--fault", fault],
        stdout=subprocess.PIPE, text=True)
    try:
        line = server.stdout.readline().strip()
        if not line.startswith("listening on "):
            return None, f"fake server did not start: {line!r}"
        url = line.removeprefix("listening on ")
        driver = subprocess.run(
            [sys.executable, os.path.join(HERE, "openai_e2e.py"), url,
             "--concurrency", str(CONCURRENCY), "--timeout", "30"],
            capture_output=True, text=True, timeout=120)
        return driver, None
    finally:
        server.terminate()
        server.wait(timeout=10)


def failed_check(output):
    for line in output.splitlines():
        if line.startswith("FAIL  "):
            return line.removeprefix("FAIL  ").split(":", 1)[0]
    return None


def main():
    passed = failed = 0
    for fault, expected in EXPECTED.items():
        driver, problem = run_driver(fault)
        if driver is not None:
            got = failed_check(driver.stdout)
            if expected is None and (driver.returncode != 0 or got is not None):
                problem = f"driver failed on a good server:\n{driver.stdout}{driver.stderr}"
            elif expected is not None and driver.returncode != 1:
                problem = f"exit {driver.returncode}, expected 1:\n{driver.stdout}{driver.stderr}"
            elif got != expected:
                problem = f"failed at {got!r}, expected {expected!r}:\n{driver.stdout}"
        if problem:
            failed += 1
            print(f"FAIL  fault {fault}: {problem}", flush=True)
        else:
            passed += 1
            print(f"ok    fault {fault}: " + (f"caught by {expected!r}" if expected else "all checks pass"),
                  flush=True)
    print(f"selftest: {passed} passed, {failed} failed", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
