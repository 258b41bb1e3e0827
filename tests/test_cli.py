"""The ``lsa`` command as a user meets it: every parser shows its defaults, mistakes are one or
two lines that say what to do and come before anything slow starts (a model load, Ray), and
the layers' imports run one way (the runtime never imports the lab wing or the CLI)."""
import argparse
import ast
import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from cli import build_parser, main, parse_args

REPO = Path(__file__).resolve().parents[1]


def parsers(parser: argparse.ArgumentParser, name: str = "lsa"):
    """(command name, parser) for ``lsa`` and every subcommand, nested ones included."""
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub_name, sub in action.choices.items():
                yield from parsers(sub, f"{name} {sub_name}")


def test_every_command_is_registered_and_shows_its_defaults():
    found = dict(parsers(build_parser()))
    assert set(found) == {"lsa", "lsa generate", "lsa demo", "lsa eval", "lsa calibrate", "lsa dump-traces",
                          "lsa train-indexer", "lsa serve", "lsa batch", "lsa cluster-demo", "lsa bench",
                          "lsa bench decode", "lsa bench prefill", "lsa bench serve", "lsa bench chat",
                          "lsa bench soak", "lsa bench hol"}
    missing = []
    for name, parser in found.items():
        text = " ".join(parser.format_help().split())
        for action in parser._actions:
            unset = action.default is None or action.default is False or action.default == argparse.SUPPRESS
            if not action.option_strings or unset or action.help == argparse.SUPPRESS \
                    or isinstance(action, argparse._HelpAction):
                continue
            shown = parser._get_formatter()._get_help_string(action) or ""
            if "default" not in shown:
                missing.append(f"{name} {action.option_strings[0]}")
        assert "(default:" in text or name in ("lsa", "lsa bench"), name
    assert not missing, f"flags whose --help hides the default: {missing}"
    serve_help = " ".join(found["lsa serve"].format_help().split())
    assert "--budget BUDGET resident fraction" in serve_help and "(default: 0.1)" in serve_help
    assert "--top-k TOP_K" in found["lsa generate"].format_help()
    assert "(default: 0)" in " ".join(found["lsa generate"].format_help().split())  # a zero default is shown


def test_each_subcommand_has_a_handler():
    args = build_parser().parse_args(["batch", "jobs.jsonl", "--out", "r.jsonl"])
    assert args.func.__module__ == "cluster.commands"
    assert build_parser().parse_args(["eval"]).func.__module__ == "lab.evaluation"
    assert build_parser().parse_args(["generate", "hi"]).func.__module__ == "cli.generate"
    assert build_parser().parse_args(["bench", "decode"]).func.__module__ == "benchmarks.decode"


def _stderr_lines(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.strip()]


def test_serve_rejects_a_misspelt_argument_before_ray_starts(monkeypatch, capsys):
    import cluster.local

    def no_ray(*_, **__):
        raise AssertionError("Ray must not start for a bad argument")

    monkeypatch.setattr(cluster.local, "local_app", no_ray)
    assert main(["serve", "num_worker=2"]) == 2
    assert _stderr_lines(capsys) == ["lsa: error: unknown argument 'num_worker'; did you mean 'num_workers'?"]
    assert main(["serve", "budget=2"]) == 2
    assert _stderr_lines(capsys) == ["lsa: error: budget must be in (0, 1], got 2.0"]
    assert main(["serve", "budget"]) == 2
    assert "key=value" in _stderr_lines(capsys)[0]
    with pytest.raises(SystemExit) as exc:  # a bad flag value: argparse's message, without the usage
        main(["serve", "--num-workers", "two"])
    assert exc.value.code == 2
    assert _stderr_lines(capsys) == ["lsa serve: error: argument --num-workers: num_workers='two' is not a valid int",
                                     "(see lsa serve --help)"]


def test_serve_takes_flags_and_key_value_pairs_as_one_config():
    from actors.config import ServeConfig
    from cluster.commands import app_args_from
    from engine.options import build

    args = parse_args(["serve", "--budget", "0.2", "block_size=16", "--num-workers", "2", "policy=quest"])
    values = app_args_from(args, args.app_args)
    assert values == {"budget": 0.2, "num_workers": 2, "block_size": "16", "policy": "quest"}
    config = build(ServeConfig, values)
    assert (config.engine.policy.budget, config.engine.policy.name, config.engine.cache.block_size,
            config.num_workers) == (0.2, "quest", 16, 2)


def test_serve_on_a_taken_port_fails_before_ray_starts(monkeypatch, capsys):
    ray = pytest.importorskip("ray")

    def no_ray(*_, **__):
        raise AssertionError("Ray must not start when the port is taken")

    monkeypatch.setattr(ray, "init", no_ray)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", "--port", str(port)]) == 2
    assert _stderr_lines(capsys) == [f"lsa: error: port {port} on 127.0.0.1 is taken: stop what listens there, "
                                     f"or pick another with --port"]


def test_cluster_demo_checks_its_arguments_before_ray_starts(monkeypatch, capsys):
    import cluster.local

    monkeypatch.setattr(cluster.local, "local_app", lambda *a, **k: pytest.fail("Ray must not start"))
    assert main(["cluster-demo", "--budget", "1.5"]) == 2
    assert _stderr_lines(capsys) == ["lsa: error: budget must be in (0, 1], got 1.5"]
    assert main(["cluster-demo", "--haystack", "/nonexistent/haystack"]) == 2
    assert _stderr_lines(capsys)[0].startswith("lsa: error: haystack directory /nonexistent/haystack does not exist")


