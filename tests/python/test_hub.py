"""dino_rs.hub: downloads into the cache through a loopback HTTP server (tests/python/loopback.py).

Whatever goes wrong (an error status, a body cut short, a reset connection, a file ``check``
rejects, Ctrl-C), the cache must hold no file and no partial download afterwards.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from loopback import Loopback

import dino_rs
from dino_rs import hub
from dino_rs.hub import DownloadError

BODY = os.urandom(300_000)  # several of download()'s 64 KiB reads


@pytest.fixture
def server():
    lb = Loopback()
    yield lb
    lb.close()


@pytest.fixture(autouse=True)
def isolated(monkeypatch, tmp_path):
    """A fresh cache per test, downloads allowed, and no proxy between the client and 127.0.0.1."""
    monkeypatch.setenv("DINO_RS_HOME", str(tmp_path / "home"))
    for name in ("DINO_RS_OFFLINE", "DINO_RS_DOWNLOAD_TIMEOUT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")


def files_under(folder: Path) -> list:
    """Every file below ``folder``, hidden ones (partial downloads) included."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if not p.is_dir()) if folder.exists() else []


def test_download_stores_the_served_bytes(server, tmp_path):
    url = server.serve("weights/model.pth", BODY)
    path = hub.download(url, "weights/model.pth", cache_dir=tmp_path / "cache", progress=False)
    assert path == tmp_path / "cache" / "weights" / "model.pth"
    assert path.read_bytes() == BODY
    assert files_under(tmp_path / "cache") == [os.path.join("weights", "model.pth")]
    assert server.count("weights/model.pth") == 1
    assert server.user_agents == [f"dino_rs/{dino_rs.__version__}"]


def test_a_cached_file_is_returned_without_a_request(server, tmp_path):
    url = server.serve("a.bin", BODY)
    first = hub.download(url, "a.bin", cache_dir=tmp_path, progress=False)
    server.routes.clear()  # a second request would now get a 404
    second = hub.download(url, "a.bin", cache_dir=tmp_path, progress=False)
    assert second == first and second.read_bytes() == BODY
    assert server.requests == ["/a.bin"]


def test_http_error_names_the_url_and_status_and_leaves_nothing(server, tmp_path):
    url = server.error("missing.bin", 404)
    with pytest.raises(DownloadError) as info:
        hub.download(url, "sub/missing.bin", cache_dir=tmp_path, progress=False)
    assert isinstance(info.value, OSError) and info.value.status == 404 and info.value.url == url
    assert url in str(info.value) and "404" in str(info.value)
    assert files_under(tmp_path) == []


def test_a_body_shorter_than_its_content_length_is_rejected(server, tmp_path):
    url = server.truncate("short.bin", BODY[:1000], announced=5000)
    with pytest.raises(DownloadError, match=r"truncated download, 1000 of 5000 bytes") as info:
        hub.download(url, "short.bin", cache_dir=tmp_path, progress=False)
    assert url in str(info.value)
    assert files_under(tmp_path) == []


def test_a_connection_reset_midway_is_rejected(server, tmp_path):
    url = server.reset("reset.bin", BODY, sent=100_000)
    with pytest.raises(DownloadError) as info:
        hub.download(url, "reset.bin", cache_dir=tmp_path, progress=False)
    # The reset reaches the client either as an error while reading or as an early end of the body.
    assert url in str(info.value)
    assert "connection lost" in str(info.value) or "truncated download" in str(info.value)
    assert files_under(tmp_path) == []


def test_an_unknown_host_is_a_download_error(tmp_path):
    # A port nothing listens on: connection refused, without leaving the machine.
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/x.bin"
    with pytest.raises(DownloadError, match="127.0.0.1"):
        hub.download(url, "x.bin", cache_dir=tmp_path, progress=False)
    assert files_under(tmp_path) == []


