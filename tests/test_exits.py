"""How the commands that run children (make demo, make loadtest) name a child's ending."""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest

from carclf import demo, exits


def ended(code_or_signal: str) -> int:
    """The Popen return code of a real child that exits with a code or kills itself with a signal."""
    body = (f"import os; os.kill(os.getpid(), {code_or_signal})" if code_or_signal.startswith("signal.")
            else f"raise SystemExit({code_or_signal})")
    return subprocess.run([sys.executable, "-c", f"import signal; {body}"]).returncode


@pytest.mark.parametrize("how,words,status", [
    ("0", "exit status 0", 0),
    ("3", "exit status 3", 3),
    ("signal.SIGABRT", "killed by SIGABRT", 134),
    ("signal.SIGKILL", "killed by SIGKILL (the system may have run out of memory)", 137),
    ("signal.SIGTERM", "killed by SIGTERM", 143),
])
def test_a_childs_ending_is_named_and_given_the_shells_status(how, words, status):
    code = ended(how)
    assert exits.describe(code) == words
    assert exits.shell_status(code) == status


def test_a_demo_step_killed_by_a_signal_says_so():
    """It read "step failed (exit -9)"."""
    with pytest.raises(SystemExit) as raised:
        demo._run([sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"])
    assert str(raised.value).startswith(
        "demo: step failed (killed by SIGKILL (the system may have run out of memory)): ")


def test_a_signal_number_without_a_name_is_still_named():
    assert exits.describe(-signal.SIGRTMIN - 40) == f"killed by signal {signal.SIGRTMIN + 40}"
