"""`ggufloop rpc-server`: llama.cpp's RPC server, offering this machine's devices to a model split
over machines (``--rpc`` on chat, generate, serve and eval)."""

from __future__ import annotations

import os
import subprocess
import sys

import click

LOOPBACK = ("127.0.0.1", "localhost")


@click.command("rpc-server")
@click.option(
    "--host", default="127.0.0.1", show_default=True, help="Address to bind (loopback unless told otherwise)."
)
@click.option("--port", "-p", type=click.IntRange(1, 65535), default=50052, show_default=True)
@click.option("--threads", "-t", type=click.IntRange(1), default=None, help="CPU threads (default: llama.cpp's).")
@click.option(
    "--device",
    "-d",
    default=None,
    metavar="DEV[,DEV...]",
    help="This machine's devices to offer (default: its GPUs, else its CPU).",
)
@click.option("--cache", is_flag=True, help="Cache received tensors on disk (faster reloads of the same model).")
def command(host: str, port: int, threads: int | None, device: str | None, cache: bool) -> None:
    """Offer this machine's devices to models split over machines (`--rpc HOST:PORT`).

    Runs llama.cpp's rpc-server from the installed backend. The protocol has no authentication
    and no encryption: keep the server on loopback, or on a private network that only your
    machines can reach, and never on an open network. It serves one client at a time.

    \b
      ggufloop rpc-server                                   # this machine only, port 50052
      ggufloop rpc-server --host 192.168.1.10 --port 50052  # a private network
    """
    from ..errors import OptionError
    from ..rpc import SECURITY_WARNING, server_binary

    if ":" in host:
        raise OptionError(f"--host {host}: llama.cpp's RPC client cannot reach IPv6 addresses; give an IPv4 address")
    binary = server_binary()
    cmd = [str(binary), "--host", host, "--port", str(port)]
    if threads is not None:
        cmd += ["--threads", str(threads)]
    if device is not None:
        cmd += ["--device", device]
    if cache:
        cmd.append("--cache")
    click.echo(SECURITY_WARNING, err=True)
    if host not in LOOPBACK:
        click.echo(
            f"warning: listening on {host}:{port}, beyond this machine: make sure only your own machines can reach it",
            err=True,
        )
    sys.stderr.flush()
    try:
        if os.name == "posix":  # the server takes this process's place: its pid, its signals
            os.execv(binary, cmd)
        code = subprocess.call(cmd)
    except KeyboardInterrupt:  # the server got the same interrupt
        code = 130
    except OSError as err:
        raise OptionError(f"cannot run {binary}: {err.strerror or err}") from None
    sys.exit(code)
