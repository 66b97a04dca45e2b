"""Native libraries print nothing of their own: fd-2 output of native code (libpng, libjpeg, DALI) inside a decode
is captured and folded into fastbyol's one line; Python's own stderr still reaches the terminal meanwhile."""

import ctypes
import os
import subprocess
import sys
import threading

from fastbyol.system.native import CurrentStderr, NativeWindow, fold, native_stderr


def test_fd2_writes_are_captured_and_python_stderr_is_not(capfd):
    libc = ctypes.CDLL(None)
    with native_stderr() as printed:
        os.write(2, b"libpng error: IHDR: unknown compression method\n")
        libc.dprintf(2, b"libjpeg: Corrupt JPEG data\n")
        print("ours", file=sys.stderr)  # Python's stderr, swapped to the original descriptor meanwhile
    assert printed.first_line() == "libpng error: IHDR: unknown compression method"
    assert "Corrupt JPEG data" in printed.text and "ours" not in printed.text
    out = capfd.readouterr()
    assert "libpng" not in out.err and "Corrupt" not in out.err and "ours" in out.err
    os.write(2, b"after\n")  # fd 2 is restored
    assert "after" in capfd.readouterr().err


def test_overlapping_captures_each_see_their_window(capfd):
    started, release = threading.Event(), threading.Event()
    seen = {}

    def other():
        with native_stderr() as printed:
            started.set()
            release.wait(10)
            os.write(2, b"late\n")
        seen["other"] = printed.text

    t = threading.Thread(target=other)
    t.start()
    started.wait(10)
    with native_stderr() as mine:
        os.write(2, b"early\n")
    release.set()
    t.join(10)
    assert mine.text == "early\n" and "late" in seen["other"] and "early" in seen["other"]
    os.write(2, b"restored\n")
    assert "restored" in capfd.readouterr().err


def test_fold_keeps_one_line():
    with native_stderr() as printed:
        os.write(2, b"\n  warning: 12 extraneous bytes before marker 0xd9  \nsecond line\n")
    assert fold("x.jpg: does not decode", printed) == ("x.jpg: does not decode [native: warning: 12 extraneous bytes "
                                                       "before marker 0xd9]")
    with native_stderr() as nothing:
        pass
    assert fold("r", nothing) == "r"


def test_a_crashing_child_still_gets_its_stderr_back(tmp_path):
    # the redirect is undone even when the block raises
    code = ("import os,sys\nfrom fastbyol.system.native import native_stderr\ntry:\n    with native_stderr():\n"
            "        os.write(2, b'hidden\\n')\n        raise RuntimeError('x')\nexcept RuntimeError:\n    pass\n"
            "os.write(2, b'visible\\n')\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60)
    assert done.returncode == 0 and done.stderr == b"visible\n", done.stderr


def test_a_window_spans_calls_and_the_progress_bar_still_reaches_the_terminal(capfd):
    """NativeWindow: what native code writes between two calls (DALI decoding ahead) is taken at the next call, and
    a writer made once (the progress bar, through CurrentStderr) still reaches the terminal meanwhile."""
    bar, window = CurrentStderr(), NativeWindow()
    assert window.take().text == ""  # opens it
    os.write(2, b"\x1b[0;31m[ERROR] \x1b[0m[jpeg_parser] Invalid marker\n")
    bar.write("3/10 steps\n")
    bar.flush()
    assert window.take().first_line() == "[ERROR] [jpeg_parser] Invalid marker"  # colour codes dropped
    os.write(2, b"dropped\n")
    window.close()
    window.close()  # a second close does nothing
    os.write(2, b"after\n")
    err = capfd.readouterr().err
    assert "3/10 steps" in err and "jpeg_parser" not in err and "dropped" not in err and "after" in err


def test_a_log_handler_made_before_the_capture_still_reaches_the_terminal():
    """A caller's logging.StreamHandler bound to sys.stderr before the capture writes to fd 2, which the capture
    holds: it is pointed at the terminal for the capture's length and given its stream back afterwards; native fd-2
    output stays captured. In a child, whose real fd 2 is the pipe read here."""
    code = ("import logging, os, sys\nfrom fastbyol.system.native import NativeWindow\n"
            "handler = logging.StreamHandler()\nlog = logging.getLogger('user')\nlog.addHandler(handler)\n"
            "log.setLevel(logging.INFO)\nstream = handler.stream\nwindow = NativeWindow()\nwindow.take()\n"
            "log.info('step 10 of the caller')\nos.write(2, b'[jpeg_parser] Invalid marker\\n')\nwindow.close()\n"
            "assert handler.stream is stream\nlog.info('after')\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stderr.decode().splitlines() == ["step 10 of the caller", "after"], done.stderr
