"""llmctl batch on Ray: a real two-node cluster on loopback, started by these tests, and the
real SmolLM2 in every worker. Replies at temperature 0 must be the ones the local runner
gives, also when a worker is killed halfway."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import Runner

from llmctl.batch.lines import Prompt
from llmctl.batch.local import Defaults, run_prompts
from llmctl.engines.text import GenerationOptions, LoadOptions, Message
from llmctl.errors import EngineUnavailable, ModelNotFound, UsageError

BIN = Path(sys.executable).parent
# Ray on Linux turns 127.0.0.1 (and localhost) into the machine's outward address, for
# the head's --node-ip-address and for the address a node or driver connects to alike; any
# other loopback address it keeps. So the head listens on 127.0.0.2 and the second node,
# which Ray names by the address it reaches the head from, is 127.0.0.1: all on loopback.
HEAD_IP = "127.0.0.2"
QUESTIONS = [
    "What is the capital of France? Answer in one sentence.",
    "Name three primary colours.",
    "What is 2 + 2?",
    "Write a haiku about the sea.",
    "What language is spoken in Brazil?",
    "Give one word that rhymes with cat.",
    "What do bees make?",
    "Name a planet in the solar system.",
    "What is the boiling point of water in Celsius?",
    "Say hello in Spanish.",
]
PROMPTS = [Prompt(i + 1, f"q{i + 1}", (Message("user", q),)) for i, q in enumerate(QUESTIONS)]
DEFAULTS = Defaults(GenerationOptions(temperature=0, max_tokens=24))
LOAD = LoadOptions(context_length=512)
PARALLEL = 2
SAME = ("id", "text", "stop_reason", "prompt_tokens", "generated_tokens")


def same(record: dict[str, Any]) -> dict[str, Any]:
    return {key: record.get(key) for key in SAME}


@pytest.fixture(scope="module")
def local_records(smollm2_gguf: Path, tmp_path_factory: pytest.TempPathFactory
                  ) -> dict[Any, dict[str, Any]]:
    """The replies of the local runner, on the same model, options and sequences."""
    from llmctl.loader import open_text
    from llmctl.store.catalog import Catalog
    from llmctl.store.layout import StoreLayout
    from llmctl.store.names import parse_reference

    layout = StoreLayout(tmp_path_factory.mktemp("local-home"))
    opened = open_text(parse_reference(str(smollm2_gguf)), layout, Catalog.default(layout.root),
                       options=LoadOptions(context_length=512, sequences=PARALLEL))
    try:
        records = {r["id"]: same(r) for r in run_prompts(opened.engine, PROMPTS, DEFAULTS,
                                                         opened.sequences)}
    finally:
        opened.engine.close()
    assert records["q1"]["text"] == "The capital of France is Paris."  # a real model
    assert len(records) == len(PROMPTS) and not any(r.get("error") for r in records.values())
    return records


# -- the cluster ------------------------------------------------------------------------------

@dataclass
class Cluster:
    address: str
    homes: list[Path]  # each node's own LLMCTL_HOME: head first


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def descendants(pids: list[int]) -> set[int]:
    """Every process below `pids` (Ray's daemons and workers; workers run in process
    groups of their own, so killing the `ray start` groups is not enough)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found: set[int] = set()
    todo = list(pids)
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def stop(processes: list[subprocess.Popen]) -> None:
    """End what the fixture started, and everything those processes started, by pid."""
    pids = [p.pid for p in processes]
    below = descendants(pids)
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)  # `ray start --block` stops its daemons
    deadline = time.monotonic() + 10  # a graceful stop can take half a minute: not more
    while time.monotonic() < deadline and any(alive(pid) for pid in [*pids, *below]):
        time.sleep(0.2)
    for pid in [*pids, *(below | descendants(pids))]:
        if alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    for process in processes:
        process.wait(timeout=30)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """A head node and a second node, 1 CPU each, with token authentication (as Ray 2.60
    has by default) and a token of their own; this process gets it through Ray's own
    environment variables, as a user's driver would."""
    # Short: Ray's Unix sockets live under the temp dir, and their paths are limited.
    temp = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))
    logs = tmp_path_factory.mktemp("ray-logs")
    homes = [tmp_path_factory.mktemp("node-home-head"), tmp_path_factory.mktemp("node-home-2")]
    saved = {name: os.environ.get(name) for name in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN",
                                                     "RAY_ADDRESS", "RAY_USAGE_STATS_ENABLED")}
    os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32),
                      RAY_USAGE_STATS_ENABLED="0")
    os.environ.pop("RAY_ADDRESS", None)
    port = free_port(HEAD_IP)
    address = f"{HEAD_IP}:{port}"
    processes: list[subprocess.Popen] = []

    def start(args: list[str], home: Path, log: str) -> None:
        processes.append(subprocess.Popen(
            [str(BIN / "ray"), "start", *args, "--num-cpus", "1", "--block",
             "--disable-usage-stats"], env={**os.environ, "LLMCTL_HOME": str(home)},
            stdin=subprocess.DEVNULL, stdout=(logs / log).open("w"), stderr=subprocess.STDOUT,
            start_new_session=True))

    try:
        start(["--head", "--node-ip-address", HEAD_IP, "--port", str(port),
               "--include-dashboard", "false", "--temp-dir", str(temp)], homes[0], "head.log")
        deadline = time.monotonic() + 120
        while True:
            try:
                socket.create_connection((HEAD_IP, port), timeout=1).close()
                break
            except OSError:
                assert processes[0].poll() is None, (logs / "head.log").read_text()
                assert time.monotonic() < deadline, (logs / "head.log").read_text()
                time.sleep(0.3)
        start(["--address", address], homes[1], "node.log")
        import ray

        ray.init(address=address, log_to_driver=False)
        try:
            while sum(1 for n in ray.nodes() if n["Alive"]) < 2:
                assert processes[1].poll() is None, (logs / "node.log").read_text()
                assert time.monotonic() < deadline, (logs / "node.log").read_text()
                time.sleep(0.5)
        finally:
            ray.shutdown()
        yield Cluster(address, homes)
    finally:
        stop(processes)
        shutil.rmtree(temp, ignore_errors=True)
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def stored_models(home: Path) -> list[str]:
    from llmctl.store import manifest
    from llmctl.store.layout import StoreLayout

    return [m.reference for m in manifest.iter_manifests(StoreLayout(home))]


