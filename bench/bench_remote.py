"""Remote store benchmark (issue 13): a fishckpt step against a dense safetensors object, on a local S3 server.

Starts SeaweedFS's ``weed`` on 127.0.0.1 (as the tests do), then times, round by round:
a fishckpt save and a verified load of one step (base cached), a dense safetensors upload and
download of the same state, and ``open`` + load of a step with the base not cached (cold) and
cached (warm). A second, untimed pass goes through a counting proxy to measure the bytes on
the wire. Run: ``nice -n 19 python bench/bench_remote.py`` (needs ``fishckpt[dev]``).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # the S3 server and proxy of the tests
import _s3server
from _common import interleaved, mib, table
from _s3proxy import Proxy
from bench_store import random_mask, random_walk, synthetic_model

import fishckpt
from fishckpt import CheckpointStore

BUCKET = "fishckpt-bench"


def _wire(proxy: Proxy, action: Callable[[], object]) -> tuple[int, int, int]:
    """Body bytes sent and received, and requests made, by ``action`` through ``proxy``."""
    proxy.reset()
    action()
    sent, received = proxy.wire_bytes()
    return sent, received, len(proxy.seen)


def run(report: Callable[[str], None], *, hidden: int = 1024, layers: int = 4, rounds: int = 5) -> dict[str, float]:
    """Times the remote store against dense objects on a local S3 server; reports markdown tables."""
    import s3fs

    warnings.simplefilter("ignore", fishckpt.OutsideMaskWarning)
    base = synthetic_model(hidden, layers, seed=0)
    numel = sum(t.numel() for t in base.values())
    mask = random_mask(base, 0.005, seed=1)
    tuned = random_walk(base, mask, steps=30, lr=1e-4, seed=2)
    with tempfile.TemporaryDirectory() as scratch_name:
        scratch = Path(scratch_name)
        started = time.perf_counter()
        server = _s3server.start(scratch / "s3")
        report(f"\nSeaweedFS `weed` {server.endpoint}: ready in {time.perf_counter() - started:.1f} s")
        try:
            _s3server.new_bucket(server, BUCKET)
            options = server.storage_options()
            fs = s3fs.S3FileSystem(skip_instance_cache=True, **options)
            url = f"s3://{BUCKET}/run"
            cache = scratch / "cache"
            started = time.perf_counter()
            store = CheckpointStore.create(url, base, mask, storage_options=options, cache_dir=cache)
            create_seconds = time.perf_counter() - started
            store.save(tuned, 1)  # downloads the base into the cache once
            report(
                f"\n### {numel / 1e6:.1f}M fp32 parameters in {len(base)} tensors ({mib(numel * 4)}), "
                f"random mask k = {mask.k:,} ({mask.density:.2%}); create (base upload) {create_seconds:.2f} s\n"
            )
            dense_key = f"{BUCKET}/dense/state.safetensors"
            colds = [scratch / f"cold-{i}" for i in range(rounds + 1)]

            def save(i: int) -> None:
                store.save(tuned, 100 + i)

            def dense_up(i: int) -> None:
                fs.pipe_file(dense_key, save_safetensors(tuned))

            def dense_down(i: int) -> None:
                load_safetensors(fs.cat_file(dense_key))

            def cold(i: int) -> None:
                CheckpointStore.open(url, storage_options=options, cache_dir=colds[i]).load(1)

            def warm(i: int) -> None:
                CheckpointStore.open(url, storage_options=options, cache_dir=cache).load(1)

            dense_up(0)
            timed = interleaved(
                rounds,
                {
                    "save": save,
                    "dense_up": dense_up,
                    "dense_down": dense_down,
                    "cold": cold,
                    "warm": warm,
                },
            )
            for folder in colds:
                shutil.rmtree(folder, ignore_errors=True)

            proxy = Proxy(server.endpoint).start()
            try:
                proxied = dict(options, client_kwargs={"endpoint_url": proxy.endpoint, "region_name": "us-east-1"})
                proxied_fs = s3fs.S3FileSystem(skip_instance_cache=True, **proxied)
                via_proxy = CheckpointStore.open(url, storage_options=proxied, cache_dir=cache)
                via_proxy.load(1)
                info: list[fishckpt.SaveInfo] = []
                wire = {
                    "save": _wire(proxy, lambda: info.append(via_proxy.save(tuned, 999))),
                    "dense_up": _wire(proxy, lambda: proxied_fs.pipe_file(dense_key, save_safetensors(tuned))),
                    "dense_down": _wire(proxy, lambda: load_safetensors(proxied_fs.cat_file(dense_key))),
                    "cold": _wire(
                        proxy,
                        lambda: CheckpointStore.open(url, storage_options=proxied, cache_dir=scratch / "cold-w").load(
                            1
                        ),
                    ),
                    "warm": _wire(
                        proxy, lambda: CheckpointStore.open(url, storage_options=proxied, cache_dir=cache).load(1)
                    ),
                }
            finally:
                proxy.stop()
        finally:
            server.stop()

    labels = {
        "save": "fishckpt save of a step (exact check, store open)",
        "dense_up": "dense safetensors upload (serialise + PUT)",
        "warm": "fishckpt open + verified load, base cached (warm)",
        "dense_down": "dense safetensors download + parse",
        "cold": "fishckpt open + verified load, base not cached (cold)",
    }
    rows = [
        [labels[name], f"{timed[name][0] * 1e3:,.0f}", f"{wire[name][0]:,}", f"{wire[name][1]:,}", str(wire[name][2])]
        for name in labels
    ]
    report(table(["operation", "best ms", "body bytes up", "body bytes down", "requests"], rows))
    seconds = {name: timed[name][0] for name in timed}
    step_bytes = info[0].bytes_written
    ratios = [
        ["dense upload / fishckpt save (time)", f"{seconds['dense_up'] / seconds['save']:.1f}x"],
        ["dense download / warm fishckpt open + load (time)", f"{seconds['dense_down'] / seconds['warm']:.2f}x"],
        ["cold / warm open + load (time)", f"{seconds['cold'] / seconds['warm']:.2f}x"],
        ["dense upload / fishckpt save (bytes up)", f"{wire['dense_up'][0] / wire['save'][0]:.0f}x"],
        ["fishckpt save: bytes up / step file bytes", f"{wire['save'][0] / step_bytes:.3f}"],
        ["fishckpt save: bytes up / masked value", f"{wire['save'][0] / mask.k:.2f}"],
        ["cold open: bytes down / base bytes", f"{wire['cold'][1] / (numel * 4):.3f}"],
    ]
    report("\n" + table(["ratio (same run)", "measured"], ratios))
    return {**{f"{name}.seconds": value for name, value in seconds.items()}, "step_bytes": float(step_bytes)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=5)
    arguments = parser.parse_args()
    run(print, hidden=arguments.hidden, layers=arguments.layers, rounds=arguments.rounds)


if __name__ == "__main__":
    main()
