from __future__ import annotations

from pathlib import Path

import pytest

from covidscan import atomic


def test_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "metrics.json"
    atomic.write_json(target, {"a": 1})

    def broken_writer(tmp: Path) -> None:
        tmp.write_text('{"a": ')
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError):
        atomic.write_with(target, broken_writer)
    assert target.read_text().strip() == '{\n  "a": 1\n}'
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]
