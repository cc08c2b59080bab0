"""Executors and the DAG scheduler: local processes or Ray.

An executor only knows how to start ``plan.execute(payload)`` somewhere and hand back a
``concurrent.futures.Future``; the scheduler (``run_plan``) is written once on top of that:
- ``LocalExecutor(workers, threads)``: a pool of ``workers`` processes (spawned, so each has its own torch
  thread pool), each node running with ``threads`` torch threads; ``workers=1`` runs in this process.
- ``RayExecutor(address, threads)``: each node is a Ray task asking for ``threads`` CPUs; Ray decides where it
  runs. The store's directory must be on a filesystem every Ray node sees (as on any shared-disk cluster).

The scheduler submits every node whose dependencies are complete, up to the executor's slots, and records each
outcome in the store. A failed node is reported and its dependants are skipped; everything else continues.
Rerunning after an interruption reuses every complete node (a run whose sidecar says ``done`` with the planned
id, an analysis whose result file exists) and resumes partial runs from their last checkpoint.

Stopping (Ctrl-C, SIGTERM: the CLI turns both into KeyboardInterrupt): ``run_plan`` ends the nodes in flight
(``executor.abort``: the pool's workers, which ignore SIGINT, get SIGTERM, which in a worker unwinds the node so
its temporary files and run lock go, then SIGKILL after a grace period; Ray tasks are cancelled, then
force-cancelled after the same grace, and a Ray instance started here is shut down) and marks the runs this plan
held ``interrupted`` in the store (``done`` if one finished meanwhile); the next start resumes them.

A Ray address is checked before ``ray.init``: a TCP connection, then the gRPC call ``ray.init`` makes first
(``GetClusterId``) must be answered by a gRPC server within a few seconds. Left alone, ``ray.init`` retries an
unreachable GCS 20 times for about 35 s each; for an address that passed the check it runs with bounded retries.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass, field

from wrapperlab.experiments.plan import Node, Plan, execute
from wrapperlab.experiments.store import Store


class _WorkerStop(SystemExit):
    """SIGTERM in a pool worker: unwinds the node (``finally`` blocks remove temporary files, release the run
    lock); an idle worker exits quietly (SystemExit prints no traceback)."""


def _worker_init() -> None:
    """Pool workers leave Ctrl-C to the main process (a terminal sends SIGINT to the whole process group), stop on
    its SIGTERM, and stop by themselves when it dies without sending one."""
    def on_term(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # one unwind; the main process SIGKILLs after its grace
        raise _WorkerStop(128 + signum)

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, on_term)
    parent = os.getppid()

    def watch_parent() -> None:  # a main process killed outright (SIGKILL) cannot end its workers: they end
        while True:             # themselves, through the same SIGTERM path, instead of training on as orphans
            time.sleep(1.0)
            if os.getppid() != parent:
                os.kill(os.getpid(), signal.SIGTERM)
                return

    threading.Thread(target=watch_parent, name="wrapperlab-parent-watch", daemon=True).start()


def _execute_in_worker(payload: dict) -> dict:
    try:
        return execute(payload)
    except _WorkerStop as e:  # cleanup done while it unwound: leave now, not back to the pool's queue
        os._exit(e.code)


@contextmanager
def _sigint_ignored() -> Iterator[None]:
    """SIGINT ignored in this process for the moment, so a process started meanwhile inherits the disposition
    (Python keeps an ignored SIGINT ignored). A no-op outside the main thread."""
    try:
        old = signal.signal(signal.SIGINT, signal.SIG_IGN)
    except ValueError:
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)


class LocalExecutor:
    name = "local"
    grace_s = 5.0  # how long stopped workers get to unwind before SIGKILL

    def __init__(self, workers: int = 1, threads: int = 0):
        if workers < 1:
            raise ValueError(f"workers: must be >= 1 (got {workers})")
        self.slots, self.threads = workers, threads
        self._pool = None
        if workers > 1:
            import multiprocessing as mp

            self._pool = ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=_worker_init)

    def submit(self, payload: dict) -> Future:
        if self._pool is not None:
            with _sigint_ignored():  # workers are spawned here: they start with Ctrl-C ignored, even mid-import
                return self._pool.submit(_execute_in_worker, payload)
        fut: Future = Future()
        try:
            fut.set_result(execute(payload))
        except Exception as e:  # noqa: BLE001 - recorded by the scheduler
            fut.set_exception(e)
        return fut

    def abort(self, futures: list[Future] | None = None) -> None:
        """End every worker process now: SIGTERM (each unwinds its node), SIGKILL after ``grace_s``. Idempotent."""
        pool, self._pool = self._pool, None
        if pool is None:
            return
        procs = [p for p in (getattr(pool, "_processes", None) or {}).values() if p is not None]
        pool.shutdown(wait=False, cancel_futures=True)
        for p in procs:
            if p.is_alive():
                p.terminate()
        deadline = time.monotonic() + self.grace_s
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(2.0)

    def shutdown(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None


class RayExecutor:
    """Ray tasks (``pip install wrapperlab[ray]``). ``address``: a running cluster ("auto", "HOST:PORT",
    "ray://HOST:PORT"), or None to start a local Ray instance for this process (``RAY_ADDRESS`` counts as an
    address, as in ``ray.init``)."""

    name = "ray"
    grace_s = 5.0  # how long cancelled tasks get to unwind before they are killed

    def __init__(self, address: str | None = None, threads: int = 1, workers: int | None = None):
        import importlib.util

        if importlib.util.find_spec("ray") is None:
            raise RuntimeError("executor ray: Ray is not installed; pip install 'wrapperlab[ray]'")
        self._refs: dict[Future, object] = {}
        self._started = False
        target, shown = _ray_target(address)
        remote = target not in (None, "local")
        # Ray reads its GCS connection settings when it is imported: bound them first (a value the user set wins)
        with _env_defaults(_RAY_CONNECT_ENV if remote and "://" not in target else {}):
            import ray

            self._ray = ray
            if not ray.is_initialized():
                _ray_init(ray, address, target, shown)
                self._started = True
        try:
            self.threads = max(1, threads)
            cpus = int(ray.cluster_resources().get("CPU", 1))
            self.slots = workers or max(1, cpus // self.threads)
            self._remote = ray.remote(num_cpus=self.threads, max_retries=0)(execute)
        except BaseException:
            self.shutdown()
            raise

    def submit(self, payload: dict) -> Future:
        ref = self._remote.remote(payload)
        fut = ref.future()
        self._refs[fut] = ref
        return fut

    def abort(self, futures: list[Future] | None = None) -> None:
        """Cancel the tasks in flight (KeyboardInterrupt in the task, so it unwinds and removes its temporary
        files), force-cancel (kill) those still running after ``grace_s``, then shut down a Ray instance started
        here. Idempotent."""
        refs, self._refs = self._refs, {}
        live = {fut: ref for fut, ref in refs.items() if not fut.done()}
        for force in (False, True):
            for ref in live.values():
                try:
                    self._ray.cancel(ref, force=force)
                except Exception:  # noqa: BLE001 - already finished or the cluster is gone: nothing to cancel
                    pass
            if not force and live:
                wait(list(live), timeout=self.grace_s)
                live = {fut: ref for fut, ref in live.items() if not fut.done()}
            if not live:
                break
        self.shutdown()

    def shutdown(self) -> None:
        if self._started:
            self._started = False
            _ray_shutdown(self._ray)


# ----------------------------------------------------------------------------- reaching a Ray cluster
RAY_CHECK_TIMEOUT_S = 3.0
# ray.init retries the GCS connection 20 times, each up to ~35 s (measured with Ray 2.60 against an address
# where nothing listens: 12 min of silence). Set before Ray is imported (it reads them then), these bound it to
# ~25 s, should an address that answered our check still fail.
_RAY_CONNECT_ENV = {"RAY_NUM_REDIS_GET_RETRIES": "2", "RAY_gcs_rpc_server_connect_timeout_s": "3",
                    "RAY_py_gcs_connect_timeout_s": "5"}


def _ray_target(address: str | None) -> tuple[str | None, str | None]:
    """The address ``ray.init(address)`` will use (``RAY_ADDRESS`` replaces None and "auto", as in Ray) and how
    to name it in a message."""
    env_addr = os.environ.get("RAY_ADDRESS") or None
    target = env_addr if env_addr and address in (None, "auto") else address
    return target, (target if target == address else f"{target} (from RAY_ADDRESS)")


@contextmanager
def _env_defaults(values: dict[str, str]) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in values}
    for k, v in values.items():
        os.environ.setdefault(k, v)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _ray_init(ray, address: str | None, target: str | None, shown: str | None) -> None:
    """``ray.init`` that fails in seconds with one line naming the address when no cluster answers there, and that
    leaves the caller's SIGINT/SIGTERM handlers in place (ray.init installs a SIGTERM handler that exits without
    cleanup). While a local instance starts, a stop signal waits for the start to finish (seconds; interrupted
    half-way, ray.init leaves processes behind that no shutdown reaches), then Ray is shut down and the signal is
    delivered to the caller's handler."""
    remote = target not in (None, "local")
    if remote:
        check_ray_address(target, shown)
    old_term = signal.getsignal(signal.SIGTERM)
    pending: list[int] = []
    try:
        with _ray_keeps_our_signals(ray, pending, defer=not remote):
            ray.init(address=address, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    except BaseException as e:
        _quiet(lambda: _ray_shutdown(ray))  # whatever ray.init had started goes with it
        if pending:  # a held Ctrl-C (which may also have reached Ray's processes) explains the failure
            signal.raise_signal(pending[0])
        if isinstance(e, SystemExit) and e.code == signal.SIGTERM and callable(old_term):
            # SIGTERM reached ray.init's own handler after all: hand it to the caller's
            signal.signal(signal.SIGTERM, old_term)
            old_term(signal.SIGTERM, None)
        if not isinstance(e, Exception):
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        where = f"a Ray cluster at {shown}" if remote else "a local Ray instance"
        raise RuntimeError(f"executor ray: cannot connect to {where} ({first})") from None
    finally:
        if callable(old_term) and signal.getsignal(signal.SIGTERM) is not old_term:
            try:
                signal.signal(signal.SIGTERM, old_term)
            except ValueError:  # not the main thread: ray.init installed nothing either
                pass
    if pending:  # a stop signal came while the instance started: stop it, then let the caller's handler act
        _quiet(lambda: _ray_shutdown(ray))
        signal.raise_signal(pending[0])


@contextmanager
def _ray_keeps_our_signals(ray, pending: list[int], defer: bool) -> Iterator[None]:
    """Keep ray.init from replacing the SIGTERM handler; with ``defer``, hold SIGINT/SIGTERM (appended to
    ``pending``) until the block ends. A second signal is not held: it goes to the caller's handler at once."""
    utils = getattr(getattr(ray, "_private", None), "utils", None)
    real_set = getattr(utils, "set_sigterm_handler", None)
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

    def hold(signum, frame):
        if not pending:
            pending.append(signum)
            return
        for s, h in old.items():  # insisted: the caller's handlers act now
            signal.signal(s, h if h is not None else signal.SIG_DFL)
        signal.raise_signal(signum)

    if real_set is not None:
        utils.set_sigterm_handler = lambda handler: None
    if defer:
        for s in old:
            signal.signal(s, hold)
    try:
        yield
    finally:
        if real_set is not None:
            utils.set_sigterm_handler = real_set
        for s, h in old.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)


