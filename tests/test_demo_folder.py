"""`dst demo --out DIR` deletes only a folder an earlier demo created; everything else is refused untouched."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from cli import app
from experiments.demo import DEMO_MARKER, DemoFolderError, start_clean


def test_new_and_empty_folders_are_used_and_marked(tmp_path):
    for out in (tmp_path / "new" / "demo", tmp_path / "empty"):
        if out.name == "empty":
            out.mkdir()
        start_clean(out)
        assert [p.name for p in out.iterdir()] == [DEMO_MARKER]


def test_an_earlier_demo_is_replaced(tmp_path):
    out = tmp_path / "demo"
    start_clean(out)
    (out / "shards").mkdir()
    (out / "shards" / "old.tar").write_bytes(b"stale")
    start_clean(out)
    assert [p.name for p in out.iterdir()] == [DEMO_MARKER]


def test_a_folder_the_demo_did_not_create_is_refused_through_the_command(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    (home / "thesis.tex").write_text("years of work")
    result = CliRunner().invoke(app, ["demo", "--fast", "--out", str(home)])
    assert result.exit_code == 2
    assert " ".join(result.output.split()) == (
        f"error: --out {home} exists and was not created by dst demo (no "
        f"{DEMO_MARKER} in it): refusing to delete it; pick a new or empty "
        "folder"
    )
    assert [p.name for p in home.iterdir()] == ["thesis.tex"]


def test_files_and_links_are_refused(tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("keep")
    target = tmp_path / "earlier-demo"
    start_clean(target)
    link = tmp_path / "link"
    link.symlink_to(target)
    for out in (a_file, link):
        with pytest.raises(DemoFolderError, match="is not a folder .a file or a link.: refusing to touch it"):
            start_clean(out)
    assert a_file.read_text() == "keep" and (target / DEMO_MARKER).exists()
