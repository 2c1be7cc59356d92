"""The last-resort line of an entry point: one line on stderr, the traceback in a file, exit 1."""
from __future__ import annotations

import os

import errors


def _raise():
    raise ValueError("bad\nthing")


def test_internal_error_goes_to_the_log_file(tmp_path, capsys):
    log = tmp_path / "out.log"
    log.write_text("earlier line\n")
    try:
        _raise()
    except ValueError as exc:
        rc = errors.report_internal_error("main.py", exc, str(log))
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1
    assert err == [f"main.py: internal error: ValueError: bad thing; the traceback is in {log}"]
    text = log.read_text()
    assert text.startswith("earlier line\n") and "Traceback (most recent call last)" in text and "_raise" in text


def test_internal_error_without_a_log_uses_a_temporary_file(capsys):
    try:
        _raise()
    except ValueError as exc:
        rc = errors.report_internal_error("retrieve.py", exc)
    line = capsys.readouterr().err.strip()
    assert rc == 1 and "\n" not in line
    path = line.rsplit("the traceback is in ", 1)[1]
    try:
        assert os.path.basename(path).startswith("retrieve-traceback-")
        assert "ValueError: bad" in open(path, encoding="utf-8").read()
    finally:
        os.remove(path)


def test_an_unwritable_log_falls_back_to_a_temporary_file(tmp_path, capsys):
    try:
        _raise()
    except ValueError as exc:
        errors.report_internal_error("main.py", exc, str(tmp_path / "missing" / "out.log"))
    path = capsys.readouterr().err.strip().rsplit("the traceback is in ", 1)[1]
    try:
        assert os.path.exists(path) and "missing" not in path
    finally:
        os.remove(path)
