"""Download speed of `llmctl pull URL#sha256=...` (hash verified) against `curl -o` of
the same file from the same loopback server, and parallel parts against one stream from
a server that caps each connection's speed (as many CDNs and mirrors do).

    .venv/bin/python benchmarks/download.py [--size-mib 1024] [--reps 5]

The server (tests/fileserver.py, sendfile, ranges) runs in a process of its own. Runs
alternate between the two tools, the page cache is flushed (sync) before each, and the
store is emptied after each llmctl run. Ratios are speeds: >1 means llmctl is faster.
This VM's disk writeback makes single runs vary by +-50%: read the medians.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LLMCTL = Path(sys.executable).parent / "llmctl"


def make_file(path: Path, size: int) -> str:
    """A GGUF file of about `size` bytes: one tensor of random (incompressible) bytes, so
    that llmctl's header check passes. Returns its sha256."""
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("download-benchmark")
    data = np.frombuffer(os.urandom(size), dtype=np.uint8)
    writer.add_tensor("payload", data, raw_dtype=gguf.GGMLQuantizationType.I8)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(8 << 20):
            digest.update(block)
    return digest.hexdigest()


def serve(files: list[Path], rate: int | None = None) -> tuple[subprocess.Popen, int]:
    args = [sys.executable, str(ROOT / "tests" / "fileserver.py"), *map(str, files)]
    if rate:
        args += ["--rate", str(rate)]
    server = subprocess.Popen(args, stdout=subprocess.PIPE, text=True)
    assert server.stdout is not None
    port = int(server.stdout.readline())
    return server, port


def timed(args: list[str], env: dict[str, str] | None = None) -> float:
    os.sync()
    began = time.perf_counter()
    subprocess.run(args, check=True, stdout=subprocess.DEVNULL, env=env)
    return time.perf_counter() - began


def pull_time(url: str, work: Path, *extra: str) -> float:
    home = work / "home"
    env = dict(os.environ, LLMCTL_HOME=str(home))
    took = timed([str(LLMCTL), "pull", "-q", url, *extra], env)
    shutil.rmtree(home)
    return took


def versus_curl(work: Path, size: int, reps: int) -> None:
    payload = work / "payload.gguf"
    sha = make_file(payload, size)
    server, port = serve([payload])
    url = f"http://127.0.0.1:{port}/payload.gguf"
    try:
        curl, verified, ours, ours1 = [], [], [], []
        out = str(work / "curl.out")
        for _ in range(reps):
            curl.append(timed(["curl", "-s", "-o", out, url]))
            os.unlink(out)
            # What a careful user runs: download, then check the published sha256
            # (OpenSSL's hash, the same code Python's hashlib uses).
            verified.append(timed(["sh", "-c", f"curl -s -o {out} {url} && "
                                               f"openssl dgst -sha256 {out}"]))
            os.unlink(out)
            ours.append(pull_time(f"{url}#sha256={sha}", work))
            ours1.append(pull_time(f"{url}#sha256={sha}", work, "--parts", "1"))
    finally:
        server.kill()
    mib = size / 2**20
    print(f"{mib:.0f} MiB from loopback, {reps} runs each (seconds: median, best)")
    for label, times in (("curl -o", curl), ("curl -o && openssl dgst", verified),
                         ("llmctl pull (4 parts)", ours),
                         ("llmctl pull --parts 1", ours1)):
        print(f"  {label:26} {statistics.median(times):6.2f} {min(times):6.2f}"
              f"   {mib / statistics.median(times):7.0f} MiB/s")
    for base_label, base in (("curl", curl), ("curl + sha256", verified)):
        for label, times in (("4 parts", ours), ("--parts 1", ours1)):
            print(f"  speed ratio llmctl {label} / {base_label}: median "
                  f"{statistics.median(base) / statistics.median(times):.2f}, "
                  f"best {min(base) / min(times):.2f}")


def versus_one_stream(work: Path, size: int, rate: int, reps: int) -> None:
    payload = work / "capped.gguf"
    sha = make_file(payload, size)
    server, port = serve([payload], rate)
    url = f"http://127.0.0.1:{port}/capped.gguf#sha256={sha}"
    try:
        one = [pull_time(url, work, "--parts", "1") for _ in range(reps)]
        four = [pull_time(url, work, "--parts", "4") for _ in range(reps)]
    finally:
        server.kill()
    print(f"{size / 2**20:.0f} MiB from a server capping each connection at "
          f"{rate / 2**20:.0f} MiB/s: --parts 1 {statistics.median(one):.2f} s, "
          f"--parts 4 {statistics.median(four):.2f} s, "
          f"speed-up {statistics.median(one) / statistics.median(four):.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=os.environ.get("LLMCTL_BENCH_DIR")) as folder:
        work = Path(folder)
        versus_curl(work, args.size_mib * 2**20, args.reps)
        versus_one_stream(work, 128 * 2**20, 8 * 2**20, max(2, args.reps // 2))


if __name__ == "__main__":
    main()
