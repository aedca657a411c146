"""llmctl batch --ray ADDRESS: the prompts spread over a Ray cluster, one model per worker.

    run_on_ray(address, prompts, ...)
      -> connect to the cluster ("auto", host:port, ray://...), or start a throw-away one
         on this machine ("local", on 127.0.0.1, with a token of its own)
      -> one ModelWorker actor per node with CPUs, holding all of that node's CPUs; each
         opens the model itself (loader.open_text): from its own node's llmctl store, pulled
         there first when missing, or from `model_path`, a path every node sees
      -> chunks of prompts to whichever worker is free; a chunk runs through
         batch.local.run_prompts, `parallel` sequences in the one model, and streams each
         record back as its reply ends (a Ray generator), so results reach the output file
         as they are made
      -> a worker that dies (its process killed, its node gone): Ray restarts it (on the
         same node, MAX_RESTARTS times), and the prompts it had not answered run again,
         there or on another worker; the driver yields each prompt's record once

Why one worker per node, not one per CPU: llama.cpp decodes a node's sequences in one batch
with all of its cores, which makes more tokens per second than several model copies
splitting the cores and the memory (SmolLM2 on 2 cores: 188 tokens/s with 1 sequence, 314
with 8; TESTDATA.md). The node is also what a user sizes with `ray start --num-cpus N`: the
worker takes all N and runs N llama.cpp threads.

Ray is imported only inside functions: `llmctl --help` must not pay for it.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import secrets
import socket
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmctl.batch.lines import Id, Prompt
from llmctl.batch.local import Defaults, run_prompts
from llmctl.engines.text import LoadOptions
from llmctl.errors import EngineFailure, EngineUnavailable, LlmctlError, UsageError

if TYPE_CHECKING:
    from llmctl.engines.text import TextEngine
    from llmctl.loader import Opened

INSTALL = "pip install 'llmctl[ray]'"
# A chunk holds at most this many rounds of a worker's sequences: enough that its slots
# rarely drain between chunks, few enough that the prompts spread over the workers and a
# dead worker leaves little to run again.
CHUNK_ROUNDS = 4
# Ray restarts a worker whose process died this many times; after that it is given up.
MAX_RESTARTS = 3
# A prompt whose worker died under it this many times gets an error record instead of a
# fourth try: a prompt that crashes the engine must not take every worker down in turn.
MAX_ATTEMPTS = 3
# Seconds to wait for a TCP answer from host:port before calling the address wrong (Ray
# itself retries an unreachable address for minutes before giving up).
CONNECT_SECONDS = 5.0
# Seconds without any news before saying what the run waits for (a worker that Ray cannot
# place: its node's CPUs are taken by other work).
QUIET_SECONDS = 60.0
TOKEN_HINT = ("set RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH) to the cluster's token: `ray "
              "get-auth-token` on its head node prints it")
NAME_PREFIX = "llmctl-batch-"  # the workers' actor names: `ray list actors` shows them
CONTROL = "control"  # the workers' concurrency group that answers while a chunk runs


@dataclass(frozen=True)
class WorkerSpec:
    """What every worker opens and how: the same for all of them."""

    reference: str  # a model reference, or the path every node sees
    engine: str | None
    load: LoadOptions
    force: bool
    defaults: Defaults


class ModelWorker:
    """One node's model, as a Ray actor. The model opens on the first call and again after
    Ray restarted the actor (its process died): `ready` tells the driver it is open."""

    def __init__(self, spec: WorkerSpec):
        self.spec = spec
        self.opened: Opened[TextEngine] | None = None
        self.notes: list[str] = []
        self.unanswered = 0  # prompts of the running chunk without a record yet

    def info(self) -> dict[str, Any]:
        """Where this worker runs and how many prompts it has under way (call it in the
        CONTROL group: it answers while a chunk runs)."""
        import ray

        return {"pid": os.getpid(), "node": ray.util.get_node_ip_address(),
                "unanswered": self.unanswered}

    def ready(self) -> tuple[str, Any]:
        """("ready", facts) once the model is open, or ("error", the LlmctlError)."""
        try:
            opened = self._open()
        except Exception as exc:
            return "error", _portable(exc)
        return "ready", {**self.info(), "model": opened.model.name,
                         "sequences": opened.sequences, "notes": self.notes}

    def run(self, prompts: list[Prompt]) -> Iterator[tuple[str, Any]]:
        """("record", its result) for each prompt as its reply ends; ("error", ...) if the
        model itself fails, which ends the chunk."""
        self.unanswered = len(prompts)
        try:
            opened = self._open()
            for record in run_prompts(opened.engine, prompts, self.spec.defaults,
                                      opened.sequences):
                self.unanswered -= 1
                yield "record", record
        except Exception as exc:
            yield "error", _portable(exc)
        finally:
            self.unanswered = 0

    def _open(self) -> Opened[TextEngine]:
        if self.opened is not None:
            return self.opened
        from llmctl.loader import open_text
        from llmctl.store.catalog import Catalog
        from llmctl.store.layout import StoreLayout
        from llmctl.store.names import parse_reference

        layout = StoreLayout.default()  # this node's store: its own LLMCTL_HOME
        notes: list[str] = []
        self.opened = open_text(parse_reference(self.spec.reference), layout,
                                Catalog.default(layout.root), engine=self.spec.engine,
                                options=_with_threads(self.spec.load), force=self.spec.force,
                                on_note=lambda note: notes.append(note.text))
        self.notes = notes
        return self.opened


def _with_threads(load: LoadOptions) -> LoadOptions:
    """The node's CPUs that Ray gave this worker, as llama.cpp threads, where they are
    fewer than the cores here: `ray start --num-cpus N` says how much of a machine to use
    (several nodes can share one). Otherwise the engine's own default."""
    if load.threads is not None:
        return load
    import ray

    from llmctl.host import usable_cpu_count

    cpus = int(ray.get_runtime_context().get_assigned_resources().get("CPU", 0))
    return replace(load, threads=cpus) if 0 < cpus < usable_cpu_count() else load


