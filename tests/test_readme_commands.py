"""Every command in the README's and docs/*.md's code blocks is run by a test, exactly as written.

What counts as a command (the rule :func:`collect_commands` applies to every fenced code block, parsed
with markdown-it, the CommonMark parser):

- a block tagged ``bash``, ``sh``, ``shell``, ``console`` or ``zsh``: every line, except blank lines,
  comment lines and ``export NAME=...`` lines (settings for the commands after them, with placeholder
  values; the tests of those commands set their own values);
- an untagged block (diagrams, storage layouts and CSV samples live in those too): the lines whose first
  word is a program in :data:`PROGRAMS`, a script path (``bench/x.sh``, ``./x``) or a command
  substitution (``"$(...)"``);
- any other language (``yaml``, ``python``, ...): none, those blocks show file or code contents.

A leading ``$ `` prompt and a trailing ``# comment`` are not part of the command; a line ending in ``\\``
continues on the next one. Inline code in the prose is not collected.

:data:`REGISTRY` maps each command, exactly as written, to how a test runs it: :class:`Runs` (as
written; ``env`` names variables the test sets, e.g. a free port instead of 3000), :class:`Adapted` (run
with a stated change, because as written it cannot run here) or :class:`NotRun` (with the reason; an
explicit allow-list, printed by the test). A command missing from the registry fails
:func:`test_every_documented_command_is_run_by_a_test` with its file and line; so does an entry for a
command no longer documented, or naming a test that does not exist. Whether a named test really runs its
command is checked loosely (its module holds the command, or all of its words, or reads README.md), which
catches a registry entry pointing at the wrong test, not a test that stopped running it.

The commands no other test ran are run here: the quick start's install (in a copy of the checkout) and
smoke demo, ``dagster dev``, ``pseudolabel workers ...``, ``ruff check .`` and the benchmark lines that
take seconds; ``pseudolabel fetch-models`` runs in tests/test_fetch_models.py. They run through bash in
the repo root (the demo in an empty folder: it writes ``./pseudolabel-demo``), with the orchestrator venv
first on PATH and without the variables tests/conftest.py sets for the harness.
"""

from __future__ import annotations

import ast
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from markdown_it import MarkdownIt

REPO = Path(__file__).resolve().parents[1]
TESTS = REPO / "tests"
SHELL_LANGUAGES = {"bash", "sh", "shell", "console", "zsh"}
PROGRAMS = {
    "pseudolabel",
    "dagster",
    "dagster-webserver",
    "dagster-daemon",
    "python",
    "python3",
    "pip",
    "pip3",
    "pytest",
    "ruff",
    "bash",
    "sh",
    "source",
    ".",
    "kubectl",
    "helm",
    "docker",
    "git",
    "curl",
    "make",
    "uv",
    "aws",
    "label-studio",
}
_EXPORT = re.compile(r"^export\s+[A-Za-z_][A-Za-z0-9_]*=")


def documents() -> list[Path]:
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


@dataclass(frozen=True)
class Command:
    text: str  # as written, without prompt or trailing comment
    where: str  # "README.md:26"


def strip_comment(line: str) -> str:
    """``line`` without a trailing shell comment (a ``#`` starting a word outside quotes)."""
    quote = ""
    for i, char in enumerate(line):
        if quote:
            quote = "" if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip()
    return line.rstrip()


def is_command_word(word: str) -> bool:
    return word in PROGRAMS or word.startswith(('"$(', "$(", "./")) or ("/" in word and word.endswith(".sh"))


def block_commands(content: str, language: str, first_line: int, name: str) -> list[Command]:
    """The commands of one fenced block (``first_line``: the file line of its first content line)."""
    found: list[Command] = []
    pending, start = "", 0
    for offset, raw in enumerate(content.splitlines()):
        line = raw.strip()
        if pending:
            line = f"{pending} {line}"
        else:
            start = first_line + offset
        if line.endswith("\\"):
            pending = line[:-1].rstrip()
            continue
        pending = ""
        line = strip_comment(line.removeprefix("$ ").strip())
        if not line or _EXPORT.match(line):
            continue
        if language in SHELL_LANGUAGES or (not language and is_command_word(line.split()[0])):
            found.append(Command(line, f"{name}:{start}"))
    return found


