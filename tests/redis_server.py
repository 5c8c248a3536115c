"""A throwaway `redis-server` on 127.0.0.1 for tests: a free port, no persistence, stopped by PID."""

from __future__ import annotations

import random
import shutil
import socket
import subprocess
import tempfile
import time


def free_port() -> int:
    """A port free now, from 20000-32767: below the kernel's ephemeral range (32768-60999), where every bind(0) and
    outgoing connection of the processes a test starts (Ray's among them) draws its ports, and above Ray's worker
    ports (10002-19999). A port from bind(0) could be handed to one of them before the test's server binds it
    (seen: HAProxy failing with "Address already in use" under a loaded `make test`)."""
    rng = random.SystemRandom()
    for _ in range(200):
        port = rng.randrange(20000, 32768)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port in 20000-32767 after 200 tries")


class RedisServer:
    """`with RedisServer() as server: ... server.connection_string` (Feast's "host:port,db=0" form)."""

    def __init__(self):
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed: `make test` installs it "
                               "(apt-get install -y redis-server)")
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="redis-test-")
        self.proc = subprocess.Popen(
            [binary, "--bind", "127.0.0.1", "--port", str(self.port), "--save", "", "--appendonly", "no",
             "--dir", self.dir, "--protected-mode", "yes"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"redis-server did not start on port {self.port}")

    @property
    def connection_string(self) -> str:
        return f"127.0.0.1:{self.port},db=0"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> RedisServer:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