def test_batch_errors_say_what_to_do(tmp_path, capsys):
    missing = tmp_path / "missing.jsonl"
    assert main(["batch", str(missing), "--out", str(tmp_path / "r.jsonl")]) == 2
    assert _stderr_lines(capsys) == [f"lsa: error: jobs file {missing} not found: give a JSONL file, one job a "
                                     f"line (see lsa batch --help)"]
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text(json.dumps({"id": "a", "context": "x", "questions": ["q?"]}) + "\n")
    assert main(["batch", str(jobs), "--out", str(tmp_path / "no-dir" / "r.jsonl")]) == 2
    assert "its directory does not exist" in _stderr_lines(capsys)[0]
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}"
    assert main(["batch", str(jobs), "--out", str(tmp_path / "r.jsonl"), "--url", url, "--retries", "0"]) == 2
    assert _stderr_lines(capsys) == [f"lsa: error: no lsa-serve answers at {url}: start one (lsa serve) or give "
                                     f"its address with --url"]
    assert not (tmp_path / "r.jsonl").exists()


def test_generate_and_demo_check_their_input_before_loading_a_model(monkeypatch, capsys):
    import cli.generate

    monkeypatch.setattr(cli.generate, "_make_engine", lambda args: pytest.fail("no model for a bad input"))
    assert main(["generate", "--prompt-file", "/nonexistent/prompt.txt"]) == 2
    assert _stderr_lines(capsys) == ["lsa: error: cannot read --prompt-file /nonexistent/prompt.txt: "
                                     "No such file or directory"]
    assert main(["generate"]) == 2
    assert _stderr_lines(capsys) == ["lsa: error: give a prompt: lsa generate TEXT, or --prompt-file FILE"]
    assert main(["demo", "--haystack", "/nonexistent/haystack"]) == 2
    assert len(_stderr_lines(capsys)) == 1


def test_kv_line_explains_a_resident_set_above_the_full_context():
    from cli.generate import kv_line

    kv = {"full_kv_bytes": 2 << 20, "device_kv_bytes": 3 << 20, "device_kv_fraction": 1.5, "host_kv_bytes": 1 << 20}
    line = kv_line(kv, "cpu")
    assert "resident on cpu 3.0 MiB (150.0% of full: whole blocks and index keys" in line
    kv.update(device_kv_bytes=1 << 19, device_kv_fraction=0.25)
    assert "(25.0% of full)" in kv_line(kv, "cuda")


def test_the_console_command_prints_one_line():
    """``python -m cli`` (what the ``lsa`` script runs), end to end in a fresh process."""
    out = subprocess.run([sys.executable, "-m", "cli", "serve", "num_worker=2"], cwd=REPO, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == ["lsa: error: unknown argument 'num_worker'; did you mean "
                                               "'num_workers'?"]


# ------------------------------------------------------------------ layering


def imported_modules(path: Path) -> set[str]:
    """Top-level names of every module ``path`` imports, at any depth of the file (lazy imports too)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def imports_of(package: str) -> dict[str, set[str]]:
    return {str(p.relative_to(REPO)): imported_modules(p) for p in sorted((REPO / package).rglob("*.py"))}


@pytest.mark.parametrize("package, forbidden", [
    ("kernels", {"engine", "actors", "cluster", "lab", "cli", "benchmarks"}),
    ("engine", {"actors", "cluster", "lab", "cli", "benchmarks"}),
    ("actors", {"lab", "cli", "benchmarks"}),
    ("lab", {"actors", "cluster", "cli", "benchmarks"}),
    ("cluster", {"cli", "benchmarks"}),
    ("benchmarks", {"cli"}),  # benchmarks may drive the engine or the served cluster
])
def test_imports_point_down(package, forbidden):
    upward = {path: sorted(names & forbidden) for path, names in imports_of(package).items() if names & forbidden}
    assert not upward, f"imports from a higher layer: {upward}"


def test_only_the_cli_package_defines_the_console_entry():
    mains = [path for pkg in ("kernels", "engine", "actors", "cluster", "lab")
             for path, text in ((p, p.read_text()) for p in (REPO / pkg).rglob("*.py")) if "\ndef main(" in text]
    assert mains == [], mains
    assert "lsa = \"cli:main\"" in (REPO / "pyproject.toml").read_text()


def test_the_client_imports_nothing_of_the_cluster():
    """``cluster.batch`` runs jobs through the client; the client (stdlib, msgpack, the contract
    ``cluster/protocol.py`` and ``cluster/protocol_sessions.py``, which import pydantic only, and the
    server's typed errors, ``engine/errors.py``, which imports the standard library only) knows nothing of it."""
    def modules_of(path):
        tree = ast.parse(path.read_text())
        modules = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
        return modules | {f"{node.module}.{alias.name}" if node.module == "cluster" else node.module
                          for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module
                          for alias in node.names}

    contract = {"cluster.protocol", "cluster.protocol_sessions"}
    modules = modules_of(REPO / "cluster" / "client.py") - {"engine.errors"} - contract
    assert not {m for m in modules if m.split(".")[0] in ("cluster", "engine", "actors", "ray", "torch")}, modules
    for name in contract:
        imported = modules_of(REPO / (name.replace(".", "/") + ".py")) - contract
        assert {m.split(".")[0] for m in imported} <= {"__future__", "typing", "pydantic"}, (name, imported)
    assert {m.split(".")[0] for m in modules_of(REPO / "engine" / "errors.py")} <= set(sys.stdlib_module_names)