def collect_commands() -> list[Command]:
    """Every command of every fenced code block of README.md and docs/*.md, in document order."""
    parser = MarkdownIt()
    found: list[Command] = []
    for path in documents():
        name = str(path.relative_to(REPO))
        for token in parser.parse(path.read_text()):
            if token.type != "fence" or token.map is None:
                continue
            language = (token.info.split() or [""])[0].lower()
            found += block_commands(token.content, language, token.map[0] + 2, name)
    return found


@cache
def readme_commands() -> tuple[str, ...]:
    """The distinct commands, as written (what the registry is keyed by)."""
    return tuple(dict.fromkeys(c.text for c in collect_commands()))


# -- the registry ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Runs:
    """``test`` (``file.py::name``) runs the command exactly as written; ``env``: what it sets."""

    test: str
    env: str = ""


@dataclass(frozen=True)
class Adapted:
    """``test`` runs the command with ``change``; as written it cannot run here, because ``why``."""

    test: str
    change: str
    why: str


@dataclass(frozen=True)
class NotRun:
    """No test runs it, because ``why``."""

    why: str


THIS = "tests/test_readme_commands.py"
SEGMENT = "tests/test_backends.py::test_the_readme_segment_lines_run_offline"
REVIEW = "tests/test_review_loop.py::test_the_readme_review_loop_commands_as_written"
BACKFILL = "tests/test_dagster_dev.py::test_ui_workflow_on_sqlite_instance_storage"
OFFLINE_SEGMENT = Adapted(
    SEGMENT,
    "`--random-weights` appended (text prompts also `--all-candidates --box-floor 0`)",
    "the official weights are GB-sized downloads and pretrained weights need a CUDA GPU",
)
QUICK_BENCH = f"{THIS}::test_the_quick_benchmark_lines_as_written"
BENCHMARK = "a benchmark, its figures in the README's 'Measured'"
REGISTRY: dict[str, Runs | Adapted | NotRun] = {
    # Quick start
    "python -m venv .venv && . .venv/bin/activate": Runs(f"{THIS}::test_the_quick_start_install_as_written"),
    'python -m pip install -e ".[dev]"': Runs(f"{THIS}::test_the_quick_start_install_as_written"),
    "pseudolabel demo --random-weights": Runs(f"{THIS}::test_the_smoke_demo_as_written"),
    "pseudolabel demo": NotRun(
        "the official checkpoints (~1.2 GB) need a CUDA GPU; on a GPU-less machine "
        "tests/test_demo.py::test_the_official_demo_without_a_gpu_says_so_before_any_download runs it "
        "(with --out) and checks that it refuses before any download"
    ),
    "python -m pytest": NotRun("the test suite itself: a test running it would run itself; CI runs it"),
    "dagster dev -w workspace.yaml": Runs(f"{THIS}::test_dagster_dev_as_written", "DAGSTER_CLI_DEV_PORT"),
    # pseudolabel segment
    'pseudolabel segment photos/*.jpg --prompt "tree . bush ." --out segmented/': OFFLINE_SEGMENT,
    'pseudolabel segment photo.jpg --prompt "tree ." --detector owlv2 --segmenter edgetam --out out/': (
        OFFLINE_SEGMENT
    ),
    "pseudolabel segment photo.jpg --auto --prompt-mode point --out out/": OFFLINE_SEGMENT,
    "pseudolabel segment photo.jpg --boxes boxes.json --polygons --out out/": OFFLINE_SEGMENT,
    "pseudolabel segment photo.jpg --points clicks.jsonl --out out/": OFFLINE_SEGMENT,
    'pseudolabel segment photo.jpg --prompt "tree ." --detector sam3 --out out/': OFFLINE_SEGMENT,
    "pseudolabel segment photo.jpg --auto --random-weights --out out/": Runs(SEGMENT),
    # Operating it
    "pseudolabel fetch-models": Runs(
        "tests/test_fetch_models.py::test_fetch_models_downloads_verifies_and_caches",
        "PSEUDOLABEL_CHECKPOINT_BASE_URL, PSEUDOLABEL_CHECKPOINT_SHA256, HF_ENDPOINT: local servers",
    ),
    "dagster asset materialize -m dagster_project.definitions --select "
    "normalized_images,detections,masks,pseudo_labels --partition shard-00000": Runs(
        "tests/test_model_workers.py::test_the_readme_cli_materializes_a_shard_in_the_orchestrator_environment"
    ),
    "dagster job backfill -w workspace.yaml -j shard_chain_job --all --noprompt": Runs(BACKFILL),
    "dagster job backfill -w workspace.yaml -j relabel_job --all --noprompt": Runs(BACKFILL),
    # The review loop
    "dagster asset materialize -m dagster_project.definitions --select review_queue": Runs(REVIEW),
    "dagster asset materialize -m dagster_project.definitions --select reviewed_labels": Runs(REVIEW),
    "dagster asset materialize -m dagster_project.definitions --select label_quality": Runs(REVIEW),
    "pseudolabel thresholds adopt": Runs(REVIEW),
    "dagster asset materialize -m dagster_project.definitions --select pseudo_labels "
    "--partition-range shard-00000...shard-00001": Runs(REVIEW),
    "dagster asset materialize -m dagster_project.definitions --select autosam2_manifest,dataset_exports": Runs(
        REVIEW
    ),
    # Tests and benchmarks
    "pseudolabel workers install --extra worker --extra worker-test": Runs(
        f"{THIS}::test_the_workers_commands_as_written"
    ),
    '"$(pseudolabel workers python --extra worker --extra worker-test)" -m pytest -c tests/worker/pytest.ini '
    "tests/worker": Runs(
        f"{THIS}::test_the_workers_commands_as_written",
        "PYTEST_ADDOPTS narrows it to test_checkpoints.py; test_worker_suite.py runs the whole folder",
    ),
    "ruff check .": Runs(f"{THIS}::test_ruff_check_as_written"),
    "python bench/gpu_chain.py --help": Runs(QUICK_BENCH, "PATH: the worker interpreter first (torch)"),
    "python bench/relabel.py": Runs(QUICK_BENCH),
    "python bench/download_normalize.py": Runs(QUICK_BENCH),
    # Benchmarks that take longer: measurements for a quiet machine, exit code their only check.
    "python bench/code_location.py": NotRun(
        f"{BENCHMARK}: 45 s here (3 repeats of each load, two backfills)"
    ),
    "python bench/catalog_snapshot.py --rows 15000000": NotRun(
        f"{BENCHMARK}: ~2 min and ~0.5 GB for 15M rows"
    ),
    "python bench/video.py --sam2": NotRun(f"{BENCHMARK}: minutes (one subprocess per tracker and length)"),
    "python bench/gpu_host_overhead.py": NotRun(f"{BENCHMARK}: minutes on a CPU (12 MP x 300 candidates)"),
    "python bench/gpu_host_overhead.py --sizes 12mp --candidates 300 --images 2": NotRun(
        f"{BENCHMARK}: minutes on a CPU (the previous path takes ~27 s per image)"
    ),
    "python bench/gpu_host_overhead.py --stages masks --gpu-plan": NotRun(f"{BENCHMARK}: minutes on a CPU"),
    "python bench/gpu_host_overhead.py --stages transformer --batch-size 8": NotRun(
        f"{BENCHMARK}: full-depth Grounding DINO on a CPU"
    ),
    "bench/gpu_checks.sh gpu-results": NotRun("needs a CUDA GPU (the CUDA tests and GPU benchmarks)"),
}


