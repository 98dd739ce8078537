"""`instructlm export` where the files cannot go: one clear line naming the path, said before
the model is loaded wherever the path alone tells, and nothing partial left behind."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from instructlm.cli import main


def tree(folder: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None)
            for p in sorted(folder.rglob("*"))}


def setup_place(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("not a folder", encoding="utf-8")
    (tmp_path / "folder.gguf").mkdir()
    (tmp_path / "earlier.gguf").write_bytes(b"an earlier export")


# (arguments after `export RUN`, words the message must hold): all refused from the paths alone
BEFORE_LOADING = [
    (["--output", "a-file/model.gguf"], "a-file is a file, not a folder"),
    (["--output", "a-file/deeper/model.gguf"], "a-file is a file, not a folder"),
    (["--ollama", "a-file"], "a-file is a file, not a folder"),
    (["--ollama", "a-file/ollama"], "a-file is a file, not a folder"),
    (["--output", "folder.gguf", "--force"], "folder.gguf is a folder, not a file"),
    (["--output", "folder.gguf"], "folder.gguf is a folder, not a file"),
    (["--output", "earlier.gguf"], "earlier.gguf exists"),
    (["--ollama", "new", "--output", "a-file/x.gguf"], "a-file is a file, not a folder"),
]


@pytest.mark.parametrize("args, words", BEFORE_LOADING, ids=lambda v: " ".join(v)
                         if isinstance(v, list) else None)
def test_a_place_that_cannot_take_the_file_is_refused_before_loading(
        tiny_run, tmp_path, monkeypatch, capsys, args, words):
    setup_place(tmp_path)
    monkeypatch.chdir(tmp_path)

    def must_not_load(*a, **k):
        raise AssertionError("the model was loaded before the place was checked")

    monkeypatch.setattr("instructlm.answering.answerer.load_answerer", must_not_load)
    before = tree(tmp_path)
    assert main(["export", str(tiny_run), "--quant", "f16", *args]) == 2
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err
    assert tree(tmp_path) == before


def test_a_folder_without_write_permission_is_refused_before_loading(
        tiny_run, tmp_path, monkeypatch, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = __import__("os").access
    # Tests may run as root, whom permissions do not stop: the check asks os.access.
    monkeypatch.setattr("os.access", lambda path, mode: Path(path) != locked
                        and real_access(path, mode))
    assert main(["export", str(tiny_run), "--output", str(locked / "m.gguf")]) == 2
    err = capsys.readouterr().err
    assert f"no permission to write in {locked}" in err
    assert list(locked.iterdir()) == []


@pytest.mark.parametrize("failure, words", [
    (OSError(errno.ENOSPC, "No space left on device"), "the disk is full"),
    (PermissionError(errno.EACCES, "Permission denied"), "Permission denied"),
])
@pytest.mark.parametrize("where", ["gguf", "modelfile"])
def test_a_write_that_fails_leaves_nothing_and_says_why(tiny_run, tmp_path, monkeypatch,
                                                        capsys, failure, words, where):
    import instructlm.export.export_run as export_run

    real_write_gguf, real_write_text = export_run.write_gguf, Path.write_text

    def write_gguf(model, tokenizer, template, path, *rest):
        real_write_gguf(model, tokenizer, template, path, *rest)  # the file is all there ...
        if where == "gguf":
            raise failure  # ... when the disk fills up or the folder is taken away

    def write_text(self, *args, **kwargs):
        if where == "modelfile" and ".Modelfile." in self.name:
            raise failure
        return real_write_text(self, *args, **kwargs)

    monkeypatch.setattr(export_run, "write_gguf", write_gguf)
    monkeypatch.setattr(Path, "write_text", write_text)
    out = tmp_path / "out"
    assert main(["export", str(tiny_run), "--quant", "f16", "--ollama", str(out / "ollama"),
                 "--output", str(out / "gguf" / "m.gguf")]) == 2
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err
    target = out / "gguf" / "m.gguf" if where == "gguf" else out / "ollama" / "Modelfile"
    assert str(target) in err
    assert not out.exists()  # no half file, and no folder made for it
