"""The README and docs/ cannot drift from the code: their commands run, their flags exist, their names resolve.

Every fenced ``bash`` or ``python`` block of README.md and docs/*.md carries a marker, the HTML comment on the line
above it:

* ``<!-- runnable -->``: run by the quick suite, with tiny settings (few episodes, few steps), in a fresh folder per
  page with a private reference cache; a page's blocks run in order, so a later block uses an earlier one's files;
* ``<!-- runnable: expensive -->``: run with the page's other blocks by the full suite;
* ``<!-- runnable: setup -->``: an install command: its extras must exist, and what it runs after installing is run;
* ``<!-- file: NAME -->``: written as NAME into the page's folder before its blocks run;
* ``<!-- runs in: PAGE -->``: every command of it is one of PAGE's runnable commands;
* ``<!-- not run: why -->``: hours of benchmark or a cluster; its flags are still checked.

Every ``ajpq <command> --flag`` and ``python <script>.py --flag`` the pages mention, in blocks and in inline code,
must be an option of that command's parser; every ``ajpq.module.name`` must resolve, every path to a file of the
repository must exist, and every link must reach a file and heading.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from ajpq.cli import build_parser
from ajpq.cli.common import plain_text

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
RUN_MARKERS = ("runnable", "runnable: expensive", "runnable: setup")
COMMAND_TIMEOUT = 600

TINY_ARGS = {
    "search": ["--episodes", "8", "--episodes-per-update", "2", "--checkpoint-every", "4", "--no-progress"],
    "finetune": ["--epochs", "1", "--max-steps", "3"],
    "pretrain": ["--epochs", "1"],
}
"""Appended to a runnable ``ajpq <command>`` (argparse keeps the last value of a flag given twice)."""


@dataclass(frozen=True)
class Block:
    page: Path
    line: int
    lang: str
    marker: str | None
    text: str

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def read_blocks(page: Path) -> list[Block]:
    """The fenced blocks of a page, each with the marker on the line above its fence (or None)."""
    lines = page.read_text(encoding="utf-8").splitlines()
    blocks, i = [], 0
    while i < len(lines):
        fence = re.fullmatch(r"```(\w*)\s*", lines[i])
        if fence is None:
            i += 1
            continue
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
        above = re.fullmatch(r"<!--\s*(.*?)\s*-->", lines[i - 1].strip()) if i else None
        marker = above.group(1) if above else None
        blocks.append(Block(page, i + 1, fence.group(1), marker, "\n".join(lines[i + 1 : end])))
        i = end + 1
    return blocks


ALL_BLOCKS = [block for page in PAGES for block in read_blocks(page)]


def commands(text: str) -> list[list[str]]:
    """The commands of a shell block as token lists (continuations joined, comments dropped; ``a && b`` is two)."""
    joined = re.sub(r"\\\n\s*", " ", text)
    found = []
    for line in joined.splitlines():
        tokens = shlex.split(line, comments=True)
        command: list[str] = []
        for token in [*tokens, "&&"]:
            if token in ("&&", ";"):
                if command:
                    found.append(command)
                command = []
            else:
                command.append(token)
    return found


def code_spans(text: str) -> list[str]:
    """Inline code of a page's prose (fenced blocks left out)."""
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    return re.findall(r"`([^`\n]+)`", prose)


# ------------------------------------------------------------------------------------------------ markers


def test_every_shell_and_python_block_is_marked() -> None:
    known = re.compile(r"runnable(: (expensive|setup))?|file: [\w.]+|runs in: [\w/.-]+\.md|not run: .+")
    for block in ALL_BLOCKS:
        if block.lang in ("bash", "sh", "python"):
            assert block.marker is not None and known.fullmatch(block.marker), (
                f"{block.where}: a {block.lang} block needs a marker such as <!-- runnable --> (see tests/test_docs.py)"
            )
    assert any(b.marker == "runnable" for b in ALL_BLOCKS)