# -- the registry's checks -------------------------------------------------------------------------


@dataclass(frozen=True)
class Sources:
    function: str  # the test function's source
    module: str  # its module's source ("" for this module: its registry names every command)


def defined_tests() -> dict[str, Sources]:
    """``tests/file.py::name`` of every module-level test function under tests/ -> its sources."""
    found: dict[str, Sources] = {}
    for path in sorted(TESTS.glob("test_*.py")):
        source = path.read_text()
        module = "" if path.name == Path(THIS).name else source
        for node in ast.parse(source).body:
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name.startswith("test_"):
                function = ast.get_source_segment(source, node) or ""
                found[f"tests/{path.name}::{node.name}"] = Sources(function, module)
    return found


def mentions(test: Sources, command: str) -> bool:
    """Whether a test plausibly runs ``command``: the function holds it or each of its words, or its
    module does, or the module reads the README's commands."""
    words = shlex.split(command)
    return any(
        command in source or all(word in source for word in words) for source in (test.function, test.module)
    ) or ("README.md" in test.module)


def test_every_documented_command_is_run_by_a_test():
    commands = collect_commands()
    assert len(commands) >= 30, [c.text for c in commands]  # the parser found the blocks
    tests = defined_tests()
    problems = [
        f"{c.where}: `{c.text}` is run by no test: add a test that runs it as written and a REGISTRY entry "
        f"in {THIS} (or a NotRun entry saying why it cannot run here)"
        for c in commands
        if c.text not in REGISTRY
    ]
    documented = {c.text for c in commands}
    problems += [
        f"REGISTRY entry `{text}` is in no code block any more" for text in REGISTRY if text not in documented
    ]
    for text, entry in REGISTRY.items():
        if isinstance(entry, NotRun):
            continue
        if entry.test not in tests:
            problems.append(f"`{text}`: {entry.test} does not exist")
        elif not mentions(tests[entry.test], text):
            problems.append(f"`{text}`: {entry.test}'s module does not look like it runs it")
    not_run = [f"  {text}\n      not run: {e.why}" for text, e in REGISTRY.items() if isinstance(e, NotRun)]
    adapted = [
        f"  {text}\n      {e.test}: {e.change} ({e.why})"
        for text, e in REGISTRY.items()
        if isinstance(e, Adapted)
    ]
    print(f"{len(documented)} documented commands; not run as written:", *not_run, *adapted, sep="\n")
    assert not problems, "\n".join(problems)


