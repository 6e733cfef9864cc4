"""A `turbine up` for the bench scripts in this folder: a free port, the server started on a
cluster file, ready when `/ready` answers 200, stopped with SIGINT (then SIGKILL).

    with TurbineServer(turbine_bin, yaml_text_with_PORT) as server:
        ... server.port ...
"""

import http.client
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TurbineServer:
    """`cluster(port)` gives the cluster file's text for the chosen port."""

    def __init__(self, turbine: str, cluster, ready_timeout_s: float = 300):
        self.port = free_port()
        self.dir = tempfile.TemporaryDirectory()
        cfg = Path(self.dir.name) / "cluster.yaml"
        cfg.write_text(cluster(self.port))
        self.log_path = Path(self.dir.name) / "turbine.log"
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen([turbine, "up", "-f", str(cfg), "--no-fetch"], stdout=self.log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        self.ready_timeout_s = ready_timeout_s

    def __enter__(self):
        deadline = time.time() + self.ready_timeout_s
        while time.time() < deadline:
            if self.proc.poll() is not None:
                self.close()
                raise SystemExit(f"turbine exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
                conn.request("GET", "/ready")
                if conn.getresponse().status == 200:
                    return self
            except OSError:
                pass
            time.sleep(0.5)
        self.close()
        raise SystemExit(f"turbine did not become ready:\n{self.tail()}")

    def __exit__(self, kind, value, tb):
        failed = kind is not None
        self.close()
        if failed or self.proc.returncode not in (0, -signal.SIGINT, 130):
            print(self.tail(), file=sys.stderr)
        self.dir.cleanup()

    def tail(self) -> str:
        return self.log_path.read_text()[-3000:] if self.log_path.exists() else ""

    def close(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        if not self.log.closed:
            self.log.close()