def _ray_shutdown(ray) -> None:
    """``ray.shutdown``, then the SIGTERM handler again: Ray's shutdown puts back the default action at the C level
    (Python's ``getsignal`` still shows the old handler, so a later SIGTERM would kill without cleanup)."""
    try:
        ray.shutdown()
    finally:
        if threading.current_thread() is threading.main_thread():
            handler = signal.getsignal(signal.SIGTERM)
            if handler is not None:
                signal.signal(signal.SIGTERM, handler)


def _quiet(fn: Callable[[], object]) -> None:
    try:
        fn()
    except Exception:  # noqa: BLE001 - best-effort cleanup on a path that is already failing
        pass


def check_ray_address(address: str, shown: str | None = None, timeout: float = RAY_CHECK_TIMEOUT_S) -> None:
    """Raise RuntimeError (one line naming the address) unless a Ray GCS (or Ray Client server, for ray://)
    answers at ``address`` within a few seconds. "auto" looks for a running local cluster the way Ray does."""
    shown = shown or address
    if address == "auto":
        try:
            from ray._private.services import canonicalize_bootstrap_address

            found = canonicalize_bootstrap_address("auto")
        except ConnectionError:
            raise RuntimeError("executor ray: --ray-address auto: no running Ray cluster found on this machine "
                               "(start one with `ray start --head`, or leave out --ray-address to start a local "
                               "Ray instance)") from None
        except Exception:  # noqa: BLE001 - Ray's private helper moved: let ray.init look
            return
        if not found:
            return
        address = found
    hostport = address.split("://", 1)[1] if "://" in address else address
    host, sep, port_s = hostport.rstrip("/").rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port_s.isdigit() or not 0 < int(port_s) < 65536:
        if "://" in address and not sep and hostport:
            host, port_s = hostport.rstrip("/"), "10001"  # Ray Client's default port
        else:
            raise RuntimeError(f"executor ray: --ray-address must be HOST:PORT, ray://HOST:PORT or auto "
                               f"(got {shown!r})")
    port = int(port_s)
    candidates = [host]
    try:  # ray.init connects to the node's own IP instead of a loopback address: check that one too
        from ray._private.services import resolve_ip_for_localhost

        alt = resolve_ip_for_localhost(host)
        if alt and alt != host:
            candidates.append(alt)
    except Exception:  # noqa: BLE001
        pass
    why = ""
    for h in candidates:
        why = _probe_gcs(h, port, timeout, tls=os.environ.get("RAY_USE_TLS", "0") not in ("", "0"),
                         call="://" not in address)
        if not why:
            return
    raise RuntimeError(f"executor ray: cannot reach a Ray cluster at {shown} ({why})")


