"""How a task's child process starts (--isolation process): multiprocessing's spawn, with one change.

multiprocessing writes the child's start-up data into its pipe just after it spawns the child. A kill -9
of the worker in between left a child that read an empty pipe and printed an EOFError traceback under the
worker's lines. Here the data is in the pipe before the child exists: the child starts, sees that the
worker is gone (taskpool.child_main) and ends quietly.

`StartUpDataFirst._launch` is `_launch` of `multiprocessing.popen_spawn_posix.Popen` (the same in Python
3.9 to 3.13), with only its order changed. On Linux, where the data fits in the pipe (64 KiB, grown up to
/proc/sys/fs/pipe-max-size if need be); elsewhere it keeps multiprocessing's order.
(Its own module: the child process imports this class by name to unpickle itself, and the worker imports
multiprocessing only when it starts a child.)
"""

import fcntl
import io
import os
import sys
from multiprocessing import context, popen_spawn_posix, reduction, resource_tracker, spawn, util


class StartUpDataFirst(popen_spawn_posix.Popen):
    def _launch(self, process_obj):
        tracker_fd = resource_tracker.getfd()
        self._fds.append(tracker_fd)
        prep_data = spawn.get_preparation_data(process_obj._name)
        fp = io.BytesIO()
        context.set_spawning_popen(self)
        try:
            reduction.dump(prep_data, fp)
            reduction.dump(process_obj, fp)
        finally:
            context.set_spawning_popen(None)
        data = fp.getbuffer()
        parent_r = child_w = child_r = parent_w = None
        try:
            parent_r, child_w = os.pipe()
            child_r, parent_w = os.pipe()
            first = fits_in_pipe(parent_w, len(data))
            if first:
                write_all(parent_w, data)  # it fits: no write blocks
            cmd = spawn.get_command_line(tracker_fd=tracker_fd, pipe_handle=child_r)
            self._fds.extend([child_r, child_w])
            self.pid = util.spawnv_passfds(spawn.get_executable(), cmd, self._fds)
            self.sentinel = parent_r
            if not first:
                write_all(parent_w, data)
        finally:
            self.finalizer = util.Finalize(self, util.close_fds, [fd for fd in (parent_r, parent_w) if fd is not None])
            for fd in (child_r, child_w):
                if fd is not None:
                    os.close(fd)


class TaskProcess(context.SpawnProcess):
    _Popen = staticmethod(StartUpDataFirst)


def write_all(fd: int, data: memoryview) -> None:
    written = 0
    while written < len(data):
        written += os.write(fd, data[written:])


def fits_in_pipe(fd: int, size: int) -> bool:
    """Whether `size` bytes can be written at once to the empty pipe `fd`, growing it if need be (Linux)."""
    if not sys.platform.startswith("linux"):  # its capacity is unknown
        return False
    get, set_ = getattr(fcntl, "F_GETPIPE_SZ", 1032), getattr(fcntl, "F_SETPIPE_SZ", 1031)  # (named from 3.10)
    try:
        if fcntl.fcntl(fd, get) < size:  # 64 KiB, or one page for a user over pipe-user-pages-soft
            fcntl.fcntl(fd, set_, size)
        return fcntl.fcntl(fd, get) >= size
    except OSError:  # larger than /proc/sys/fs/pipe-max-size
        return False
