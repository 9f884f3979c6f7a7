"""A model split over machines: llama.cpp's RPC backend, with the devices registered by ggufloop.

On another machine, ``ggufloop rpc-server`` runs llama.cpp's ``rpc-server`` (built with the
backend, from the same patched tree; ``server_binary``), which offers that machine's devices over
TCP. Here, ``LoopedLlama(..., rpc="host:port,host:port")`` (the commands' ``--rpc``) connects to
them and gives the model an explicit device list: the remote devices first, in the order given,
then this machine's GPUs, as llama.cpp's own ``--rpc`` orders them. llama.cpp then assigns the
layers: the first ``L + 1 - n_gpu_layers`` stay on this machine's CPU, the rest (and the output
layer, when n_gpu_layers > L) are split over the device list by free memory or by
``tensor_split``. The patched backend gives every virtual layer its physical layer's device, so
a looped block's KV cache and compute follow its weights across machines.

llama-cpp-python deprecated its ``rpc_servers`` parameter and ignores it, so the devices come
from ggml's backend API: ``ggml_backend_rpc_add_server`` (found with
``ggml_backend_reg_get_proc_address`` on the "RPC" backend) returns a backend registry with the
server's devices, and the model receives them through ``llama_model_params.devices``. They are
not added to ggml's global registry, so other models of the process stay local.

Two behaviours of llama.cpp's RPC client shape this module:

- It aborts the process (``GGML_ABORT``) when it cannot connect, when the handshake fails and
  when a server stops answering mid-computation: there is no error code to return. Every server
  is therefore probed here first (a TCP connection and the protocol's HELLO, with a timeout), so
  a wrong address, a stopped server or another version is a one-line error before llama.cpp
  touches it. A server lost later cannot be recovered from (the model's weights on it are gone);
  ``install_abort_handler`` turns llama.cpp's abort into one ``error:`` line naming the servers
  that no longer answer, and exit status 1, instead of SIGABRT and a backtrace; it starts on a
  line of its own even when a streamed answer was cut mid-line (``streamed``).
- An rpc-server serves one client connection at a time; a second client waits. The probe's
  timeout says so instead of hanging.
- It sets no keep-alive or timeout on its sockets, so a server whose machine vanished would be
  waited for forever; on Linux, ``watch_connections`` sets them on its connections.

The protocol has no authentication and no encryption: anyone who can reach a server's port can
allocate its memory and run computations on it. Keep servers on loopback or a private network.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import socket
import stat
import struct
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from .errors import BackendError, OptionError, RpcError

DEFAULT_PORT = 50052
# the protocol of the pinned llama.cpp (ggml/include/ggml-rpc.h): the client refuses another major
# version or a newer minor one
PROTOCOL_MAJOR, PROTOCOL_MINOR = 7, 0
_CMD_HELLO = 14
_CONN_CAPS_SIZE = 24  # ggml/src/ggml-rpc/transport.h; zeros: plain TCP
PROBE_TIMEOUT_S = 10.0
# TCP keep-alive on llama.cpp's connections (Linux): a server whose machine vanished without closing
# the connection is found within about idle + interval * count seconds, and data it never
# acknowledges fails the connection after USER_TIMEOUT_MS; either ends in the one-line error below
KEEPALIVE_IDLE_S, KEEPALIVE_INTERVAL_S, KEEPALIVE_COUNT = 10, 5, 3
USER_TIMEOUT_MS = 30_000

SECURITY_WARNING = (
    "warning: llama.cpp's RPC protocol has no authentication and no encryption: anyone who can reach "
    "this port can use this machine's memory and compute. Never expose it to an open network; bind it to "
    "loopback or a private network you trust."
)


@dataclass(frozen=True)
class Endpoint:
    """An rpc-server's address, as llama.cpp takes it (``host:port``; no IPv6 literals)."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"

    @classmethod
    def parse(cls, text: str) -> Endpoint:
        """``host:port``; OptionError (one line) for a URL, an IPv6 literal or a host no resolver takes."""
        text = text.strip()
        shown = repr(text) if len(text) <= 80 else f"{text[:80]!r}... ({len(text)} characters)"
        expected = f"expected HOST:PORT, e.g. 192.168.1.10:{DEFAULT_PORT}"
        if "://" in text or "/" in text:
            raise OptionError(f"bad RPC server {shown}: {expected}, not a URL (no scheme, no path)")
        host, sep, port = text.rpartition(":")
        if not sep or not host or not port.isdigit() or len(port) > 5 or not 0 < int(port) < 65536:
            raise OptionError(f"bad RPC server {shown}: {expected}")
        if ":" in host or host.startswith("["):
            raise OptionError(f"bad RPC server {shown}: llama.cpp's RPC client takes no IPv6 literals")
        try:
            ascii_host = host.encode("idna")  # what the resolver is given: labels of 1 to 63 characters
        except UnicodeError:
            ascii_host = b""
        if not ascii_host or len(ascii_host) > 253:
            raise OptionError(
                f"bad RPC server {shown}: {host[:40]!r}{'...' if len(host) > 40 else ''} is not a host name "
                "(at most 253 characters, in labels of 1 to 63 between dots)"
            )
        return cls(host, int(port))