def run_on_ray(address: str, prompts: list[Prompt], *, model: str, model_path: str | None,
               engine: str | None, load: LoadOptions, defaults: Defaults, parallel: int,
               force: bool = False, on_note: Callable[[str], None] = lambda _: None
               ) -> Iterator[dict[str, Any]]:
    """Each prompt's result record (the same dicts as llmctl.batch.local.run_prompts yields),
    as they come back from the cluster, every prompt's id exactly once."""
    try:
        import ray
    except ImportError:
        raise EngineUnavailable("ray", "Ray is not installed", INSTALL) from None
    from llmctl.store.names import parse_reference

    reference = str(Path(model_path).expanduser().absolute()) if model_path else model
    parse_reference(reference)  # a malformed reference fails here, before any cluster
    if not prompts:
        return
    with _raylet_messages_to_stderr(ray):
        started = _connect(ray, address)
        try:
            nodes = _nodes(ray)
            # No more sequences than a worker's share of the prompts (`parallel` 0: as
            # many as fit in its memory, up to that share).
            share = math.ceil(len({p.id for p in prompts}) / len(nodes))
            sequences = min(parallel, share) if parallel > 0 else 0
            most = min(load.most_sequences or share, share)
            spec = WorkerSpec(reference, engine, replace(load, sequences=sequences,
                                                         most_sequences=most), force, defaults)
            yield from _Run(ray, nodes, spec, prompts, on_note).records()
        finally:
            if started:
                ray.shutdown()


# -- connecting -----------------------------------------------------------------------------

def _connect(ray: Any, address: str) -> bool:
    """Connect this process to the cluster at `address` (True: it was not connected, and
    is to be shut down at the end). An unusable address is a UsageError."""
    if ray.is_initialized():  # the caller's own connection: use it, leave it open
        return False
    if address == "local":
        _start_local(ray)
        return True
    if address != "auto" and not address.startswith("ray://"):
        _check_reachable(address)
    # Ray before 2.52 has no token authentication, nor its error.
    refused = getattr(ray.exceptions, "AuthenticationError", ())
    hint = ("start one with `ray start --head`, or use --ray local for a cluster on this "
            "machine")
    try:
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
    except refused:
        raise UsageError(f"the Ray cluster at {address} refused this process's token",
                         hint=TOKEN_HINT) from None
    except ConnectionError as exc:
        # Ray says only "Failed to connect"; the refused token is in the error behind it.
        if "InvalidAuthToken" in str(exc.__cause__) or "Unauthenticated" in str(exc.__cause__):
            raise UsageError(f"the Ray cluster at {address} refused this process's token",
                             hint=TOKEN_HINT) from None
        raise UsageError(f"no Ray cluster found at {address}: {_first_line(exc)}",
                         hint=hint) from None
    except ValueError as exc:  # a malformed address; ray:// without ray[client]
        raise UsageError(f"--ray {address}: {_first_line(exc)}", hint="give host:port of "
                         "the head node, auto (RAY_ADDRESS or the cluster started here), or "
                         "local") from None
    except RuntimeError as exc:  # e.g. the GCS answers but the handshake fails
        raise UsageError(f"cannot connect to the Ray cluster at {address}: "
                         f"{_first_line(exc)}", hint=hint) from None
    return True