def test_a_silent_server_times_out(server, tmp_path, monkeypatch):
    monkeypatch.setenv("DINO_RS_DOWNLOAD_TIMEOUT", "0.3")
    server.delay = 3.0
    url = server.serve("slow.bin", BODY)
    start = time.monotonic()
    with pytest.raises(DownloadError, match="slow.bin"):
        hub.download(url, "slow.bin", cache_dir=tmp_path, progress=False)
    assert time.monotonic() - start < 2.5
    assert files_under(tmp_path) == []


@pytest.mark.parametrize("value", ["soon", "0", "-1", "nan"])
def test_a_bad_timeout_setting_is_named(server, tmp_path, monkeypatch, value):
    monkeypatch.setenv("DINO_RS_DOWNLOAD_TIMEOUT", value)
    with pytest.raises(ValueError, match="DINO_RS_DOWNLOAD_TIMEOUT"):
        hub.download(server.serve("a.bin", BODY), "a.bin", cache_dir=tmp_path, progress=False)
    assert server.requests == [] and files_under(tmp_path) == []


def test_offline_mode_makes_no_request_and_says_where_to_put_the_file(server, tmp_path, monkeypatch):
    monkeypatch.setenv("DINO_RS_OFFLINE", "1")
    url = server.serve("weights/model.pth", BODY)
    with pytest.raises(FileNotFoundError) as info:
        hub.download(url, "weights/model.pth", cache_dir=tmp_path, progress=False)
    target = tmp_path / "weights" / "model.pth"
    message = str(info.value)
    assert info.value.filename == str(target)
    assert "weights/model.pth" in message and str(target) in message and url in message
    assert "DINO_RS_OFFLINE" in message
    assert server.requests == [] and files_under(tmp_path) == []
    # A file placed there by hand is what the next call returns, still offline.
    target.parent.mkdir(parents=True)
    target.write_bytes(b"placed by hand")
    assert hub.download(url, "weights/model.pth", cache_dir=tmp_path).read_bytes() == b"placed by hand"
    assert server.requests == []


def test_a_rejected_file_does_not_enter_the_cache(server, tmp_path):
    seen = []

    def check(path: Path) -> None:
        seen.append(path.read_bytes())
        raise ValueError("not a checkpoint")

    url = server.serve("model.pth", BODY)
    with pytest.raises(ValueError, match="not a checkpoint") as info:
        hub.download(url, "model.pth", cache_dir=tmp_path, progress=False, check=check)
    assert url in str(info.value) and "model.pth" in str(info.value)
    assert seen == [BODY]  # the check saw the whole download
    assert files_under(tmp_path) == []


def test_an_accepted_file_enters_the_cache(server, tmp_path):
    seen = []
    url = server.serve("model.pth", BODY)
    path = hub.download(url, "model.pth", cache_dir=tmp_path, progress=False, check=lambda p: seen.append(p))
    assert len(seen) == 1 and seen[0] != path and seen[0].parent == path.parent
    assert path.read_bytes() == BODY and files_under(tmp_path) == ["model.pth"]


def test_ctrl_c_during_a_download_leaves_nothing(server, tmp_path):
    def interrupt(path: Path) -> None:
        raise KeyboardInterrupt

    url = server.serve("model.pth", BODY)
    with pytest.raises(KeyboardInterrupt):
        hub.download(url, "model.pth", cache_dir=tmp_path, progress=False, check=interrupt)
    assert files_under(tmp_path) == []


def test_expected_size(server, tmp_path):
    url = server.serve("model.pth", BODY)
    with pytest.raises(DownloadError, match=f"{len(BODY)} bytes received, expected {len(BODY) + 1}"):
        hub.download(url, "model.pth", cache_dir=tmp_path, progress=False, expected_size=len(BODY) + 1)
    assert files_under(tmp_path) == []
    path = hub.download(url, "model.pth", cache_dir=tmp_path, progress=False, expected_size=len(BODY))
    assert path.read_bytes() == BODY