# -- the tests --------------------------------------------------------------------------------

def test_each_node_pulls_the_model_into_its_own_store_and_replies_as_locally(
        cluster: Cluster, local_records: dict[Any, dict[str, Any]]) -> None:
    from llmctl.batch.ray import run_on_ray

    notes: list[str] = []
    records = list(run_on_ray(cluster.address, PROMPTS[:8], model="smollm2", model_path=None,
                              engine=None, load=LOAD, defaults=DEFAULTS, parallel=PARALLEL,
                              on_note=notes.append))
    assert Counter(r["id"] for r in records) == Counter(p.id for p in PROMPTS[:8])
    assert {r["id"]: same(r) for r in records} == {p.id: local_records[p.id]
                                                   for p in PROMPTS[:8]}
    # Every node opened the model from its own store, pulled there from the catalog.
    for home in cluster.homes:
        assert stored_models(home) == ["smollm2:135m"], home
    workers = [n for n in notes if n.startswith("ray: worker on ")]
    assert len(workers) == 2, notes
    assert all("smollm2:135m, 1 CPU, 2 sequences" in n for n in workers), notes


def busy_worker_pid() -> int | None:
    """The pid of a worker with prompts under way, found through Ray: the run's workers are
    named actors that answer `info` while they work."""
    import ray

    from llmctl.batch.ray import CONTROL, NAME_PREFIX

    for actor in ray.util.list_named_actors(all_namespaces=True):
        if actor["name"].startswith(NAME_PREFIX):
            handle = ray.get_actor(actor["name"], namespace=actor["namespace"])
            info = ray.get(handle.info.options(concurrency_group=CONTROL).remote(), timeout=30)
            if info["unanswered"] > 0:
                return info["pid"]
    return None