def _probe_gcs(host: str, port: int, timeout: float, tls: bool = False, call: bool = True) -> str:
    """'' when a Ray GCS at HOST:PORT answers, within ``timeout`` seconds, the gRPC call ``ray.init`` makes first
    (``NodeInfoGcsService/GetClusterId``, spoken as plain HTTP/2: Ray does not install grpcio) with HTTP status 200;
    otherwise why not, in a few words. A TCP connection alone proves little: some networks accept every connection
    at a proxy. With TLS (``RAY_USE_TLS``) only the TCP connection is checked; ``call=False`` (a Ray Client
    server) checks that HTTP/2 is spoken."""
    deadline = time.monotonic() + timeout
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except socket.gaierror:
        return f"unknown host {host!r}"
    except TimeoutError:
        return f"no answer within {timeout:g} s"
    except ConnectionRefusedError:
        return "connection refused"
    except OSError as e:
        return e.strerror or type(e).__name__
    if tls:
        sock.close()
        return ""
    authority = f"{host}:{port}".encode()
    headers = b"".join(_hpack_literal(k, v) for k, v in (
        (b":method", b"POST"), (b":scheme", b"http"), (b":path", _GCS_PROBE_PATH), (b":authority", authority),
        (b"content-type", b"application/grpc"), (b"te", b"trailers")))
    # HEADERS (END_HEADERS) then DATA (END_STREAM) holding an empty gRPC message: an empty request is valid
    out = _H2_PREFACE + _h2_frame(0x1, 0x4, 1, headers) + _h2_frame(0x0, 0x1, 1, b"\x00\x00\x00\x00\x00")
    closed = "something listens there but closed the connection; not a Ray GCS"
    try:
        with sock:
            sock.sendall(out if call else _H2_PREFACE)
            while True:
                head = _recv_exact(sock, 9, deadline)
                if head is None:
                    return closed
                length, ftype, flags = int.from_bytes(head[:3], "big"), head[3], head[4]
                stream = int.from_bytes(head[5:9], "big") & 0x7FFFFFFF
                body = _recv_exact(sock, length, deadline) if length else b""
                if body is None:
                    return closed
                if not call:
                    return "" if ftype == 0x4 else "something listens there but does not speak HTTP/2"
                if ftype == 0x4 and not flags & 0x1:  # the server's SETTINGS: acknowledge them
                    sock.sendall(_h2_frame(0x4, 0x1, 0, b""))
                elif ftype == 0x7:
                    return "something listens there but refused a gRPC call (GOAWAY); not a Ray GCS"
                elif stream == 1 and ftype == 0x3:
                    return "something listens there but reset a gRPC call; not a Ray GCS"
                elif stream == 1 and ftype == 0x0:
                    return ""
                elif stream == 1 and ftype == 0x1:
                    status = _hpack_status(_h2_unpad(body, flags, headers=True))
                    if status is None or status == 200:
                        return ""
                    return f"something listens there but answered HTTP {status} to a gRPC call; not a Ray GCS"
    except TimeoutError:
        return f"something listens there but did not answer within {timeout:g} s; not a Ray GCS"
    except OSError as e:
        return f"{e.strerror or type(e).__name__}; not a Ray GCS"