def test_the_collection_rule():
    """Shell blocks count every line but exports and comments; untagged blocks only program lines;
    comments, prompts and continuations are handled; yaml is not shell."""
    text = (
        "```bash\n"
        "export A=1   # a setting\n"
        "# a comment\n"
        '$ pseudolabel segment x.jpg --prompt "a # b" --out o/   # comment\n'
        "dagster asset materialize \\\n"
        "  --select x\n"
        "```\n"
        "```\n"
        "catalog ─► sample\n"
        "<root>/images/<shard>.parquet   index\n"
        "python bench/relabel.py    # bench\n"
        "bench/gpu_checks.sh out\n"
        "```\n"
        "```yaml\n"
        "python: 3\n"
        "```\n"
    )
    parser = MarkdownIt()
    found = []
    for token in parser.parse(text):
        language = (token.info.split() or [""])[0].lower()
        found += block_commands(token.content, language, token.map[0] + 2, "X.md")
    assert [(c.text, c.where) for c in found] == [
        ('pseudolabel segment x.jpg --prompt "a # b" --out o/', "X.md:4"),
        ("dagster asset materialize --select x", "X.md:5"),
        ("python bench/relabel.py", "X.md:11"),
        ("bench/gpu_checks.sh out", "X.md:12"),
    ]


# -- the commands no other test runs ---------------------------------------------------------------


# Set for every test by tests/conftest.py (loopback image servers, no step retries); a user has neither.
HARNESS_ENV = ("PSEUDOLABEL_ALLOWED_IMAGE_NETWORKS", "PSEUDOLABEL_STEP_RETRIES")


