"""The test harness itself: the host lookup's order and checks, and that a skipped test fails the run."""
from __future__ import annotations

import hashlib
import io
import tarfile
from pathlib import Path

import comfy_host
import pytest


def _archive(tmp_path, files, name="ComfyUI-0.3.64.tar.gz", checksum=None):
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for path, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(path)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    archive = tmp_path / name
    archive.write_bytes(buffer.getvalue())
    digest = checksum or hashlib.sha256(buffer.getvalue()).hexdigest()
    (tmp_path / (name + ".sha256")).write_text(f"{digest}  {name}\n")
    return archive


HOST_FILES = {"ComfyUI/comfy/samplers.py": "", "ComfyUI/comfyui_version.py": '__version__ = "0.3.64"\n'}


@pytest.fixture
def lookup(tmp_path, monkeypatch):
    """comfy_host with its copies under a scratch .host/ and no variable set."""
    monkeypatch.setattr(comfy_host, "MADE", tmp_path / ".host")
    for name in ("COMFYUI_PATH", "COMFYUI_ARCHIVE", "COMFYUI_ARCHIVE_DIR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("COMFYUI_VERSION", "0.3.64")
    return comfy_host


def _no_clone(monkeypatch, lookup):
    def refuse(source, log):
        raise lookup.HostNotFound("git clone: no network in this test")
    monkeypatch.setattr(lookup, "_from_clone", refuse)


def test_a_named_checkout_comes_first_and_a_wrong_one_is_named(lookup, tmp_path, monkeypatch):
    checkout = tmp_path / "mine"
    (checkout / "comfy").mkdir(parents=True)
    (checkout / "comfy" / "samplers.py").write_text("")
    monkeypatch.setenv("COMFYUI_PATH", str(checkout))
    found = lookup.ensure(lookup.host())
    assert found.path == checkout.resolve() and "COMFYUI_PATH" in found.how
    assert "asked for 0.3.64" in found.line(lookup.host())  # no version file: of unknown version
    monkeypatch.setenv("COMFYUI_PATH", str(tmp_path / "nothing"))
    with pytest.raises(lookup.HostNotFound, match="COMFYUI_PATH=.*is not a ComfyUI checkout"):
        lookup.ensure(lookup.host())


def test_a_checkout_of_another_release_than_asked_for_is_an_error_naming_both(lookup, tmp_path, monkeypatch):
    checkout = tmp_path / "mine"
    (checkout / "comfy").mkdir(parents=True)
    (checkout / "comfy" / "samplers.py").write_text("")
    (checkout / "comfyui_version.py").write_text('__version__ = "0.8.0"\n')
    monkeypatch.setenv("COMFYUI_PATH", str(checkout))
    with pytest.raises(lookup.HostNotFound, match="is ComfyUI 0.8.0, but COMFYUI_VERSION asks for 0.3.64"):
        lookup.ensure(lookup.host())
    monkeypatch.setenv("COMFYUI_VERSION", "0.8.0")
    assert lookup.ensure(lookup.host()).path == checkout.resolve()


def test_an_untested_release_is_refused_with_the_tested_ones_and_the_default_is_the_newest(lookup, monkeypatch):
    monkeypatch.setenv("COMFYUI_VERSION", "0.9.1")
    with pytest.raises(lookup.HostNotFound, match="0.9.1 is not a release .* tested: 0.3.64, 0.8.0"):
        lookup.host()
    monkeypatch.delenv("COMFYUI_VERSION")
    assert lookup.host().pinned == lookup.TESTED[-1] == "0.8.0"


def test_the_repository_carries_no_bytecode():
    import subprocess

    tracked = subprocess.run(["git", "ls-files"], cwd=Path(__file__).resolve().parents[1], capture_output=True,
                             text=True, check=True).stdout.split()
    assert tracked and not [p for p in tracked if p.endswith((".pyc", ".pyo")) or "__pycache__" in p]


def test_the_archive_is_checked_then_unpacked_once(lookup, tmp_path, monkeypatch):
    _archive(tmp_path, HOST_FILES)
    monkeypatch.setenv("COMFYUI_ARCHIVE_DIR", str(tmp_path))
    _no_clone(monkeypatch, lookup)
    first = lookup.ensure(lookup.host(), log=lambda message: None)
    assert first.path == tmp_path / ".host" / "ComfyUI-0.3.64" and "sha256 checked" in first.how
    assert first.line(lookup.host()).startswith("ComfyUI 0.3.64 at ")
    second = lookup.ensure(lookup.host())
    assert second.path == first.path and "made earlier" in second.how
    assert [p.name for p in (tmp_path / ".host").iterdir()] == ["ComfyUI-0.3.64"]  # no staging folder left


def test_an_archive_that_fails_its_checksum_is_not_unpacked(lookup, tmp_path, monkeypatch):
    monkeypatch.setenv("COMFYUI_ARCHIVE", str(_archive(tmp_path, HOST_FILES, checksum="0" * 64)))
    _no_clone(monkeypatch, lookup)
    with pytest.raises(lookup.HostNotFound) as caught:
        lookup.ensure(lookup.host(), log=lambda message: None)
    message = str(caught.value)
    assert "is not the 000" in message and "no network" in message
    assert "COMFYUI_PATH=/path/to/ComfyUI bash scripts/test.sh" in message  # says how to point it at one
    assert not (tmp_path / ".host" / "ComfyUI-0.3.64").exists()


def test_an_archive_without_the_host_inside_is_refused(lookup, tmp_path, monkeypatch):
    monkeypatch.setenv("COMFYUI_ARCHIVE", str(_archive(tmp_path, {"other/README": "x"})))
    _no_clone(monkeypatch, lookup)
    with pytest.raises(lookup.HostNotFound, match="no ComfyUI/comfy/samplers.py inside"):
        lookup.ensure(lookup.host(), log=lambda message: None)
    assert not (tmp_path / ".host" / "ComfyUI-0.3.64").exists()


def test_a_skipped_test_fails_the_run_unless_it_is_gpu_only(pytester, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).resolve().parent))
    pytester.makepyfile(test_skips="""
        import pytest
        def test_ok(): pass
        def test_gpu(): pytest.skip("GPU-only: no CUDA device here")
    """)
    assert pytester.runpytest_subprocess("-p", "no_skips").ret == 0
    pytester.makepyfile(test_more="""
        import pytest
        def test_host(): pytest.skip("no host")
    """)
    result = pytester.runpytest_subprocess("-p", "no_skips")
    assert result.ret == 1
    result.stdout.fnmatch_lines(["*skipped tests fail the run*", "*test_host: no host*"])