_GCS_PROBE_PATH = b"/ray.rpc.NodeInfoGcsService/GetClusterId"
_HPACK_STATUS = {8: 200, 9: 204, 10: 206, 11: 304, 12: 400, 13: 404, 14: 500}  # HPACK static table (RFC 7541)


def _h2_frame(ftype: int, flags: int, stream: int, payload: bytes) -> bytes:
    """An HTTP/2 frame (RFC 9113 §4.1): 24-bit length, type, flags, 31-bit stream id, payload."""
    return len(payload).to_bytes(3, "big") + bytes([ftype, flags]) + stream.to_bytes(4, "big") + payload


# the client connection preface: the magic line, then an empty SETTINGS frame (RFC 9113 §3.4)
_H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + _h2_frame(0x4, 0x0, 0, b"")


def _hpack_int(value: int, prefix_bits: int, first: int = 0) -> bytes:
    """An HPACK integer (RFC 7541 §5.1) in a ``prefix_bits`` prefix whose other bits are ``first``."""
    top = (1 << prefix_bits) - 1
    if value < top:
        return bytes([first | value])
    out, value = [first | top], value - top
    while value >= 128:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    return bytes(out + [value])


def _hpack_literal(name: bytes, value: bytes) -> bytes:
    """A literal header field without indexing, with a literal name, no Huffman coding (RFC 7541 §6.2.2)."""
    return b"\x00" + _hpack_int(len(name), 7) + name + _hpack_int(len(value), 7) + value