def user_env(**extra: str) -> dict[str, str]:
    """A user's shell with the orchestrator venv activated (its bin/ first on PATH), without the
    variables the test harness sets for itself."""
    bin_dir = str(Path(sys.executable).parent)
    env = {k: v for k, v in os.environ.items() if k not in HARNESS_ENV}
    return {**env, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", **extra}


def run_as_written(
    command: str, env: dict[str, str], cwd: Path = REPO, timeout: float = 600
) -> subprocess.CompletedProcess:
    """``command`` exactly as documented, through bash, in ``cwd`` (default: the repo root)."""
    assert command in readme_commands(), command
    return subprocess.run(
        ["bash", "-c", command], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def test_ruff_check_as_written():
    done = run_as_written("ruff check .", user_env())
    assert done.returncode == 0, done.stdout[-5000:]


def test_dagster_dev_as_written(tmp_path):
    """`dagster dev -w workspace.yaml` from the repo root, with the Operating section's variables set to
    local values: the webserver answers and the code location loads. The port comes from
    ``DAGSTER_CLI_DEV_PORT`` (click's variable for ``dagster dev --port``), so 3000 may be taken."""
    from dagster_dev import DagsterDev, instance_yaml

    home = tmp_path / "dagster_home"
    instance_yaml(home)
    catalog = tmp_path / "catalog.csv"
    catalog.write_text("image_url,label\nhttp://127.0.0.1:9/a.jpg,oak\n")
    server = DagsterDev(home, {}, tmp_path / "dagster-dev.log")
    env = {k: v for k, v in user_env().items() if not k.startswith("DAGSTER_")}
    env |= {
        "DAGSTER_HOME": str(home),
        "DAGSTER_CLI_DEV_PORT": str(server.port),
        "PSEUDOLABEL_CATALOG": str(catalog),
        "PSEUDOLABEL_STORAGE": str(tmp_path / "data"),
    }
    command = "dagster dev -w workspace.yaml"
    assert command in readme_commands()
    with open(server.log_path, "ab") as log:
        server.process = subprocess.Popen(
            ["bash", "-c", command],
            cwd=REPO,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # its own process group: stop() ends webserver, daemon, code server
        )
    try:
        server.wait_for("the webserver to answer /server_info", server._server_info, 240)
        server.wait_for("the code location to load", server.location_loaded, 240)
    finally:
        server.stop()


def test_the_workers_commands_as_written(worker_python):
    """`pseudolabel workers install ...` prints the test worker environment's interpreter (built by the
    `worker_python` fixture, so nothing is built here); the worker-suite line, its `$(...)` included, runs
    that folder's tests on it (narrowed by ``PYTEST_ADDOPTS`` to test_checkpoints.py: the whole folder
    runs in tests/test_worker_suite.py)."""
    from pseudolabel.workers.environment import (
        PYTHON_ENV,
        environment_key,
        worker_requirements,
        workers_home,
    )

    extras = ("worker", "worker-test")
    built = workers_home() / environment_key(worker_requirements(extras))
    env = user_env()
    expected = worker_python
    if (built / ".complete").exists():  # the fixture built it: check the build's own lookup, not the override
        env.pop(PYTHON_ENV, None)
        expected = str(built / "bin" / "python")
    install = run_as_written("pseudolabel workers install --extra worker --extra worker-test", env)
    assert install.returncode == 0, install.stderr[-3000:]
    assert install.stdout.strip().splitlines()[-1] == expected
    assert "building" not in install.stderr  # already built: found, not rebuilt

    suite = run_as_written(
        '"$(pseudolabel workers python --extra worker --extra worker-test)" -m pytest -c tests/worker/pytest.ini '
        "tests/worker",
        env | {"PYTEST_ADDOPTS": "-k test_checkpoints"},
    )
    assert suite.returncode == 0, suite.stdout[-5000:] + suite.stderr[-2000:]
    summary = suite.stdout.strip().splitlines()[-1]
    passed = re.search(r"(\d+) passed", summary)
    assert passed and int(passed.group(1)) >= 5 and "failed" not in summary, summary
    assert "rootdir: " + str(REPO / "tests" / "worker") in suite.stdout


def test_the_quick_benchmark_lines_as_written(worker_python):
    """The benchmark lines that finish within ~30 s here, each as written; what they print is measured,
    not checked, beyond their summary lines. `bench/gpu_chain.py` imports torch: its `python` is the
    worker interpreter (the worker environment activated); the others run in the orchestrator venv."""
    orchestrator = user_env()
    worker = orchestrator | {"PATH": f"{Path(worker_python).parent}{os.pathsep}{orchestrator['PATH']}"}
    expected = {
        "python bench/gpu_chain.py --help": (worker, "usage: gpu_chain.py"),
        "python bench/relabel.py": (orchestrator, "speed-up of relabel over the baseline:"),
        "python bench/download_normalize.py": (orchestrator, "speed-up:"),
    }
    for command, (env, summary) in expected.items():
        done = run_as_written(command, env)
        assert done.returncode == 0, (command, done.stdout[-2000:], done.stderr[-3000:])
        assert summary in done.stdout, (command, done.stdout[-2000:])


def test_the_smoke_demo_as_written(tmp_path, worker_python):
    """`pseudolabel demo --random-weights` in an empty folder: the whole chain on the synthetic catalog,
    ending at an AutoSAM2 dataset under ./pseudolabel-demo, labelled a smoke run."""
    done = run_as_written("pseudolabel demo --random-weights", user_env(), cwd=tmp_path, timeout=1200)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    assert "SMOKE RUN" in done.stdout
    counts = dict(re.findall(r"^  (\S+)\s+([\d,]+)$", done.stdout, re.MULTILINE))
    samples = int(counts["autosam2_manifest.samples"].replace(",", ""))
    (dataset,) = re.findall(r"AutoSAM2 dataset: (\S+)", done.stdout)
    assert Path(dataset).is_relative_to(tmp_path / "pseudolabel-demo"), dataset
    assert samples > 0 and len(list(Path(dataset).glob("samples/*.jpg"))) == samples
    manifest = (Path(dataset) / "manifest.jsonl").read_text().splitlines()
    assert len(manifest) == samples


def checkout_copy(target: Path) -> Path:
    """The working tree's tracked and unignored files copied into ``target``: what a fresh clone holds
    (no .venv, no caches), so the quick start's relative paths act on the copy, never on this checkout."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        check=True,
    ).stdout
    for name in filter(None, listed.split(b"\0")):
        source = REPO / os.fsdecode(name)
        if source.is_file():  # a tracked file deleted in the working tree is not in a clone of it either
            (target / os.fsdecode(name)).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / os.fsdecode(name))
    return target


def test_the_quick_start_install_as_written(tmp_path):
    """The Quick start's first two lines, in one shell, in a copy of the checkout: a new virtualenv with
    the orchestrator environment, whose `pseudolabel` works and which has no torch. The slowest test of
    this module (~2.5 min here, mostly pip unpacking ~300 packages); ``PIP_NO_COMPILE`` skips byte-compiling
    them, the packages are the same."""
    clone = checkout_copy(tmp_path / "clone")
    lines = ["python -m venv .venv && . .venv/bin/activate", 'python -m pip install -e ".[dev]"']
    assert all(line in readme_commands() for line in lines)
    env = {k: v for k, v in user_env().items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")}
    done = subprocess.run(
        ["bash", "-c", "set -e\n" + "\n".join(lines)],
        cwd=clone,
        env=env | {"PIP_NO_COMPILE": "1"},
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    bin_dir = clone / ".venv" / "bin"
    cli = subprocess.run(
        [bin_dir / "pseudolabel", "--help"], env=env, capture_output=True, text=True, timeout=120
    )
    assert cli.returncode == 0 and "fetch-models" in cli.stdout, cli.stderr[-3000:]
    probe = (
        "import importlib.util as u, pseudolabel; print(pseudolabel.__file__, u.find_spec('torch') is None)"
    )
    found = subprocess.run(
        [bin_dir / "python", "-c", probe], env=env, cwd=tmp_path, capture_output=True, text=True
    )
    assert found.stdout.split() == [str(clone / "pseudolabel" / "__init__.py"), "True"], found.stderr