def parse_servers(servers: str | Sequence[str]) -> tuple[Endpoint, ...]:
    """``"a:1,b:2"`` or ``["a:1", "b:2"]`` -> the endpoints, in order, each once."""
    items = servers.split(",") if isinstance(servers, str) else list(servers)
    out = tuple(Endpoint.parse(s) for s in items if s.strip())
    if not out:
        raise OptionError("no RPC server given: expected HOST:PORT[,HOST:PORT...]")
    seen = {e for e in out}
    if len(seen) != len(out):
        raise OptionError(f"an RPC server is given twice in {','.join(map(str, out))}")
    return out


def parse_tensor_split(text: str) -> tuple[float, ...]:
    """``"3,1"`` -> (3.0, 1.0): each device's share of the offloaded layers, in device order."""
    try:
        parts = tuple(float(p) for p in text.split(","))
    except ValueError:
        raise OptionError(f"bad --tensor-split {text!r}: expected comma-separated numbers such as 3,1") from None
    if any(not p >= 0 or p == float("inf") for p in parts) or not sum(parts) > 0:
        raise OptionError(f"bad --tensor-split {text!r}: the shares must be finite, >= 0, and not all 0")
    return parts


@dataclass(frozen=True)
class Placement:
    """Where a model's layers run, as the options ``--rpc``, ``--tensor-split`` and ``-ngl`` ask.

    ``n_gpu_layers`` counts the layers taken off the local CPU (llama.cpp's "GPU layers", which
    include remote devices; the output layer counts as one more, -1 is all): the last ones go to the
    devices, the first stay on this machine's CPU. With RPC servers and nothing said, it is -1.
    """

    rpc: tuple[str, ...] = ()
    n_gpu_layers: int = 0
    tensor_split: tuple[float, ...] | None = None

    @classmethod
    def from_options(cls, rpc: str | None, tensor_split: str | None, n_gpu_layers: int | None) -> Placement:
        servers = tuple(str(e) for e in parse_servers(rpc)) if rpc is not None else ()
        if n_gpu_layers is None:
            n_gpu_layers = -1 if servers else 0
        return cls(servers, n_gpu_layers, parse_tensor_split(tensor_split) if tensor_split is not None else None)

    def llama_kwargs(self) -> dict:
        """LoopedLlama's keyword arguments for this placement."""
        kwargs: dict = {"n_gpu_layers": self.n_gpu_layers}
        if self.rpc:
            kwargs["rpc"] = ",".join(self.rpc)
        if self.tensor_split is not None:
            kwargs["tensor_split"] = list(self.tensor_split)
        return kwargs


@dataclass(frozen=True)
class Device:
    """A device a model can offload layers to: a remote one (``endpoint`` set) or a local GPU."""

    name: str  # llama.cpp's: RPC0, RPC1, ... (numbered in the order of registration), CUDA0, ...
    description: str
    free: int  # bytes, as the device reports them
    total: int
    endpoint: str | None
    handle: int  # ggml_backend_dev_t

    def __str__(self) -> str:
        where = self.endpoint or "local"
        return f"{self.name} ({where}, {self.free / 2**30:.1f} of {self.total / 2**30:.1f} GiB free)"


# -- probing ------------------------------------------------------------------------------------


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("the server closed the connection")
        data += chunk
    return data


def probe(endpoint: Endpoint, timeout: float = PROBE_TIMEOUT_S) -> tuple[int, int, int]:
    """Connect and say HELLO as llama.cpp's client does; returns the server's protocol version.
    RpcError (one line) when it cannot be reached, does not answer, or speaks another version."""
    hello = bytes([_CMD_HELLO]) + struct.pack("<Q", _CONN_CAPS_SIZE) + bytes(_CONN_CAPS_SIZE)
    try:
        with socket.create_connection((endpoint.host, endpoint.port), timeout=timeout) as sock:
            sock.sendall(hello)
            (size,) = struct.unpack("<Q", _recv_exact(sock, 8))
            if size != 4 + _CONN_CAPS_SIZE:
                raise RpcError(f"{endpoint} is not an rpc-server of this llama.cpp (its HELLO answer has {size} bytes)")
            major, minor, patch = _recv_exact(sock, size)[:3]
    except TimeoutError:
        raise RpcError(
            f"the RPC server {endpoint} did not answer within {timeout:g} s (an rpc-server serves one client "
            "at a time: is another one connected to it?)"
        ) from None
    except OSError as err:
        raise RpcError(f"cannot reach the RPC server {endpoint}: {err.strerror or err}") from None
    except UnicodeError:  # a host the resolver cannot encode (Endpoint.parse refuses those first)
        raise RpcError(f"cannot reach the RPC server {endpoint}: its host is not a host name") from None
    if major != PROTOCOL_MAJOR or minor > PROTOCOL_MINOR:
        raise RpcError(
            f"the RPC server {endpoint} speaks protocol {major}.{minor}.{patch}, this backend "
            f"{PROTOCOL_MAJOR}.{PROTOCOL_MINOR}: run the rpc-server of the same build (`ggufloop rpc-server`)"
        )
    return major, minor, patch