@pytest.mark.parametrize("name", ["../outside.bin", "/etc/outside.bin", "", "a/../../b"])
def test_filename_stays_inside_the_cache(server, tmp_path, name):
    with pytest.raises(ValueError, match="relative path inside the cache"):
        hub.download(server.serve("a.bin", BODY), name, cache_dir=tmp_path / "cache", progress=False)
    assert server.requests == [] and files_under(tmp_path) == []


def test_dino_rs_home_is_the_cache(server, tmp_path, monkeypatch):
    home = tmp_path / "my home"
    monkeypatch.setenv("DINO_RS_HOME", str(home))
    assert hub.cache_dir() == home
    path = hub.download(server.serve("data/x.gz", BODY), "data/x.gz", progress=False)
    assert path == home / "data" / "x.gz" and path.read_bytes() == BODY


def test_cache_dir_without_dino_rs_home(monkeypatch, tmp_path):
    monkeypatch.delenv("DINO_RS_HOME")
    platformdirs = pytest.importorskip("platformdirs")
    assert hub.cache_dir() == Path(platformdirs.user_cache_dir("dino_rs", appauthor=False))
    # Without platformdirs, the same rules by hand (Linux's here).
    monkeypatch.setitem(sys.modules, "platformdirs", None)
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert hub.cache_dir() == tmp_path / "xdg" / "dino_rs"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert hub.cache_dir() == Path.home() / ".cache" / "dino_rs"
    monkeypatch.setattr(sys, "platform", "darwin")
    assert hub.cache_dir() == Path.home() / "Library" / "Caches" / "dino_rs"
    monkeypatch.setattr(sys, "platform", "win32")
    monkeypatch.setenv("LOCALAPPDATA", str(tmp_path / "local"))
    assert hub.cache_dir() == tmp_path / "local" / "dino_rs" / "Cache"


def test_progress_bar(server, tmp_path, monkeypatch, capsys):
    pytest.importorskip("tqdm")
    url = server.serve("a.bin", BODY)
    hub.download(url, "a.bin", cache_dir=tmp_path, progress=True)
    assert "a.bin" in capsys.readouterr().err  # the bar, named after the file, on stderr
    hub.download(url, "b.bin", cache_dir=tmp_path, progress=False)
    assert capsys.readouterr().err == ""
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)  # as if tqdm were not installed
    with pytest.raises(ImportError, match="tqdm"):
        hub.download(url, "c.bin", cache_dir=tmp_path, progress=True)
    assert hub.download(url, "d.bin", cache_dir=tmp_path).read_bytes() == BODY  # None: silently
    assert sorted(files_under(tmp_path)) == ["a.bin", "b.bin", "d.bin"]


CHILD = textwrap.dedent(
    """
    import sys
    from dino_rs import hub
    print(hub.download(sys.argv[1], "weights/model.pth", cache_dir=sys.argv[2], progress=False))
    """
)


def test_concurrent_first_calls_from_two_processes(server, tmp_path):
    server.delay = 1.5  # both requests arrive before either answer: the two downloads overlap
    url = server.serve("weights/model.pth", BODY)
    cache = tmp_path / "cache"
    children = [
        subprocess.Popen([sys.executable, "-c", CHILD, url, str(cache)], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    results = [c.communicate(timeout=120) for c in children]
    for child, (out, err) in zip(children, results):
        assert child.returncode == 0, err
        assert out.strip() == str(cache / "weights" / "model.pth")
    assert server.count("weights/model.pth") == 2  # neither found the other's file: they overlapped
    assert (cache / "weights" / "model.pth").read_bytes() == BODY
    assert files_under(cache) == [os.path.join("weights", "model.pth")]


def test_download_error_is_exported_and_picklable():
    import pickle

    assert hub.DownloadError is dino_rs._errors.DownloadError
    e = pickle.loads(pickle.dumps(DownloadError("http://x/y: HTTP 404 Not Found", "http://x/y", 404)))
    assert (str(e), e.url, e.status) == ("http://x/y: HTTP 404 Not Found", "http://x/y", 404)
