"""Storage URLs are shown with their password as ``***``; a missing database driver is one
line that names the module and the fix."""

import subprocess
import sys
from pathlib import Path

import pytest

from search.run.runner import SearchOptions, SearchResult
from search.storage import study as st

ROOT = Path(__file__).resolve().parents[3]
SECRET = "Zq9-s3cr3t"


@pytest.mark.parametrize("url, shown", [
    ("postgresql://ann:s3cr3t@db.example:5432/studies",
     "postgresql://ann:***@db.example:5432/studies"),
    ("mysql+pymysql://root:p%40ss@localhost/optuna", "mysql+pymysql://root:***@localhost/optuna"),
    ("postgresql+psycopg://ann:pw@127.0.0.1:5433/db?sslmode=disable",
     "postgresql+psycopg://ann:***@127.0.0.1:5433/db?sslmode=disable"),
    ("postgresql://ann@db/studies?password=s3cr3t&sslmode=require",
     "postgresql://ann@db/studies?password=***&sslmode=require"),
    ("postgresql://ann@db/studies", "postgresql://ann@db/studies"),
    ("sqlite:////abs/x.db", "sqlite:////abs/x.db"),
    ("journal:/abs/journal.log", "journal:/abs/journal.log"),
    ("weird://ann:s3cr3t@host/x y", "weird://ann:***@host/x y"),
])
def test_redact_hides_only_the_password(url, shown):
    assert st.redact(url) == shown


def test_an_error_that_quotes_the_password_loses_it():
    url = f"postgresql://ann:{SECRET}@db/studies"
    err = RuntimeError(f"could not connect with password={SECRET}\nsecond line")
    assert st.failure("cannot open storage {url}", url, err) == (
        "cannot open storage postgresql://ann:***@db/studies: "
        "RuntimeError: could not connect with password=***")
    encoded = "mysql+pymysql://root:p%40ss@localhost/optuna"
    err = RuntimeError("bad DSN user=root password=p%40ss (decoded: p@ss)")
    assert st.failure("{url}", encoded, err) == (
        "mysql+pymysql://root:***@localhost/optuna: RuntimeError: bad DSN user=root "
        "password=*** (decoded: ***)")


def test_search_options_and_results_print_without_the_password():
    url = f"postgresql://ann:{SECRET}@db/studies"
    result = SearchResult(study="s", storage=url, results=Path("r"), resumed=False,
                          requeued=(), finished=0, target=1, complete=0, pruned=0, failed=0,
                          front=(), hypervolume=0.0, wall_s=0.0)
    for shown in (repr(SearchOptions(storage=url)), repr(result), str(result)):
        assert SECRET not in shown and "'postgresql://ann:***@db/studies'" in shown
    assert result.storage == url  # the run itself still has the real URL
    assert "storage=None" in repr(SearchOptions())


def test_a_missing_driver_names_the_module_and_the_fix(tmp_path):
    url = f"postgresql://ann:{SECRET}@127.0.0.1:1/none"
    # The driver is installed in the dev environment: block it as if it were not.
    code = ("import sys; sys.modules['psycopg'] = None; from search.cli import main; "
            f"sys.exit(main(['status', 's', '--storage', {url!r}]))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, check=False)
    assert proc.returncode == 2, proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("diffnas: error: ") and "'psycopg'" in line
    assert "uv sync --extra postgres" in line and SECRET not in line
    assert "postgresql://ann:***@127.0.0.1:1/none" in line