def _h2_unpad(body: bytes, flags: int, headers: bool = False) -> bytes:
    """The header block (or data) of a frame without its padding (PADDED) and priority fields (PRIORITY)."""
    if flags & 0x8 and body:
        pad = body[0]
        body = body[1:len(body) - pad]
    if headers and flags & 0x20:
        body = body[5:]
    return body


def _hpack_status(block: bytes) -> int | None:
    """The :status of a response header block whose first field gives it (as servers do): an indexed field of
    the static table, or a literal whose name is the static table's :status; None otherwise (RFC 7541 §6)."""
    if not block:
        return None
    b = block[0]
    if b & 0x80:  # indexed header field
        return _HPACK_STATUS.get(b & 0x7F)
    name = b & 0x3F if b & 0x40 else b & 0x0F  # literal with incremental indexing, or without / never indexed
    if 8 <= name <= 14 and len(block) > 1 and not block[1] & 0x80:  # name :status, value not Huffman coded
        text = block[2:2 + (block[1] & 0x7F)].decode("ascii", "replace")
        return int(text) if text.isdigit() else None
    return None


def _recv_exact(sock: socket.socket, n: int, deadline: float) -> bytes | None:
    """Exactly ``n`` bytes, or None if the peer closed first; ``TimeoutError`` when the deadline passes."""
    buf = b""
    while len(buf) < n:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError
        sock.settimeout(left)
        chunk = sock.recv(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return buf


@dataclass
class Outcome:
    planned: int = 0
    reused: int = 0
    executed: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    wall_s: float = 0.0

    def to_dict(self) -> dict:
        return {"planned": self.planned, "reused": self.reused, "executed": len(self.executed),
                "failed": len(self.failed), "skipped": len(self.skipped), "wall_s": round(self.wall_s, 1),
                "failures": self.failed}


def run_plan(plan: Plan, executor, store: Store, *, log: Callable[[str], None] | None = None,
             progress: bool = True) -> Outcome:
    """Execute every incomplete node of ``plan`` in dependency order; returns what happened."""
    log = log or (lambda _m: None)
    t0 = time.perf_counter()
    nodes = plan.nodes
    out = Outcome(planned=len(nodes))
    stale = store.reap_stale()
    if stale:
        log(f"{len(stale)} run(s) left 'running' by a process that died are marked interrupted and will resume")
    done: set[str] = set()
    for key, n in nodes.items():
        if n.complete():
            done.add(key)
            _record(store, n, None)
    out.reused = len(done)
    todo = [k for k in nodes if k not in done]
    total = sum(nodes[k].cost for k in todo) or 1.0
    log(f"{len(nodes)} nodes planned ({len(plan.runs())} runs, {len(plan.analyses())} analyses): "
        f"{len(done)} already complete, {len(todo)} to execute on {executor.name} "
        f"({executor.slots} slot{'s' if executor.slots > 1 else ''})")
    level = _bottom_levels(nodes)
    bar = _PlanBar(progress, total)
    running: dict[Future, str] = {}
    held: set[str] = set()  # run nodes marked running in the store whose outcome is not recorded yet
    failed: set[str] = set()
    spent, busy = 0.0, 0.0  # estimated work finished; worker-seconds it took
    try:
        while todo or running:
            # critical path first: among ready nodes, the one with the most estimated work below it (itself plus
            # its longest chain of dependants) starts first, so pretraining and revival do not wait behind
            # short analyses
            for key in sorted(todo, key=lambda k: -level[k]):
                if len(running) >= executor.slots:
                    break
                n = nodes[key]
                if any(d in failed for d in n.deps):
                    todo.remove(key)
                    failed.add(key)
                    out.skipped.append(key)
                    log(f"skipped {n.label}: a dependency failed")
                    continue
                if all(d in done for d in n.deps):
                    todo.remove(key)
                    if n.kind == "run":
                        held.add(key)
                        store.set_status(n.run_id, "running", run_dir=n.run_dir, stage=n.side["stage"],
                                         label=n.label, config=n.side["config"],
                                         parent_id=nodes[n.deps[0]].run_id if n.deps else None)
                    bar.describe(n.label)
                    running[executor.submit(n.payload)] = key
            if not running:
                continue
            finished, _ = wait(list(running), return_when=FIRST_COMPLETED)
            for fut in finished:
                key = running.pop(fut)
                n = nodes[key]
                spent += n.cost
                try:
                    res = fut.result()
                except Exception as e:  # noqa: BLE001 - one failed node must not stop the grid
                    msg = str(e).splitlines()[0] if str(e) else type(e).__name__
                    failed.add(key)
                    out.failed[key] = f"{type(e).__name__}: {msg}"
                    if n.kind == "run":
                        store.index_run(n.run_dir)  # what the last checkpoint holds, if any
                        store.set_status(n.run_id, "failed")
                        held.discard(key)
                    log(f"FAILED {n.label}: {type(e).__name__}: {msg}")
                    continue
                if n.kind == "run" and res.get("status") != "done":
                    failed.add(key)
                    out.failed[key] = f"status {res.get('status')}"
                    store.index_run(n.run_dir)
                    held.discard(key)
                    log(f"FAILED {n.label}: ended with status {res.get('status')}")
                    continue
                done.add(key)
                out.executed.append(key)
                _record(store, n, res)
                held.discard(key)
                el = time.perf_counter() - t0
                busy += float(res.get("wall_s", 0.0))
                # work per worker-second so far, times the slots: robust to which nodes happened to finish first
                eta = (total - spent) * busy / spent / executor.slots if spent > 0 and busy > 0 else float("nan")
                log(f"[{len(out.executed)}/{len(nodes) - out.reused}] {n.label}: done in {res.get('wall_s', 0):.0f} s "
                    f"(elapsed {el:.0f} s, plan ETA {eta:.0f} s)")
                bar.advance(n.cost)
    except BaseException:  # Ctrl-C / SIGTERM (as KeyboardInterrupt), or the store failed: stop what runs
        bar.close()
        _stop_in_flight(executor, store, nodes, list(running), held, log)
        raise
    bar.close()
    out.wall_s = time.perf_counter() - t0
    return out


def _stop_in_flight(executor, store: Store, nodes: dict[str, Node], futures: list[Future], held: set[str],
                    log: Callable[[str], None]) -> None:
    """End the nodes in flight (their worker processes or Ray tasks), then mark each run this plan had marked
    running as interrupted (``done`` if it finished before the stop): the next start resumes it from its last
    checkpoint. Errors here are swallowed so that the interrupt itself reaches the user."""
    abort = getattr(executor, "abort", None)
    try:
        if abort is not None:
            abort(futures)
        else:
            for fut in futures:
                fut.cancel()
    except Exception as e:  # noqa: BLE001
        log(f"while stopping the executor: {type(e).__name__}: {e}")
    for key in sorted(held):
        n = nodes[key]
        try:
            row = store.index_run(n.run_dir)  # the last checkpoint's step and metrics, if any
            if row is None or row.get("status") != "done":
                store.set_status(n.run_id, "interrupted")
        except Exception as e:  # noqa: BLE001
            log(f"could not mark {n.label} interrupted in the store ({e}); the next start does it")


def _bottom_levels(nodes: dict[str, Node]) -> dict[str, float]:
    """Each node's cost plus the costliest chain of nodes that depend on it (nodes are in topological order)."""
    children: dict[str, list[str]] = {k: [] for k in nodes}
    for k, n in nodes.items():
        for d in n.deps:
            children[d].append(k)
    level: dict[str, float] = {}
    for k in reversed(list(nodes)):
        level[k] = nodes[k].cost + max((level[c] for c in children[k]), default=0.0)
    return level


def _record(store: Store, n: Node, res: dict | None) -> None:
    if n.kind == "run":
        store.index_run(n.run_dir, label=n.label)
        return
    store.add_result(n.run_id, n.group, n.key, n.payload["result"], {"settings": n.payload["settings"]})


class _PlanBar:
    """One progress bar for the whole plan, weighted by each node's estimated cost, with ETA."""

    def __init__(self, enabled: bool, total: float):
        self.p = None
        if enabled:
            from rich.console import Console
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

            self.p = Progress(TextColumn("[bold]plan"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
                              TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                              TextColumn("{task.fields[now]}"), console=Console(stderr=True))
            self.p.start()
            self.t = self.p.add_task("plan", total=total, now="")

    def describe(self, label: str) -> None:
        if self.p is not None:
            self.p.update(self.t, now=label[:60])

    def advance(self, cost: float) -> None:
        if self.p is not None:
            self.p.advance(self.t, cost)

    def close(self) -> None:
        if self.p is not None:
            self.p.stop()


def make_executor(kind: str, workers: int = 1, threads: int = 0, address: str | None = None):
    if kind == "local":
        return LocalExecutor(workers, threads)
    if kind == "ray":
        return RayExecutor(address, threads or 1, workers if workers > 1 else None)
    raise ValueError(f"executor: unknown {kind!r}; choose local or ray")