def test_blocks_marked_runs_in_are_run_there() -> None:
    for block in ALL_BLOCKS:
        if block.marker is None or not block.marker.startswith("runs in: "):
            continue
        target = ROOT / block.marker.removeprefix("runs in: ")
        run = [c for b in read_blocks(target) if b.marker in RUN_MARKERS for c in commands(b.text)]
        for command in commands(block.text):
            assert command in run, f"{block.where}: {shlex.join(command)!r} is not run in {target.name}"


# ------------------------------------------------------------------------------------------------ flags


def ajpq_options() -> dict[str, set[str]]:
    """Every ``ajpq`` command's option strings."""
    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    options = {"": {s for a in parser._actions for s in a.option_strings}}
    for name, command in sub.choices.items():  # type: ignore[attr-defined]
        options[name] = {s for a in command._actions for s in a.option_strings}
    return options


def script_options(path: Path) -> set[str]:
    """The options a script's ``--help`` lists (its parser run in this process)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"_docs_{path.stem}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = io.StringIO()
    argv = sys.argv
    sys.argv = [str(path), "--help"]
    try:
        with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
            module.main()
    finally:
        sys.argv = argv
    return set(re.findall(r"(?<![\w-])--[a-z0-9][a-z0-9-]*", out.getvalue()))


def mentioned_commands() -> list[tuple[str, list[str]]]:
    """``(where, tokens)`` of every ajpq or script command in the pages' blocks and inline code."""
    found = []
    for block in ALL_BLOCKS:
        if block.lang == "bash":
            found += [(block.where, c) for c in commands(block.text)]
    for page in PAGES:
        for span in code_spans(page.read_text(encoding="utf-8")):
            if re.match(r"(ajpq [a-z]|(\S*python3? )?(experiments|docs)/\S+\.py)", span):
                with contextlib.suppress(ValueError):
                    found.append((str(page.relative_to(ROOT)), shlex.split(re.sub(r"[|\[\]]", " ", span))))
    return found


def flags_of(tokens: list[str]) -> list[str]:
    return [t.split("=")[0] for t in tokens if re.fullmatch(r"--[a-z0-9][a-z0-9-]*(=.*)?", t)]


def test_every_flag_mentioned_is_an_option_of_its_command() -> None:
    options = ajpq_options()
    scripts: dict[Path, set[str]] = {}
    checked = 0
    for where, tokens in mentioned_commands():
        if tokens and tokens[0].endswith("ajpq") and len(tokens) > 1:
            command = tokens[1]
            assert command in options, f"{where}: no command `ajpq {command}`"
            known, name = options[command] | options[""], f"ajpq {command}"
        else:
            script = next((t for t in tokens if t.endswith(".py") and "/" in t), None)
            if not flags_of(tokens[1:]):
                continue  # a script named without options (never imported: it may run on import)
            if script is None or not (ROOT / script).is_file():
                assert script is None or not script.startswith(("experiments/", "docs/")), f"{where}: no {script}"
                continue
            if ROOT / script not in scripts:
                scripts[ROOT / script] = script_options(ROOT / script)
            known, name = scripts[ROOT / script], script
        for flag in flags_of(tokens[1:]):
            assert flag in known, f"{where}: `{name}` has no option {flag} (see `{name} --help`)"
            checked += 1
    assert checked > 100  # the pages mention many; a parser that found none would pass vacuously


def test_flags_in_each_cli_reference_section_belong_to_its_command() -> None:
    """Under ``## `ajpq X``` in docs/cli.md, every inline ``--flag`` is an option of X."""
    options = ajpq_options()
    every = set().union(*options.values())
    command = None
    for line in (ROOT / "docs" / "cli.md").read_text(encoding="utf-8").splitlines():
        heading = re.match(r"##+ (.*)", line)
        if heading:
            named = re.fullmatch(r"`ajpq ([a-z-]+)`", heading.group(1))
            command = named.group(1) if named else None
            continue
        for span in re.findall(r"`(--[^`]+)`", line):
            for flag in flags_of(span.replace("/", " ").split()):
                allowed = options[command] if command else every
                assert flag in allowed, f"docs/cli.md: {flag} is not an option of `ajpq {command or '...'}`"


