"""Fixtures every test module may use, and modules that run in their own process.

The shared configurations and builders are plain functions in tiny.py (importable by helpers
too); here only what pytest injects.

``pytestmark = pytest.mark.own_process``: the module's tests run in a pytest process of their
own when the session also runs other modules. Ray Serve keeps driver-side state (its router
threads and long-poll clients) after ``serve.shutdown()`` and ``ray.shutdown()``, and a later
module's Ray cluster in the same process could then wait for ever on its first handle call
(seen late in full runs, never alone). The module then shows as one test here; its own
results, failures in full, are in that test's report. These modules come last, two at a time.
"""
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    # before any Triton kernel is defined (tiny imports the model, the model the kernels): a test
    # that runs a kernel on the CPU needs the interpreter whichever module imported them first
    os.environ.setdefault("TRITON_INTERPRET", "1")

from tiny import TINY, tiny_model  # noqa: E402

CHILD = "LSA_TEST_CHILD"  # set in a module's own process
OWN_PROCESS_TIMEOUT_S = 2400
SUMMARIES = pytest.StashKey[list]()


@pytest.fixture(scope="module")
def model(request):
    """The module's random model: its ``MODEL`` config (default TINY) with its ``SEED``
    (default 3), fp32 on the CPU. A module that needs another device or dtype defines its own."""
    return tiny_model(getattr(request.module, "MODEL", TINY), getattr(request.module, "SEED", 3))


class ModuleProcessFailed(Exception):
    pass


class ModuleInOwnProcess(pytest.Item):
    """A module's selected tests, run by ``python -m pytest`` in a child process. Two such modules
    run at a time: when one starts, so does the next (each mostly waits on its Ray cluster and
    uses a thread or two of the machine's cores)."""

    def __init__(self, *, node_ids: list[str], **kwargs):
        super().__init__(**kwargs)
        self.node_ids = node_ids
        self.add_marker(pytest.mark.timeout(OWN_PROCESS_TIMEOUT_S))
        self.next: ModuleInOwnProcess | None = None  # started alongside this one
        self.child: subprocess.Popen | None = None

    def start(self):
        if self.child is not None:
            return
        env = {**os.environ, CHILD: "1"}
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *self.node_ids]
        self.output = tempfile.TemporaryFile("w+")  # a file, not a pipe: nobody reads it until the end
        self.started = time.monotonic()
        self.child = subprocess.Popen(cmd, cwd=self.config.rootpath, env=env, stdout=self.output,
                                      stderr=subprocess.STDOUT, text=True)

    def stop(self):
        if self.child is not None and self.child.poll() is None:
            self.child.kill()
            self.child.wait()

    def runtest(self):
        self.start()
        if self.next is not None:
            self.next.start()
        limit = OWN_PROCESS_TIMEOUT_S - 60
        try:
            self.child.wait(timeout=max(1.0, limit - (time.monotonic() - self.started)))
        except subprocess.TimeoutExpired:
            self.stop()
            raise ModuleProcessFailed(f"{self.name}: no result after {limit:.0f} s\n{self.read()[-20000:]}") from None
        output = self.read()
        summary = output.strip().splitlines()[-1:] or ["(no output)"]
        self.config.stash.setdefault(SUMMARIES, []).append(f"{self.name}: {summary[0].strip('= ')}")
        if self.child.returncode != 0:
            raise ModuleProcessFailed(f"{self.name} (exit {self.child.returncode}): {summary[0]}\n"
                                      f"{output[-25000:]}")

    def read(self) -> str:
        self.output.seek(0)
        return self.output.read()

    def repr_failure(self, excinfo):
        if isinstance(excinfo.value, ModuleProcessFailed):
            return str(excinfo.value)
        return super().repr_failure(excinfo)

    def reportinfo(self):
        return self.path, None, f"{self.name}: its tests in their own process"


def pytest_collection_modifyitems(session, config, items):
    if os.environ.get(CHILD):
        return
    own: dict[Path, list[pytest.Item]] = {}
    for item in items:
        if item.get_closest_marker("own_process") is not None:
            own.setdefault(Path(item.path), []).append(item)
    if not own or len({Path(item.path) for item in items}) == 1:
        return  # only one module: it has the process to itself already
    kept = [item for item in items if Path(item.path) not in own]
    modules = [ModuleInOwnProcess.from_parent(session, name=str(path.relative_to(config.rootpath)), path=path,
                                              node_ids=[item.nodeid for item in module_items])
               for path, module_items in own.items()]
    for module, after in zip(modules, modules[1:]):
        module.next = after
    items[:] = kept + modules


def pytest_sessionfinish(session):
    for item in session.items:  # a run stopped early (-x, Ctrl-C): no module's process left running
        if isinstance(item, ModuleInOwnProcess):
            item.stop()


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    summaries = config.stash.get(SUMMARIES, [])
    if summaries:
        terminalreporter.write_sep("-", "modules run in their own process")
        for line in summaries:
            terminalreporter.write_line(line)