def _answers(endpoint: str, timeout: float = 1.0) -> bool:
    host, _, port = endpoint.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
        return True
    except OSError:
        return False


def lost_servers(servers: Sequence[str], settle: float = 2.0) -> list[str]:
    """The servers of ``servers`` that no longer accept a connection, waiting up to ``settle`` seconds for one.

    A server that has just died may still accept for a moment: its process closes the connection
    the client used before its listening socket, and the client's abort comes in between. So when
    every server still answers, ask again until one does not or ``settle`` has passed; an empty list
    then means that none could be named."""
    deadline = time.monotonic() + settle
    while True:
        lost = [s for s in servers if not _answers(s, timeout=0.5)]
        if lost or time.monotonic() >= deadline:
            return lost
        time.sleep(0.05)


# -- devices ------------------------------------------------------------------------------------


def _ggml():
    from . import _lib

    if _lib.ggml_backend_reg_by_name is None:
        raise BackendError("the installed llama-cpp-python does not export ggml's backend API")
    return _lib


def _device(lib, handle: int, endpoint: str | None) -> Device:
    free, total = ctypes.c_size_t(), ctypes.c_size_t()
    lib.ggml_backend_dev_memory(handle, ctypes.byref(free), ctypes.byref(total))
    return Device(
        lib.ggml_backend_dev_name(handle).decode(),
        lib.ggml_backend_dev_description(handle).decode(),
        free.value,
        total.value,
        endpoint,
        handle,
    )


def local_devices() -> list[Device]:
    """This machine's GPUs as llama.cpp picks them by default: discrete GPUs, else integrated ones."""
    lib = _ggml()
    gpus, igpus = [], []
    for i in range(lib.ggml_backend_dev_count()):
        dev = lib.ggml_backend_dev_get(i)
        kind = lib.ggml_backend_dev_type(dev)
        if kind == lib.GGML_BACKEND_DEVICE_TYPE_GPU:
            gpus.append(_device(lib, dev, None))
        elif kind == lib.GGML_BACKEND_DEVICE_TYPE_IGPU:
            igpus.append(_device(lib, dev, None))
    return gpus or igpus


def remote_devices(servers: str | Sequence[str], timeout: float = PROBE_TIMEOUT_S) -> list[Device]:
    """Every device of every server, in the order given; each server is probed first, so a server that
    cannot be used is an RpcError here and never an abort inside llama.cpp."""
    endpoints = parse_servers(servers)
    for endpoint in endpoints:
        probe(endpoint, timeout)
    lib = _ggml()
    rpc_reg = lib.ggml_backend_reg_by_name(b"RPC")
    address = rpc_reg and lib.ggml_backend_reg_get_proc_address(rpc_reg, b"ggml_backend_rpc_add_server")
    if not address:
        raise BackendError("the installed backend was built without RPC support: rebuild it with `make backend`")
    add_server = lib.ggml_backend_rpc_add_server_t(address)
    install_abort_handler(endpoints)
    out = []
    for endpoint in endpoints:
        reg = add_server(str(endpoint).encode())
        if not reg:
            raise RpcError(f"the RPC server {endpoint} offers no device")
        out += [
            _device(lib, lib.ggml_backend_reg_dev_get(reg, i), str(endpoint))
            for i in range(lib.ggml_backend_reg_dev_count(reg))
        ]
    return out


def _peer_sockets(endpoints: Sequence[Endpoint]) -> Iterator[socket.socket]:
    """This process's TCP connections to the endpoints (Linux), as duplicates of their descriptors:
    the connections llama.cpp's RPC client opened, which Python cannot reach otherwise."""
    targets = set()
    for e in endpoints:
        with contextlib.suppress(OSError):
            targets |= {info[4][:2] for info in socket.getaddrinfo(e.host, e.port, socket.AF_INET, socket.SOCK_STREAM)}
    try:
        fds = [int(name) for name in os.listdir("/proc/self/fd")]
    except OSError:
        return
    for fd in fds:
        try:
            if not stat.S_ISSOCK(os.fstat(fd).st_mode):
                continue
            sock = socket.socket(fileno=os.dup(fd))
        except OSError:
            continue
        try:
            if sock.family == socket.AF_INET and sock.type == socket.SOCK_STREAM and sock.getpeername() in targets:
                yield sock
        except OSError:
            pass
        finally:
            sock.close()