# ------------------------------------------------------------------------------------------------ names


def _resolve(dotted: str) -> bool:
    import importlib

    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attr in parts[cut:]:
            if not hasattr(obj, attr):
                return False
            obj = getattr(obj, attr)
        return True
    return False


def test_every_python_name_and_file_path_mentioned_exists() -> None:
    names, paths = set(), set()
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        for span in code_spans(text):
            names.update(re.findall(r"(?<![\w./-])ajpq(?:\.[A-Za-z_]\w*)+", span))
        paths.update(re.findall(r"(?<![\w./-])((?:ajpq|envs|agents|experiments|tests|docs)/[\w/.-]*\.[a-z]+)\b", text))
    missing = sorted(n for n in names if not _resolve(n))
    assert not missing, f"names the docs mention that do not exist: {missing}"
    gone = sorted(p for p in paths if not (ROOT / p).exists() and "*" not in p and "<" not in p)
    assert not gone, f"paths the docs mention that do not exist: {gone}"
    assert "ajpq.runner.run_search" in names and "ajpq/qat.py" in paths  # the scan sees what it should


def slug(heading: str) -> str:
    """GitHub's anchor of a heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", ""))
    return text.replace(" ", "-")


def test_every_link_reaches_a_file_and_heading() -> None:
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"https?://", target):
                continue
            file, _, anchor = target.partition("#")
            path = (page.parent / file).resolve() if file else page
            assert path.exists(), f"{page.name}: link to missing {target}"
            if anchor:
                lines = re.sub(r"```.*?```", "", path.read_text(encoding="utf-8"), flags=re.S).splitlines()
                anchors = {slug(m.group(1)) for line in lines if (m := re.match(r"#+ (.*)", line))}
                assert anchor in anchors, f"{page.name}: no heading #{anchor} in {path.name}"


def test_the_old_module_paths_are_gone() -> None:
    old = re.compile(r"ajpq/(search|finetune|export)\.py|ajpq\.(search|finetune|export)\.\w")
    for page in PAGES:
        hits = old.findall(page.read_text(encoding="utf-8"))
        assert not hits, f"{page.name} names modules renamed to ajpq/runner.py, qat.py, artifact.py: {hits}"


def test_readme_stays_short() -> None:
    assert len((ROOT / "README.md").read_text(encoding="utf-8").splitlines()) <= 250


# ------------------------------------------------------------------------------------------------ --help


MARKUP = (":mod:`", ":class:`", ":func:`", ":data:`", ":meth:`", ":attr:`", ":exc:`", "``")


def test_help_texts_are_plain_text() -> None:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    texts = {"ajpq": parser.format_help()}
    texts |= {f"ajpq {n}": p.format_help() for n, p in sub.choices.items()}  # type: ignore[attr-defined]
    assert len(texts) == 9
    for name, text in texts.items():
        found = [m for m in MARKUP if m in text]
        assert not found, f"`{name} --help` shows Sphinx markup {found}"


def test_plain_text_turns_sphinx_roles_into_their_targets() -> None:
    assert plain_text("a name registered in :mod:`ajpq.methods`") == "a name registered in ajpq.methods"
    assert plain_text("see :class:`~ajpq.runner.SearchResult` and ``x``") == "see SearchResult and x"
    assert plain_text(":py:func:`f` of :data:`ajpq.data.IN_MEMORY_BYTES`") == "f of ajpq.data.IN_MEMORY_BYTES"


# ------------------------------------------------------------------------------------------------ running


def tiny_command(tokens: list[str], folder: Path) -> list[str]:
    """A runnable command with tiny settings."""
    if tokens[0] == "ajpq" and len(tokens) > 1:
        if tokens[1] == "compare":
            at = tokens.index("--config")
            tokens = [*tokens[:at], "--config", str(tiny_compare_config(folder / tokens[at + 1], folder))]
        elif not (tokens[1] == "search" and "--resume" in tokens):
            tokens = [*tokens, *TINY_ARGS.get(tokens[1], [])]
    return tokens


def tiny_compare_config(config: Path, folder: Path) -> Path:
    values = yaml.safe_load(config.read_text())["default"]
    values |= {"episodes": 4, "finetune_epochs": 1, "budgets": values["budgets"][:1], "out_dir": str(folder / "cmp")}
    values["method_options"] = {
        "olmp": {"rounds": 1, "population": 2, "iterations": 1, "retrain_epochs": 1},
        "admm": {"steps": 1, "admm_epochs": 1, "retrain_epochs": 1, "quant_epochs": 1},
    }
    out = folder / f"tiny_{config.name}"
    out.write_text(yaml.safe_dump({"default": values}))
    return out


def tiny_python(source: str) -> str:
    """A Python block with tiny settings: a fifth of its episodes (2 to 8), one epoch, ten training steps."""
    source = re.sub(r"\bepisodes=(\d+)", lambda m: f"episodes={max(2, min(int(m.group(1)) // 5, 8))}", source)
    source = re.sub(r"\bepochs=\d+", "epochs=1", source)
    return re.sub(r"range\(100\)", "range(10)", source)


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A private reference cache holding a short-trained digits reference (the pages' default model)."""
    from ajpq.cli import main
    from ajpq.data import load_dataset
    from ajpq.reference import reference_cache_path

    folder = tmp_path_factory.mktemp("docs-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("AJPQ_CACHE_DIR", str(folder))
        target = reference_cache_path("digits_cnn", load_dataset("digits"))
        assert main(["pretrain", "--epochs", "3", "--out", str(target)]) == 0
    return folder


def run_page(page: Path, markers: tuple[str, ...], folder: Path, cache: Path) -> int:
    """Run a page's blocks with one of ``markers`` in order in ``folder``; returns how many ran."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "experiments").symlink_to(ROOT / "experiments")
    env = {**os.environ, "AJPQ_CACHE_DIR": str(cache), "AJPQ_NO_PROGRESS": "1"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    ran = 0
    for i, block in enumerate(read_blocks(page)):
        if block.marker and block.marker.startswith("file: "):
            (folder / block.marker.removeprefix("file: ")).write_text(block.text + "\n")
            continue
        if block.marker not in markers:
            continue
        if block.lang == "python":
            script = folder / f"block{i}.py"
            script.write_text(tiny_python(block.text) + "\n")
            runs = [[sys.executable, str(script)]]
        else:
            runs = [tiny_command(c, folder) for c in commands(block.text)]
        for argv in runs:
            done = subprocess.run(
                argv, cwd=folder, env=env, capture_output=True, text=True, timeout=COMMAND_TIMEOUT, check=False
            )
            assert done.returncode == 0, (
                f"{block.where}: `{shlex.join(argv)}` exited {done.returncode}:\n{done.stderr[-3000:]}"
            )
            ran += 1
    return ran


def pages_with(marker: str) -> list[Path]:
    return [p for p in PAGES if any(b.marker == marker for b in read_blocks(p))]


@pytest.mark.parametrize("page", pages_with("runnable"), ids=lambda p: p.name)
def test_runnable_blocks_run(page: Path, tmp_path: Path, cache: Path) -> None:
    assert run_page(page, ("runnable",), tmp_path / "work", cache) > 0


@pytest.mark.expensive
@pytest.mark.parametrize(
    "page", sorted(set(pages_with("runnable: expensive")) | set(pages_with("runnable"))), ids=lambda p: p.name
)
def test_every_runnable_block_runs(page: Path, tmp_path: Path, cache: Path) -> None:
    assert run_page(page, ("runnable", "runnable: expensive"), tmp_path / "work", cache) > 0


def test_setup_commands_install_what_exists_and_run(tmp_path: Path, cache: Path) -> None:
    """The README's install commands: their extras exist, the CPU wheel index is PyTorch's, and what they run after
    installing (the main job, the quick suite) runs here on this install."""
    from importlib.metadata import metadata

    extras = set(metadata("ajpq").get_all("Provides-Extra") or [])
    markers = re.search(r"^markers = (.*)$", (ROOT / "pyproject.toml").read_text(), re.M)
    assert extras >= {"test", "onnx", "ray"} and markers is not None
    setup = [b for b in read_blocks(ROOT / "README.md") if b.marker == "runnable: setup"]
    assert len(setup) == 3
    then: list[list[str]] = []
    for block in setup:
        for tokens in commands(block.text):
            if tokens[:3] == ["python3", "-m", "venv"]:
                continue
            if tokens[0] == ".venv/bin/pip":
                assert tokens[1] == "install"
                for target in tokens[2:]:
                    wanted = re.fullmatch(r"\.\[([\w,]+)\]", target)
                    assert wanted is None or set(wanted.group(1).split(",")) <= extras, target
                if "--index-url" in tokens:
                    assert tokens[tokens.index("--index-url") + 1] == "https://download.pytorch.org/whl/cpu"
                continue
            assert tokens[0].startswith(".venv/bin/"), tokens
            then.append([tokens[0].removeprefix(".venv/bin/"), *tokens[1:]])
    assert [t[0] for t in then] == ["ajpq", "python"]
    main_job, tests = then
    assert tests[:3] == ["python", "-m", "pytest"] and "-m" in tests[3:]
    expression = tests[tests.index("-m", 3) + 1]
    assert expression == "not expensive" and '"expensive:' in markers.group(1)
    (tmp_path / "work").mkdir()
    env = {**os.environ, "AJPQ_CACHE_DIR": str(cache)}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    done = subprocess.run(
        tiny_command(main_job, tmp_path), cwd=tmp_path / "work", env=env, capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "best" in done.stdout
    collected = subprocess.run(
        [sys.executable, *tests[1:], "--collect-only", str(ROOT / "tests" / "test_docs.py")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert collected.returncode == 0 and "test_every_runnable_block_runs" not in collected.stdout, collected.stdout


@pytest.mark.expensive
def test_a_fresh_environment_gets_the_console_script_and_runs_the_main_job(tmp_path: Path, cache: Path) -> None:
    """`pip install -e .` into a new environment (its dependencies reused from this one: no network here) gives an
    `ajpq` whose packages, envs and agents included, import outside the source tree, and the main job runs."""
    import site
    import venv

    env_dir = tmp_path / ".venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    target = next((env_dir / "lib").glob("python*/site-packages"))
    reused = [p for p in [*site.getsitepackages(), *sys.path] if p.endswith("site-packages") and Path(p).is_dir()]

    def setuptools_version(folder: str) -> tuple[int, ...]:
        found = [re.match(r"setuptools-(\d+)", d.name) for d in Path(folder).glob("setuptools-*.dist-info")]
        return max((int(m.group(1)),) for m in found if m) if any(found) else (0,)

    reused.sort(key=lambda folder: setuptools_version(folder) < (68,))  # the build backend pyproject.toml asks for
    if not reused or setuptools_version(reused[0]) < (68,):
        pytest.skip("no setuptools>=68 installed to build ajpq with, offline")
    (target / "reused.pth").write_text("\n".join(dict.fromkeys(reused)) + "\n")
    pip = [sys.executable, "-m", "pip", "--python", str(env_dir / "bin" / "python"), "install", "-q"]
    installed = subprocess.run(
        [*pip, "--no-deps", "--no-build-isolation", "-e", str(ROOT)], capture_output=True, text=True, check=False
    )
    assert installed.returncode == 0, installed.stderr[-3000:]
    (tmp_path / "work").mkdir()
    done = subprocess.run(
        [str(env_dir / "bin" / "ajpq"), "search", *TINY_ARGS["search"]],
        cwd=tmp_path / "work",
        env={**os.environ, "AJPQ_CACHE_DIR": str(cache)},
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "best" in done.stdout
