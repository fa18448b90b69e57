"""PID 1 of a run: sets up the view, starts the tool under the filter, answers its calls.

Started by `khofs run` inside `unshare --mount-proc --pid --uts --fork --kill-child`: when it
exits, the kernel ends every process of the run and the namespaces go with them.
Usage: python -m khofs.run.init MNT SOCK VIEWDIR RESULT_FD -- CMD [ARGS...]
"""

import errno
import json
import os
import signal
import socket
import sys

import trio

from . import notify, view
from .answers import Answers, RunEnds
from .link import Link, LinkError


def start_tool(argv) -> tuple[int, int, socket.socket]:
    """Fork the tool; it loads the filter and hands the listener over before it execs.
    (pid, listener fd, the socket to tell it to go on)."""
    ours, theirs = socket.socketpair()
    pid = os.fork()
    if pid == 0:
        try:
            ours.close()
            fd = notify.install_filter()
            socket.send_fds(theirs, [b"L"], [fd])
            os.close(fd)
            theirs.recv(1)                     # the supervisor is listening
            theirs.close()
            for s in (signal.SIGPIPE, signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                signal.signal(s, signal.SIG_DFL)
            os.execvp(argv[0], argv)
        except OSError as e:
            print(f"khofs run: {argv[0]}: {e.strerror}", file=sys.stderr, flush=True)
            os._exit(127 if e.errno == errno.ENOENT else 126)
        except BaseException as e:
            print(f"khofs run: cannot start {argv[0]}: {e}", file=sys.stderr, flush=True)
            os._exit(126)
    theirs.close()
    _, fds, _, _ = socket.recv_fds(ours, 1, 1)
    if not fds:
        os.waitpid(pid, 0)
        raise SystemExit("khofs run: the tool could not load the seccomp filter")
    return pid, fds[0], ours


class Run:
    """The supervisor of one run."""
    def __init__(self, mnt, sock, viewdir, result_fd, argv):
        self.mnt, self.sock, self.viewdir, self.result_fd = mnt, sock, viewdir, result_fd
        self.argv = argv
        self.result = {"kexec": False, "action": None, "log": []}

    def finish(self, status: int) -> None:
        """End every process of the run (before any of them sees its call fail), report,
        exit; the namespaces go with the last process."""
        try:
            os.kill(-1, signal.SIGKILL)      # as PID 1: everyone else in the namespace
        except ProcessLookupError:
            pass
        self.result["status"] = status
        try:
            os.write(self.result_fd, json.dumps(self.result).encode())
        except OSError:
            pass
        sys.stderr.flush()
        os._exit(status)

    async def main(self) -> None:
        """Start the tool and supervise it until the run ends."""
        link = await Link(self.sock).connect()
        watch = await Link(self.sock).connect()
        with trio.open_signal_receiver(signal.SIGCHLD, signal.SIGINT, signal.SIGTERM,
                                       signal.SIGHUP) as signals:
            pid, fd, ack = start_tool(self.argv)
            answers = Answers(self.mnt, self.viewdir, link, fd)
            ack.send(b"G")
            ack.close()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self.daemon_gone, watch)
                nursery.start_soon(self.listen, answers, fd)
                self.reap(pid)
                async for sig in signals:
                    if sig == signal.SIGCHLD:
                        self.reap(pid)
                    else:
                        print(f"khofs run: {signal.Signals(sig).name}: ending the run",
                              file=sys.stderr)
                        self.finish(128 + sig)

    def reap(self, tool: int) -> None:
        """Collect exited children (as a PID 1 must); the tool's exit ends the run."""
        while True:
            try:
                pid, st = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if pid == tool:
                self.finish(os.waitstatus_to_exitcode(st) if os.WIFEXITED(st)
                            else 128 + os.WTERMSIG(st))

    async def listen(self, answers: Answers, fd: int) -> None:
        """Answer notifications one at a time, as they come."""
        while True:
            await trio.lowlevel.wait_readable(fd)
            state = notify.pending(fd)
            if state == "hup":
                return                          # no tool process is left; the reaper ends it
            if state != "notif":
                continue
            n = notify.receive(fd)
            if n is None:
                continue
            try:
                await answers.handle(n)
            except RunEnds as e:
                self.result.update(e.result)
                if e.result.get("log"):
                    for line in e.result["log"]:
                        print(line, file=sys.stderr)
                self.finish(0)
            except LinkError as e:
                print(f"khofs run: {e.message}; ending the run", file=sys.stderr)
                self.finish(1)
            except Exception as e:           # never leave the tool waiting on a dead answer
                print(f"khofs run: internal error answering a call ({type(e).__name__}: {e}); "
                      "ending the run", file=sys.stderr)
                self.finish(1)

    async def daemon_gone(self, watch: Link) -> None:
        """End the run when the daemon closes its socket (it died or unmounted)."""
        await watch.wait_closed()
        print(f"khofs run: the khofs daemon of {self.mnt} went away; ending the run",
              file=sys.stderr)
        self.finish(1)


def main(argv=None) -> None:
    """PID 1 of a run (see the module's docstring for the arguments)."""
    argv = sys.argv[1:] if argv is None else argv
    mnt, sock, viewdir, result_fd, dashdash, *cmd = argv
    run = Run(mnt, sock, viewdir, int(result_fd), cmd)
    # The view first: the tool must never see the host's files in their place.
    try:
        import khofs.client as client
        with client.Client(mnt) as c:
            view.write_files(viewdir, c.status())
    except OSError as e:
        print(f"khofs run: {e}", file=sys.stderr)
        run.finish(2)
    why = view.setup(mnt, viewdir)
    if why:
        print(f"khofs run: {why}", file=sys.stderr)
        run.finish(2)
    trio.run(run.main)


if __name__ == "__main__":
    main()