def watch_connections(endpoints: Sequence[Endpoint]) -> int:
    """Turn on TCP keep-alive and a user timeout on llama.cpp's connections to the servers (Linux;
    elsewhere nothing); returns how many were found. llama.cpp sets neither, so without them a
    server whose machine vanished (power lost, network cut) leaves the client waiting in recv().
    Call it once a model and its context exist: llama.cpp opens a connection when a buffer or a
    backend first needs it and keeps it while any of them lives."""
    if not sys.platform.startswith("linux"):
        return 0
    n = 0
    for sock in _peer_sockets(endpoints):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, KEEPALIVE_IDLE_S)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, KEEPALIVE_INTERVAL_S)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, KEEPALIVE_COUNT)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, USER_TIMEOUT_MS)
            n += 1
    return n


@dataclass
class DeviceList:
    """The devices a model offloads to, in llama.cpp's order, and the NULL-terminated array of their
    handles that ``llama_model_params.devices`` points to (kept alive with the model)."""

    devices: list[Device]
    array: ctypes.Array
    endpoints: tuple[Endpoint, ...] = ()

    @property
    def pointer(self) -> int:
        return ctypes.addressof(self.array)


def model_devices(servers: str | Sequence[str], tensor_split: Sequence[float] | None = None) -> DeviceList:
    """The device list of a model split over ``servers``: the remote devices, then the local GPUs.
    A tensor split must give one share per device."""
    devices = remote_devices(servers) + local_devices()
    if tensor_split is not None and len(tensor_split) != len(devices):
        raise OptionError(
            f"--tensor-split has {len(tensor_split)} values for {len(devices)} devices "
            f"({', '.join(d.name + ' ' + (d.endpoint or 'local') for d in devices)}): give one share per device"
        )
    array = (ctypes.c_void_p * (len(devices) + 1))(*[d.handle for d in devices], None)
    return DeviceList(devices, array, parse_servers(servers))


# -- a server lost mid-computation --------------------------------------------------------------

_handler = None
_servers: list[str] = []
_stderr_fd: int | None = None
_stdout_fd: int | None = None
_mid_line = False  # stdout's last text ended without a newline (a streamed answer)


def streamed(text: str) -> None:
    """Note text just written to stdout, so that a lost server's error line starts on a line of its own
    rather than glued to a streamed answer. Commands that stream text call it after each piece."""
    global _mid_line
    if text:
        _mid_line = not text.endswith("\n")


def install_abort_handler(endpoints: Sequence[Endpoint]) -> None:
    """Make llama.cpp's abort on a lost RPC server one ``error:`` line and exit status 1.

    ggml calls the handler with its message just before ``abort()``. A message from the RPC client
    (``ggml-rpc``) ends the process at once with a line that names the servers that no longer
    answer; any other message is written as ggml would write it, and the abort goes on. The line
    goes to a duplicate of the original stderr, because llama-cpp-python points stderr at
    /dev/null while it loads a model quietly."""
    global _handler, _stderr_fd, _stdout_fd
    _servers.extend(str(e) for e in endpoints if str(e) not in _servers)
    if _handler is not None:
        return
    lib = _ggml()
    if lib.ggml_set_abort_callback is None:
        return
    _stderr_fd = os.dup(sys.stderr.fileno())
    with contextlib.suppress(OSError, ValueError, AttributeError):  # stdout may be closed or not a file
        _stdout_fd = os.dup(sys.stdout.fileno())

    @lib.ggml_abort_callback_t
    def handler(message: bytes | None) -> None:
        text = (message or b"").decode("utf-8", "replace").strip()
        if "ggml-rpc" not in text:
            os.write(_stderr_fd, (text + "\n").encode())
            return
        reason = text.split(": ", 1)[-1].strip()
        lost = lost_servers(_servers)
        if _mid_line and _stdout_fd is not None:  # end the streamed text's line: the error gets a line of its own
            with contextlib.suppress(OSError, ValueError):
                sys.stdout.flush()
            with contextlib.suppress(OSError):
                os.write(_stdout_fd, b"\n")
        who = ", ".join(lost) if lost else "one of " + ", ".join(_servers)
        os.write(
            _stderr_fd,
            f"error: lost the RPC server {who} ({reason}); the model's layers on it are gone, so this run "
            "cannot go on: restart the server and run again\n".encode(),
        )
        os._exit(1)

    _handler = handler  # the C side keeps only a pointer
    lib.ggml_set_abort_callback(handler)


def server_binary() -> Path:
    """llama.cpp's rpc-server, built with the installed backend (next to its libraries)."""
    from .tools import program

    return program("rpc-server")
