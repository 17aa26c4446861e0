"""Paths diffnas writes to: refused in one line when a regular file is in the way."""

import pytest

from search.space import load_space
from search.storage import study as st
from search.storage.artifacts import export_trial
from search.storage.paths import PathError, check_dir, check_file


@pytest.fixture()
def a_file(tmp_path):
    path = tmp_path / "file"
    path.write_text("x")
    return path


def test_folders_and_files_that_can_be_created_pass(tmp_path):
    assert check_dir(tmp_path / "a" / "b", "--out") == tmp_path / "a" / "b"
    assert check_dir(tmp_path, "--out") == tmp_path
    assert check_file(tmp_path / "a" / "f.db", "storage") == tmp_path / "a" / "f.db"
    assert not (tmp_path / "a").exists()  # checking creates nothing


def test_a_file_in_the_way_is_named(tmp_path, a_file):
    with pytest.raises(PathError, match=f"^--out {a_file}: is a file, not a folder$"):
        check_dir(a_file, "--out")
    with pytest.raises(PathError, match=f"^--out {a_file}/x/y: {a_file} is a file"):
        check_dir(a_file / "x" / "y", "--out")
    with pytest.raises(PathError, match=f"^storage {a_file}/x.db: {a_file} is a file"):
        check_file(a_file / "x.db", "storage")
    with pytest.raises(PathError, match=f"^--plot {tmp_path}: is a folder, not a file$"):
        check_file(tmp_path, "--plot")


@pytest.mark.parametrize("scheme", ["sqlite:///", "journal:"])
def test_a_storage_under_a_file_is_refused_before_anything_is_written(a_file, scheme):
    for create in (True, False):
        with pytest.raises(PathError, match=f"{a_file} is a file"):
            st.open_storage(f"{scheme}{a_file}/x.db", create=create)
    assert a_file.read_text() == "x"


def test_export_onto_a_file_writes_nothing(storage, a_file):
    study, _, _ = st.open_study(st.open_storage(storage, create=True), "smoke",
                                load_space("smoke"))
    with pytest.raises(PathError, match=f"export folder {a_file}: is a file"):
        export_trial(study, 0, a_file)
    assert a_file.read_text() == "x"
