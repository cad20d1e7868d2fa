"""The documentation's commands and links: README.md and docs/*.md must not go stale.

Every `python -m wsda_jax...` command they show must name an existing module whose
`--help` works and lists the flags the command uses; every relative link must point
to an existing file (and, for a `#section` of a Markdown file, to one of its headings).
"""

import collections
import importlib.util
import os
import pathlib
import re

import module_help
import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
DOC_FILES = (REPO / "README.md", *sorted((REPO / "docs").glob("*.md")))

_FENCE = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)
_INLINE_CODE = re.compile(r"`([^`]+)`")
_COMMAND = re.compile(r"python -m (wsda_jax[\w.]*)([^`\n]*)")
# A flag given as `--name` or `--name=value`; `--config.key=value` overrides are not flags.
_FLAG = re.compile(r"(?:^|\s)--([a-z_]+)(?==|\s|$)")
_HELP_FLAG = re.compile(r"^\s+--(\[no\])?([a-z_]+):", re.MULTILINE)
_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def documented_commands() -> list[tuple[str, str, str]]:
    """(doc file name, module, arguments) of every `python -m wsda_jax...` in the docs.

    Fenced code blocks are read with their backslash continuations joined; inline code
    spans may wrap over lines in the Markdown source.
    """
    commands = []
    for path in DOC_FILES:
        text = path.read_text()
        fenced = [block.replace("\\\n", " ") for block in _FENCE.findall(text)]
        prose = _FENCE.sub("", text)
        spans = [span.replace("\n", " ") for span in _INLINE_CODE.findall(prose)]
        for chunk in fenced + spans:
            for module, arguments in _COMMAND.findall(chunk):
                commands.append((path.name, module.rstrip("."), arguments))
    return commands


def flags_by_module() -> dict[str, set[str]]:
    """Module -> the flag names its documented commands use."""
    flags = collections.defaultdict(set)
    for _, module, arguments in documented_commands():
        flags[module].update(_FLAG.findall(arguments))
    return dict(flags)


def heading_anchors(markdown: str) -> set[str]:
    """GitHub's anchors of a Markdown file's headings: lower case, punctuation dropped,
    spaces as hyphens."""
    headings = re.findall(r"^#+ (.+)$", _FENCE.sub("", markdown), re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


def test_the_docs_show_commands_of_several_modules():
    modules = flags_by_module()
    assert "wsda_jax.main" in modules and "wsda_jax.data.prepare" in modules, modules
    assert {"config", "workdir", "mode"} <= modules["wsda_jax.main"]


@pytest.mark.parametrize("module", sorted(flags_by_module()))
def test_documented_module_exists(module):
    assert importlib.util.find_spec(module) is not None, f"no module {module}"


def test_relative_links_point_to_existing_files():
    broken = []
    for path in (*DOC_FILES, REPO / "ARCHITECTURE.md"):
        for target in _LINK.findall(path.read_text()):
            if re.match(r"[a-z]+:", target):  # https:, mailto:
                continue
            file_part, _, anchor = target.partition("#")
            linked = (path.parent / file_part).resolve() if file_part else path
            if not linked.exists():
                broken.append(f"{path.name}: {target} (no such file)")
            elif anchor and linked.suffix == ".md":
                if anchor not in heading_anchors(linked.read_text()):
                    broken.append(f"{path.name}: {target} (no such heading)")
    assert not broken, "\n".join(broken)


@pytest.fixture(scope="module")
def help_outputs():
    """{module: (exit status, output)} of `python -m MODULE --help` for every documented
    module, from one fresh interpreter (`module_help`: a forked child per module)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return module_help.help_outputs(sorted(flags_by_module()), cwd=str(REPO), env=env)


@pytest.mark.slow
@pytest.mark.parametrize("module", sorted(flags_by_module()))
def test_documented_module_help_lists_its_flags(module, help_outputs):
    """absl prints the module's flags and exits with 0 or 1 (absl's `--help` exits 1); a
    traceback or a missing flag fails."""
    returncode, output = help_outputs[module]
    assert returncode in (0, 1) and "Traceback" not in output, output[-2000:]
    listed = {name for _, name in _HELP_FLAG.findall(output)}
    listed |= {"no" + name for negatable, name in _HELP_FLAG.findall(output) if negatable}
    missing = flags_by_module()[module] - listed
    assert listed and not missing, f"{module} --help does not list {sorted(missing)}"


def test_a_forked_module_run_reports_a_traceback_and_its_exit_status(tmp_path):
    """The forked runs see what a fresh `python -m` would: a module that raises gives
    exit status 1 and its traceback, `sys.exit(3)` gives 3."""
    (tmp_path / "raises.py").write_text("raise RuntimeError('boom')\n")
    (tmp_path / "exits.py").write_text("import sys\nprint(sys.argv[1:])\nsys.exit(3)\n")
    env = dict(os.environ, PYTHONPATH=str(tmp_path), JAX_PLATFORMS="cpu")
    results = module_help.help_outputs(["raises", "exits"], cwd=str(tmp_path), env=env)
    assert results["raises"][0] == 1 and "RuntimeError: boom" in results["raises"][1]
    assert results["exits"] == (3, "['--help']\n")
