"""Atomic writes, for single files and for whole directories.

* :func:`atomic_path` (and the helpers built on it): write a temporary file beside the
  target, fsync, rename over it. A crash or an error mid-write leaves the old file (or none),
  never a truncated one.
* :func:`atomic_directory`: write a temporary directory beside the target, fsync it, then
  swap it in (one atomic exchange on Linux). A crash at any moment leaves either the complete
  old directory or the complete new one, never a mix; temporary directories left by a killed
  earlier write are removed by the next one.

Files and directories get the permissions ``open``/``mkdir`` would give them (the user's
umask), not the private 0600/0700 of ``mkstemp``/``mkdtemp``.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import re
import shutil
import stat
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from typing import Any

from .errors import OutputError, QALoRAError

TMP_TAG = ".qalora-tmp-"
OLD_TAG = ".qalora-old"


def current_umask() -> int:
    """The process umask, read without changing it where the OS allows."""
    with suppress(OSError, ValueError):
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _apply_umask(path: str, mode: int) -> None:
    os.chmod(path, mode & ~current_umask())


def _fsync_path(path: str, directory: bool = False) -> None:
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0)
    try:
        fd = os.open(path, flags)
    except OSError:
        if directory:
            return  # some platforms cannot open directories; the rename is still atomic
        raise
    try:
        os.fsync(fd)
    except OSError:
        if not directory:
            raise
    finally:
        os.close(fd)


#: Temporary files of :func:`atomic_path` are named ``.<name>.qalora-<pid>-<random>.tmp``:
#: the pid lets a later write remove what a killed one left.
TMP_FILE_TAG = ".qalora-"
_STALE_AFTER_S = 3600.0


def _write_failure(e: BaseException, target: str) -> OutputError | None:
    """The :class:`OutputError` a failed write becomes (an ``OSError``, or safetensors'
    error wrapping one), or None for other errors."""
    if isinstance(e, OutputError):
        return e
    other = None
    if isinstance(e, OSError):
        reason, number = e.strerror or str(e), e.errno
        if isinstance(e.filename, (str, bytes)) and os.fsdecode(e.filename) != target:
            other = os.fsdecode(e.filename)  # the file the failure was about, when not the target
    elif type(e).__name__ == "SafetensorError" and "(os error" in str(e):
        reason = str(e)
        m = re.search(r"\(os error (\d+)\)", reason)
        number = int(m.group(1)) if m else None
    else:
        return None
    err = OutputError(f"cannot write {target}: {reason}" + (f" ({other})" if other else ""))
    err.errno = number
    return err


def check_output_path(path) -> str:
    """The absolute path of a file about to be written, refused (:class:`OutputError`) when
    it cannot be a file name (empty, a NUL byte, a trailing separator) or when something
    other than a regular file is there: a directory, a device, a FIFO or socket (an atomic
    write replaces the path, which would remove a device node such as /dev/null and report
    success), or a symlink (the link itself would be replaced, not what it points to)."""
    try:
        path = os.fspath(path)
    except TypeError:
        raise OutputError(f"expected a file path, got {type(path).__name__}") from None
    if isinstance(path, bytes):
        path = os.fsdecode(path)
    if "\0" in path:
        raise OutputError(f"{path!r}: a file name cannot hold a NUL byte")
    if not path or path.endswith(("/", os.sep)) or os.path.basename(path) in ("", ".", ".."):
        raise OutputError(f"{path!r} is not a file name; give the path of the file to write")
    full = os.path.abspath(path)
    try:
        st = os.lstat(full)
    except (FileNotFoundError, NotADirectoryError):
        return full
    except OSError as e:
        raise _write_failure(e, full) from None
    if stat.S_ISLNK(st.st_mode):
        raise OutputError(
            f"{full} is a symlink (to {os.readlink(full)}); writing would replace the link with a file: write to "
            f"the file it points to, or remove the link first"
        )
    if stat.S_ISDIR(st.st_mode):
        raise OutputError(f"{full} is a directory; give the path of a file")
    if not stat.S_ISREG(st.st_mode):
        raise OutputError(
            f"{full} exists and is not a regular file (a device, FIFO or socket); writing would replace it: give "
            f"another path"
        )
    return full


def check_output_directory(path) -> str:
    """The absolute path of a directory files are about to be written into, refused
    (:class:`OutputError`) when the name is bad or something other than a directory is there."""
    try:
        path = os.fsdecode(os.fspath(path))
    except TypeError:
        raise OutputError(f"expected a directory path, got {type(path).__name__}") from None
    if not path or "\0" in path:
        raise OutputError(f"{path!r} is not a directory name")
    full = os.path.abspath(path)
    if os.path.lexists(full) and not os.path.isdir(full):
        raise OutputError(f"{full} exists and is not a directory; give the path of a directory to write into")
    return full


def make_output_directory(path) -> str:
    """Creates the directory ``path`` (and its parents) for files about to be written into it
    (:func:`check_output_directory` first) and returns its absolute path; a file-system
    refusal is an :class:`OutputError`."""
    full = check_output_directory(path)
    try:
        os.makedirs(full, exist_ok=True)
    except OSError as e:
        raise _write_failure(e, full) from None
    return full


def _process_start() -> float:
    """When this process started (seconds since the epoch); its import of this module where
    /proc cannot tell."""
    try:
        with open("/proc/self/stat", encoding="ascii") as f:
            ticks = int(f.read().rpartition(")")[2].split()[19])
        with open("/proc/stat", encoding="ascii") as f:
            boot = next(int(line.split()[1]) for line in f if line.startswith("btime"))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return _IMPORTED


_IMPORTED = time.time()


def clean_stale_files(target: str) -> None:
    """Removes temporary files left beside ``target`` by atomic writes that died (SIGKILL,
    power loss): ``.<name>.qalora-<pid>-*.tmp`` whose process is gone, and the pid-less
    ``.<name>.XXXXXXXX.tmp`` of earlier releases when they predate this process and have
    not changed for an hour."""
    parent, name = os.path.split(target)
    tagged = re.compile(re.escape(f".{name}{TMP_FILE_TAG}") + r"(\d+)-[A-Za-z0-9_]+\.tmp")
    legacy = re.compile(re.escape(f".{name}.") + r"[a-z0-9_]{8}\.tmp")
    try:
        entries = os.listdir(parent)
    except OSError:
        return
    started = _process_start()
    now = time.time()
    for entry in entries:
        m = tagged.fullmatch(entry)
        if not m and not legacy.fullmatch(entry):
            continue
        path = os.path.join(parent, entry)
        with suppress(OSError):
            st = os.lstat(path)
            if not stat.S_ISREG(st.st_mode):
                continue
            if m:
                pid = int(m.group(1))
                stale = pid != os.getpid() and not _pid_alive(pid)
            else:
                stale = st.st_mtime < started and now - st.st_mtime > _STALE_AFTER_S
            if stale:
                os.unlink(path)


@contextmanager
def atomic_path(path) -> Iterator[str]:
    """Yields a temporary path in the target's directory; renames it onto ``path`` on success.
    The file ends up with the permissions an ordinary write would give it (mkstemp's 0600
    would hide a model file from, say, an Ollama server running as another user).

    ``path`` is checked first (:func:`check_output_path`: no directory, device, FIFO,
    socket or symlink there), temporary files killed writes left beside it are removed
    (:func:`clean_stale_files`), and every file-system failure (permission, no space, file
    too large, ...) is raised as :class:`~qalora.OutputError` naming ``path``.
    """
    path = check_output_path(path)
    directory, name = os.path.split(path)
    try:
        os.makedirs(directory, exist_ok=True)
        clean_stale_files(path)
        fd, tmp = tempfile.mkstemp(prefix=f".{name}{TMP_FILE_TAG}{os.getpid()}-", suffix=".tmp", dir=directory)
        os.close(fd)
    except OSError as e:
        raise _write_failure(e, path) from e
    try:
        yield tmp
        _apply_umask(tmp, 0o666)
        _fsync_path(tmp)
        check_output_path(path)  # something else may have appeared there meanwhile
        os.replace(tmp, path)
        _fsync_path(directory, directory=True)
    except Exception as e:
        failure = _write_failure(e, path)
        if failure is None or failure is e:
            raise
        raise failure from e
    finally:
        with suppress(OSError):
            if os.path.lexists(tmp):
                os.unlink(tmp)


def atomic_write_text(path, text: str) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)


def atomic_write_json(path, data: dict[str, Any]) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def atomic_save_safetensors(path, tensors, metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save_file

    # safetensors wants contiguous CPU tensors that share no storage.
    flat = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(flat, tmp, metadata=metadata)


def atomic_write_with(path, write: Callable[[str], None]) -> None:
    """Runs ``write(tmp_path)`` and moves the result onto ``path``."""
    with atomic_path(path) as tmp:
        write(tmp)


# --------------------------------------------------------------------- whole directories

_RENAME_EXCHANGE = 2
_libc_renameat2 = None


def _exchange(a: str, b: str) -> bool:
    """Atomically swaps two paths (Linux renameat2 RENAME_EXCHANGE). False where the OS or
    the file system cannot, so the caller falls back to two renames."""
    global _libc_renameat2
    if os.environ.get("QALORA_NO_RENAME_EXCHANGE"):  # lets tests exercise the fallback
        return False
    if _libc_renameat2 is None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            fn = libc.renameat2
            fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
            fn.restype = ctypes.c_int
            _libc_renameat2 = fn
        except (AttributeError, OSError):
            _libc_renameat2 = False
    if not _libc_renameat2:
        return False
    at_fdcwd = -100
    if _libc_renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), b)


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # our own leftovers are never in use by another write
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _backup_path(target: str) -> str:
    parent, name = os.path.split(target)
    return os.path.join(parent, f".{name}{OLD_TAG}")


def recover_directory(target: str) -> str:
    """The path holding ``target``'s content: ``target`` itself, or the backup left by a
    swap interrupted between its two renames (only where the atomic exchange is missing)."""
    backup = _backup_path(target)
    if not os.path.lexists(target) and os.path.isdir(backup) and not os.path.islink(backup):
        return backup
    return target


def clean_stale_temporaries(target: str) -> None:
    """Restores an interrupted swap's backup and removes temporary directories left beside
    ``target`` by writes whose process is gone."""
    parent, name = os.path.split(target)
    backup = _backup_path(target)
    if os.path.lexists(backup):
        if not os.path.lexists(target):
            os.rename(backup, target)  # a fallback swap was killed between its two renames
        else:
            shutil.rmtree(backup, ignore_errors=True)
    pattern = re.compile(re.escape(f".{name}{TMP_TAG}") + r"(\d+)-")
    try:
        entries = os.listdir(parent)
    except OSError:
        return
    for entry in entries:
        m = pattern.match(entry)
        if m and not _pid_alive(int(m.group(1))):
            shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)


def _settle_tree(root: str) -> None:
    """Gives what a write produced the umask's permissions (some writers create 0600
    files) and flushes it to disk."""
    for dirpath, _, files in os.walk(root):
        for f in files:
            path = os.path.join(dirpath, f)
            if stat.S_ISREG(os.lstat(path).st_mode):
                _apply_umask(path, 0o666)
                _fsync_path(path)
        _apply_umask(dirpath, 0o777)
        _fsync_path(dirpath, directory=True)


class DirectoryError(QALoRAError, ValueError):
    """A target directory cannot be replaced (it is a file, holds subdirectories, ...)."""


def check_replaceable(target: str, files_only: bool = True) -> None:
    """Raises :class:`DirectoryError` unless ``target`` is absent, or a directory (whose
    entries are all regular files, with ``files_only``: anything else would be lost by a
    swap that carries files over)."""
    target = os.path.abspath(target)
    if not os.path.lexists(target):
        return
    if not os.path.isdir(target):
        raise DirectoryError(f"{target} exists and is not a directory")
    cwd = os.path.abspath(os.getcwd())
    if cwd == target or cwd.startswith(target + os.sep):
        raise DirectoryError(f"{target} is (or contains) the current working directory; write into a subdirectory")
    for entry in os.listdir(target) if files_only else ():
        st = os.lstat(os.path.join(target, entry))
        if not stat.S_ISREG(st.st_mode):
            raise DirectoryError(
                f"{target} holds {entry!r}, which is not a regular file; the directory is replaced as a "
                f"whole, so write into a new directory"
            )


@contextmanager
def atomic_directory(path, keep: Callable[[str], bool] | None = None) -> Iterator[str]:
    """Write a whole directory atomically.

    Yields an empty temporary directory beside ``path``. When the block ends without error,
    everything in it is fsynced (and given the umask's permissions), the regular files of
    the existing ``path`` that the block did not write and that ``keep(name)`` accepts are
    hard-linked (or copied) into it, and it takes ``path``'s place in one step. With
    ``keep=None`` the old directory is replaced whole (the caller has checked it holds
    nothing to keep); otherwise an old directory holding anything but regular files is
    refused before the block runs. On error, or if the process dies, ``path`` is left
    exactly as it was. If ``path`` is a symlink, the directory it points to is replaced.
    """
    try:
        target = os.path.realpath(os.fspath(path))
    except TypeError:
        raise OutputError(f"expected a directory path, got {type(path).__name__}") from None
    except ValueError:
        raise OutputError(f"{os.fspath(path)!r}: a directory name cannot hold a NUL byte") from None
    try:
        with _atomic_directory(target, keep) as tmp:
            yield tmp
    except Exception as e:
        failure = _write_failure(e, target)
        if failure is None or failure is e:
            raise
        raise failure from e


@contextmanager
def _atomic_directory(target: str, keep: Callable[[str], bool] | None) -> Iterator[str]:
    check_replaceable(target, files_only=keep is not None)
    parent, name = os.path.split(target)
    os.makedirs(parent, exist_ok=True)
    clean_stale_temporaries(target)
    tmp = tempfile.mkdtemp(prefix=f".{name}{TMP_TAG}{os.getpid()}-", dir=parent)
    try:
        _apply_umask(tmp, 0o777)
        yield tmp
        _settle_tree(tmp)
        written = set(os.listdir(tmp))
        if os.path.isdir(target):
            for entry in os.listdir(target):
                src = os.path.join(target, entry)
                if entry in written or keep is None or not keep(entry) or not stat.S_ISREG(os.lstat(src).st_mode):
                    continue
                try:
                    os.link(src, os.path.join(tmp, entry))
                except OSError:
                    shutil.copy2(src, os.path.join(tmp, entry))
            _fsync_path(tmp, directory=True)
        if not os.path.lexists(target):
            os.rename(tmp, target)
        elif _exchange(tmp, target):
            pass  # tmp now holds the old directory; removed below
        else:
            # Two renames; between them only the backup holds the data, and readers and the
            # next write restore it from there. The backup then leaves under a temporary
            # name at once, so a half-removed old copy is never taken for a checkpoint.
            backup = _backup_path(target)
            os.rename(target, backup)
            os.rename(tmp, target)
            os.rename(backup, tmp)
        _fsync_path(parent, directory=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