def _check_reachable(address: str) -> None:
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    if not host or not port.isdigit():
        raise UsageError(f"--ray {address} is not host:port", hint="e.g. --ray "
                         "10.0.0.5:6379, --ray auto or --ray local")
    try:
        socket.create_connection((host, int(port)), timeout=CONNECT_SECONDS).close()
    except OSError as exc:
        raise UsageError(f"no Ray cluster answers at {address} ({exc.strerror or exc})",
                         hint="start one with `ray start --head`, check the head node's "
                         "address and port, or use --ray local") from None


_LOCAL_TOKEN: list[str] = []  # one per process: Ray's token loader caches the first it reads


def _start_local(ray: Any) -> None:
    """A one-node cluster on this machine, for this run: all its CPUs, no dashboard,
    reachable on 127.0.0.1 only, and (as Ray 2.59+ does by default) token authentication,
    with a token kept in this process's environment unless the user has one, so that
    nothing is written to ~/.ray."""
    if not any(os.environ.get(name) for name in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")) \
            and not (Path.home() / ".ray" / "auth_token").exists():
        if not _LOCAL_TOKEN:
            _LOCAL_TOKEN.append(secrets.token_hex(32))
        os.environ["RAY_AUTH_TOKEN"] = _LOCAL_TOKEN[0]
    # Ray warns that it enabled the tokens; the warning is for clusters people keep.
    auth_log = logging.getLogger("ray._private.authentication.authentication_token_setup")
    level = auth_log.level
    auth_log.setLevel(logging.ERROR)
    try:
        with _on_loopback(ray):
            ray.init(address="local", num_cpus=os.cpu_count() or 1, include_dashboard=False,
                     _node_ip_address="127.0.0.1", logging_level=logging.WARNING,
                     log_to_driver=False)
    except Exception as exc:
        raise EngineFailure(f"ray: the local cluster did not start: {_first_line(exc)}"
                            ) from None
    finally:
        auth_log.setLevel(level)


@contextlib.contextmanager
def _on_loopback(ray: Any) -> Iterator[None]:
    """On Linux Ray turns 127.0.0.1 into the machine's outward address (its
    resolve_ip_for_localhost), which would open the throw-away cluster's ports to the
    network. Ray keeps single-node clusters on loopback where it does not support
    multi-node ones (macOS, Windows: ENABLE_RAY_CLUSTER false); a local cluster is one
    node, so it is started as there. Without that switch (another Ray), Ray's default."""
    constants = getattr(getattr(ray, "_private", None), "ray_constants", None)
    if constants is None or not hasattr(constants, "ENABLE_RAY_CLUSTER"):
        yield
        return
    before = constants.ENABLE_RAY_CLUSTER
    constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        constants.ENABLE_RAY_CLUSTER = before


@contextlib.contextmanager
def _raylet_messages_to_stderr(ray: Any) -> Iterator[None]:
    """Ray's driver prints the cluster's error messages ("(raylet) A worker died or was
    killed ...") to stdout, from a thread of its own; llmctl's stdout is the payload (the
    results, with -o -), so they go to stderr while the run lasts."""
    module = getattr(getattr(ray, "_private", None), "worker", None)
    original = getattr(module, "print_to_stdstream", None)
    if original is None:
        yield
        return

    def to_stderr(data: dict[str, Any], *args: Any, **kwargs: Any) -> None:
        original({**data, "is_err": True}, *args, **kwargs)

    module.print_to_stdstream = to_stderr
    try:
        yield
    finally:
        module.print_to_stdstream = original


@dataclass(frozen=True)
class _Node:
    id: str
    address: str
    cpus: int
    gpus: int  # taken too: Ray hides the GPUs a worker did not ask for


def _nodes(ray: Any) -> list[_Node]:
    nodes = [_Node(n["NodeID"], n.get("NodeManagerAddress", "?"), int(n["Resources"]["CPU"]),
                   int(n["Resources"].get("GPU", 0)))
             for n in ray.nodes() if n.get("Alive") and n["Resources"].get("CPU", 0) >= 1]
    if not nodes:
        raise UsageError("the Ray cluster has no node with a CPU to run a model on",
                         hint="add one: ray start --address HEAD:PORT --num-cpus N")
    return nodes


# -- the run ----------------------------------------------------------------------------------

@dataclass(eq=False)
class _Worker:
    handle: Any
    node: _Node
    sequences: int = 0  # known once ready
    waiting: Any = None  # the pending ready() call
    failures: int = 0


@dataclass(eq=False)
class _Chunk:
    worker: _Worker
    open: dict[Id, Prompt] = field(default_factory=dict)  # not answered yet


class _Run:
    """The driver's side: workers, the queue of prompts, the chunks under way."""

    def __init__(self, ray: Any, nodes: list[_Node], spec: WorkerSpec, prompts: list[Prompt],
                 on_note: Callable[[str], None]):
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        self.ray, self.on_note = ray, on_note
        self.total = len({p.id for p in prompts})
        self.queue: deque[Prompt] = deque(prompts)
        self.attempts: dict[Id, int] = {}
        self.done: set[Id] = set()
        self.chunks: dict[Any, _Chunk] = {}  # ObjectRefGenerator -> its chunk
        self.idle: list[_Worker] = []
        self.errors: list[LlmctlError] = []
        self.said: set[str] = set()
        actor = ray.remote(max_restarts=MAX_RESTARTS, max_task_retries=0,
                           concurrency_groups={CONTROL: 1})(ModelWorker)
        run = secrets.token_hex(4)
        # Pinned to its node (not soft): a worker restarted after its process died comes
        # back where its model is stored.
        self.workers = [_Worker(actor.options(
            name=f"{NAME_PREFIX}{run}-{index}", num_cpus=node.cpus, num_gpus=node.gpus,
            scheduling_strategy=NodeAffinitySchedulingStrategy(node.id, soft=False),
        ).remote(spec), node) for index, node in enumerate(nodes)]
        for worker in self.workers:
            worker.waiting = worker.handle.ready.remote()

    def records(self) -> Iterator[dict[str, Any]]:
        try:
            while len(self.done) < self.total:
                waiting = {w.waiting: w for w in self.workers if w.waiting is not None}
                if not waiting and not self.chunks:
                    raise self._nobody_left()
                ready, _ = self.ray.wait([*waiting, *self.chunks], num_returns=1,
                                         timeout=QUIET_SECONDS)
                if not ready:
                    self._say_what_waits(list(waiting.values()))
                for item in ready:
                    if item in self.chunks:
                        yield from self._chunk_moved(item)
                    else:
                        yield from self._worker_ready(waiting[item])
        finally:
            for worker in self.workers:
                with contextlib.suppress(Exception):
                    self.ray.kill(worker.handle, no_restart=True)

    # -- workers

    def _worker_ready(self, worker: _Worker) -> Iterator[dict[str, Any]]:
        from ray.exceptions import RayActorError

        ref, worker.waiting = worker.waiting, None
        try:
            kind, value = self.ray.get(ref)
        except RayActorError as exc:  # its process died while loading
            yield from self._died(worker, [], exc)
            return
        if kind == "error":
            self._drop(worker, _rebuild(value))
            return
        worker.sequences = max(value["sequences"], 1)
        for text in value["notes"]:
            self._note(f"ray: {text}")
        self.on_note(f"ray: worker on {value['node']} (pid {value['pid']}): {value['model']}, "
                     f"{worker.node.cpus} CPU{'s' if worker.node.cpus > 1 else ''}, "
                     f"{worker.sequences} sequence{'s' if worker.sequences > 1 else ''}")
        self._dispatch(worker)

    def _dispatch(self, worker: _Worker) -> None:
        if not self.queue:
            self.idle.append(worker)
            return
        # A share for every worker, the ones still loading too: they are ready soon.
        size = max(worker.sequences, min(CHUNK_ROUNDS * worker.sequences,
                                         math.ceil(len(self.queue) / len(self.workers))))
        prompts = [self.queue.popleft() for _ in range(min(size, len(self.queue)))]
        self.chunks[worker.handle.run.remote(prompts)] = _Chunk(
            worker, {p.id: p for p in prompts})

    def _drop(self, worker: _Worker, error: LlmctlError) -> None:
        self.workers.remove(worker)
        with contextlib.suppress(Exception):
            self.ray.kill(worker.handle, no_restart=True)
        self.errors.append(error)
        if self.workers:
            self._note(f"ray: the worker on {worker.node.address} is left out: "
                       f"{_describe(error)}")

    def _nobody_left(self) -> LlmctlError:
        if self.errors:
            return self.errors[0]
        return EngineFailure("ray: no worker is left to run the prompts")

    def _say_what_waits(self, loading: list[_Worker]) -> None:
        for worker in loading:
            self._note(f"ray: still waiting for the worker on {worker.node.address}: it is "
                       f"loading the model, or the node's {worker.node.cpus} CPUs are taken "
                       "by other work")

    def _note(self, text: str) -> None:
        if text not in self.said:
            self.said.add(text)
            self.on_note(text)

    # -- chunks

    def _chunk_moved(self, stream: Any) -> Iterator[dict[str, Any]]:
        from ray.exceptions import RayError, RayTaskError

        chunk = self.chunks[stream]
        try:
            kind, value = self.ray.get(next(stream))
        except StopIteration:
            del self.chunks[stream]
            self.queue.extendleft(reversed(chunk.open.values()))  # none, unless a bug
            self._dispatch(chunk.worker)
            self._wake_idle()
            return
        except RayTaskError as exc:  # raised outside run()'s own handler: a bug
            raise EngineFailure(f"ray: {_first_line(exc)}") from exc
        except RayError as exc:  # the worker died (its process, its node) with prompts open
            del self.chunks[stream]
            yield from self._died(chunk.worker, list(chunk.open.values()), exc)
            return
        if kind == "error":
            raise _rebuild(value)
        chunk.open.pop(value.get("id"), None)
        if value.get("id") not in self.done:
            self.done.add(value.get("id"))
            yield value

    def _died(self, worker: _Worker, unfinished: list[Prompt], exc: Exception
              ) -> Iterator[dict[str, Any]]:
        """A worker's process died: its prompts go back to the queue, it is asked to be
        ready again (Ray restarts it) unless it is dead for good, and idle workers take the
        prompts meanwhile."""
        from ray.exceptions import ActorDiedError

        worker.failures += 1
        again = []
        for prompt in unfinished:
            if prompt.id in self.done:
                continue
            self.attempts[prompt.id] = self.attempts.get(prompt.id, 0) + 1
            if self.attempts[prompt.id] >= MAX_ATTEMPTS:
                self.done.add(prompt.id)
                yield {"id": prompt.id, "error": f"the Ray worker running this prompt died "
                       f"{MAX_ATTEMPTS} times; run it on its own to see why"}
            else:
                again.append(prompt)
        self.queue.extendleft(reversed(again))
        self.on_note(f"ray: the worker on {worker.node.address} died"
                     + (f"; its {len(again)} unfinished prompt{'s' if len(again) > 1 else ''}"
                        " run again" if again else ""))
        if isinstance(exc, ActorDiedError) or worker.failures > MAX_RESTARTS:
            # Dead for good: its node is gone, its restarts are used up, or it never
            # started (llmctl cannot be imported there).
            never = "; is llmctl[ray] installed on that node?" if not worker.sequences else ""
            self._drop(worker, EngineFailure(f"ray: the worker on {worker.node.address} "
                                             f"died: {_first_line(exc)}{never}"))
        else:
            worker.waiting = worker.handle.ready.remote()  # answered once it is back
        self._wake_idle()

    def _wake_idle(self) -> None:
        while self.idle and self.queue:
            self._dispatch(self.idle.pop())


# -- errors across processes --------------------------------------------------------------

def _portable(exc: Exception) -> tuple[type[LlmctlError], tuple[Any, ...], dict[str, Any]]:
    """An exception as (class, args, attributes): LlmctlErrors whose __init__ takes other
    arguments than their message (InsufficientResources, EngineUnavailable) do not survive
    pickling as they are."""
    if not isinstance(exc, LlmctlError):
        exc = EngineFailure(f"{type(exc).__name__}: {_first_line(exc)}")
    return type(exc), exc.args, dict(vars(exc))


def _rebuild(value: tuple[type[LlmctlError], tuple[Any, ...], dict[str, Any]]
             ) -> LlmctlError:
    kind, args, attributes = value
    exc = kind.__new__(kind)
    Exception.__init__(exc, *args)
    vars(exc).update(attributes)
    return exc


def _describe(exc: LlmctlError) -> str:
    hint = getattr(exc, "hint", None)
    return f"{exc}; {hint}" if hint else str(exc)


def _first_line(exc: BaseException, limit: int = 300) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = lines[0] if lines else type(exc).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."