def test_a_worker_killed_halfway_loses_no_prompt_and_repeats_none(
        cluster: Cluster, smollm2_gguf: Path, local_records: dict[Any, dict[str, Any]],
        monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]) -> None:
    from llmctl.batch.ray import run_on_ray

    monkeypatch.setenv("RAY_ADDRESS", cluster.address)  # "auto" finds it as Ray does
    notes: list[str] = []
    records = []
    killed = None
    for record in run_on_ray("auto", PROMPTS, model="smollm2", model_path=str(smollm2_gguf),
                             engine=None, load=LOAD, defaults=DEFAULTS, parallel=PARALLEL,
                             on_note=notes.append):
        records.append(record)
        if killed is None:
            killed = busy_worker_pid()
            assert killed is not None, "no worker was running a chunk after the first reply"
            os.kill(killed, signal.SIGKILL)
    assert killed is not None
    assert Counter(r["id"] for r in records) == Counter(p.id for p in PROMPTS)
    assert {r["id"]: same(r) for r in records} == local_records
    died = [n for n in notes if " died" in n]
    assert died and "run again" in died[0], notes
    # Ray restarted the worker: it said it was ready a third time, from a new process.
    assert len([n for n in notes if n.startswith("ray: worker on ")]) == 3, notes
    # Ray's own word of the death ("(raylet) A worker died ...") is kept off stdout, which
    # carries the results in `llmctl batch -o -`.
    assert capfd.readouterr().out == ""


def test_a_model_no_node_has_is_not_found_with_its_suggestions(cluster: Cluster) -> None:
    from llmctl.batch.ray import run_on_ray

    with pytest.raises(ModelNotFound) as caught:
        list(run_on_ray(cluster.address, PROMPTS[:2], model="smollm", model_path=None,
                        engine=None, load=LOAD, defaults=DEFAULTS, parallel=PARALLEL))
    assert caught.value.reference == "smollm"
    assert any(s.startswith("smollm2") for s in caught.value.suggestions)


LOCAL_SCRIPT = """
import json, sys
from llmctl.batch.lines import Prompt
from llmctl.batch.local import Defaults
from llmctl.batch.ray import run_on_ray
from llmctl.engines.text import GenerationOptions, LoadOptions, Message

questions, model = json.loads(sys.argv[1]), sys.argv[2]
prompts = [Prompt(i + 1, f"q{i + 1}", (Message("user", q),)) for i, q in enumerate(questions)]
for record in run_on_ray("local", prompts, model="smollm2", model_path=model, engine=None,
                         load=LoadOptions(context_length=512),
                         defaults=Defaults(GenerationOptions(temperature=0, max_tokens=24)),
                         parallel=2, on_note=lambda note: print(note, file=sys.stderr)):
    print(json.dumps(record), flush=True)
"""


def test_local_starts_a_cluster_of_its_own_and_needs_no_setup(
        smollm2_gguf: Path, tmp_path: Path, local_records: dict[Any, dict[str, Any]]) -> None:
    # A process of its own, as `llmctl batch --ray local` is: a fresh Ray, no token or
    # address in the environment, a home of its own (Ray would write ~/.ray/auth_token).
    temp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray's socket paths
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(HOME=str(tmp_path / "home"), RAY_USAGE_STATS_ENABLED="0", RAY_TMPDIR=temp)
    (tmp_path / "home").mkdir()
    process = subprocess.Popen([sys.executable, "-c", LOCAL_SCRIPT, json.dumps(QUESTIONS[:4]),
                                str(smollm2_gguf)], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env=env,
                               stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=300)
    finally:
        stop([process])  # its cluster too, should it still run
        shutil.rmtree(temp, ignore_errors=True)
    assert process.returncode == 0, stderr[-3000:]
    records = [json.loads(line) for line in stdout.splitlines()]
    assert {r["id"]: same(r) for r in records} == {p.id: local_records[p.id]
                                                   for p in PROMPTS[:4]}
    assert "ray: worker on 127.0.0.1 " in stderr
    assert not (tmp_path / "home" / ".ray").exists()


