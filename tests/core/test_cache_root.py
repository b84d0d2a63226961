"""qtool's one cache root (configs/cache_root.py): moved by QTOOL_CACHE_DIR, switched off by it, XDG otherwise."""

from pathlib import Path

from qtool.core.cache_root import cache_root


def test_cache_root_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("QTOOL_CACHE_DIR", str(tmp_path / "c"))
    assert cache_root() == tmp_path / "c"
    for off in ("off", "OFF", "0", "none", " "):
        monkeypatch.setenv("QTOOL_CACHE_DIR", off)
        assert cache_root() is None
    monkeypatch.delenv("QTOOL_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "qtool"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cache_root() == Path.home() / ".cache" / "qtool"