def test_the_command_spreads_a_file_of_prompts_over_the_cluster(
        cluster: Cluster, smollm2_gguf: Path, local_records: dict[Any, dict[str, Any]],
        llmctl: Runner, tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": p.id, "prompt": p.messages[0].content}) + "\n"
                               for p in PROMPTS[:6]))
    result = llmctl("batch", "smollm2", str(prompts), "-o", "results.jsonl", "--ray",
                    cluster.address, "--model-path", str(smollm2_gguf), "--temperature", "0",
                    "--max-tokens", "24", "--parallel", str(PARALLEL), "--ctx", "512")
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""
    records = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert {r["id"]: same(r) for r in records} == {p.id: local_records[p.id]
                                                   for p in PROMPTS[:6]}
    assert result.stderr.count("ray: worker on ") == 2, result.stderr
    # Run again: everything is in the file already, and no cluster is needed to say so.
    again = llmctl("batch", "smollm2", str(prompts), "-o", "results.jsonl", "--ray",
                   "127.0.0.1:1", "--model-path", str(smollm2_gguf))
    assert again.returncode == 0, again.stderr
    assert len((tmp_path / "results.jsonl").read_text().splitlines()) == 6


TOKEN_SCRIPT = """
import sys
from llmctl.batch.lines import Prompt
from llmctl.batch.local import Defaults
from llmctl.batch.ray import run_on_ray
from llmctl.engines.text import GenerationOptions, LoadOptions, Message
from llmctl.errors import UsageError

try:
    list(run_on_ray(sys.argv[1], [Prompt(1, 1, (Message("user", "Hi"),))], model="smollm2",
                    model_path=None, engine=None, load=LoadOptions(),
                    defaults=Defaults(GenerationOptions()), parallel=1))
except UsageError as exc:
    print(f"{exc}; {exc.hint}")
"""


def test_a_token_the_cluster_refuses_is_a_usage_error_that_names_ray_auth_token(
        cluster: Cluster, tmp_path: Path) -> None:
    # A process of its own: Ray reads the token once per process.
    env = {**os.environ, "RAY_AUTH_TOKEN": secrets.token_hex(32), "HOME": str(tmp_path)}
    result = subprocess.run([sys.executable, "-c", TOKEN_SCRIPT, cluster.address],
                            capture_output=True, text=True, env=env, timeout=300,
                            stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith(f"the Ray cluster at {cluster.address} refused this "
                                    "process's token; set RAY_AUTH_TOKEN"), result.stdout


def test_an_address_where_no_cluster_answers_is_a_usage_error() -> None:
    # Ray itself retries an address that does not answer for minutes: run_on_ray asks the
    # port first.
    from llmctl.batch.ray import run_on_ray

    port = free_port()  # closed again: nothing listens there
    with pytest.raises(UsageError) as caught:
        list(run_on_ray(f"127.0.0.1:{port}", PROMPTS[:1], model="smollm2", model_path=None,
                        engine=None, load=LOAD, defaults=DEFAULTS, parallel=1))
    assert str(caught.value) == f"no Ray cluster answers at 127.0.0.1:{port} (Connection " \
                                "refused)"
    assert "ray start --head" in (caught.value.hint or "")
    with pytest.raises(UsageError, match="is not host:port"):
        list(run_on_ray("no-port-given", PROMPTS[:1], model="smollm2", model_path=None,
                        engine=None, load=LOAD, defaults=DEFAULTS, parallel=1))


def test_without_ray_installed_the_error_says_how_to_install_it(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from llmctl.batch.ray import run_on_ray

    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    with pytest.raises(EngineUnavailable) as caught:
        list(run_on_ray("local", PROMPTS[:1], model="smollm2", model_path=None, engine=None,
                        load=LOAD, defaults=DEFAULTS, parallel=1))
    assert caught.value.install == "pip install 'llmctl[ray]'"
