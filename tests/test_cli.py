"""The `uga` command line, run as a real subprocess: results and every refusal."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile

REPO = Path(__file__).resolve().parent.parent


def uga(*args, cwd=None, env=None):
    env = {**os.environ, "UGA_ORT_THREADS": "2", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "service.cli", *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd or REPO,
        timeout=600,
    )


def assert_refused(proc, needle):
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr  # one line, no traceback
    assert lines[0].startswith("uga: error:") and needle in lines[0], lines[0]


@pytest.mark.slow  # over 5 s on 2 cores: not in make test-fast
def test_segment_writes_outputs_and_prints_summary(cmu_svs, tmp_path):
    proc = uga("segment", cmu_svs, "--out", tmp_path / "o", "--queue", "3", "--patch-um", "256", "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert "review queue     3 patches of 256 µm" in proc.stdout
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert summary["queue"]["size"] == 3


@pytest.mark.slow  # three runs on a real slide: 20 s
def test_a_run_cut_short_leaves_the_previous_outputs_whole(cmu_svs, tmp_path, monkeypatch, request):
    """Ctrl-C after the maps were written (here: while the text outputs are written) must not leave a
    mix of this run's files and the last one's, nor delete any of the last one's."""
    from service import cli
    from service.config import get_settings
    from service.inference import outputs

    get_settings.cache_clear()  # in-process: this environment's settings, and none left for later tests
    request.addfinalizer(get_settings.cache_clear)
    out = tmp_path / "o"
    args = ["segment", str(cmu_svs), "--out", str(out), "--queue", "3", "--patch-um", "256", "--quiet"]
    assert cli.main(args) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(outputs, "write_text_artifacts", interrupted)
    assert cli.main([*args[:-1], "--uncertainty", "entropy", "--quiet"]) == 130  # "uga: interrupted"
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # no attempt folder left either
    fresh = tmp_path / "fresh"
    assert cli.main(["segment", str(cmu_svs), "--out", str(fresh), "--quiet"]) == 130
    assert not fresh.exists()  # nothing made


def test_a_named_pipe_is_refused_not_waited_on(tmp_path):
    os.mkfifo(tmp_path / "p.svs")
    assert_refused(uga("segment", tmp_path / "p.svs", "--out", tmp_path / "o"), "not a regular file")
    assert not (tmp_path / "o").exists()


def test_missing_file(tmp_path):
    assert_refused(uga("segment", tmp_path / "nope.svs", "--out", tmp_path / "o"), "not found")
    assert not (tmp_path / "o").exists()


def test_not_a_slide(tmp_path):
    f = tmp_path / "report.svs"
    f.write_text("hello")
    assert_refused(uga("segment", f, "--out", tmp_path / "o"), "not a slide format")


def test_unreadable_truncated_slide(cmu_svs, tmp_path):
    f = tmp_path / "broken.svs"
    f.write_bytes(cmu_svs.read_bytes()[:4096])
    proc = uga("segment", f, "--out", tmp_path / "o")
    assert_refused(proc, "broken.svs")


def test_slide_without_mpp_is_refused_unless_given(tmp_path):
    f = tmp_path / "nompp.tif"
    tifffile.imwrite(f, np.full((600, 600, 3), 230, np.uint8), tile=(256, 256))
    assert_refused(uga("segment", f, "--out", tmp_path / "o"), "--slide-mpp")
    ok = uga("segment", f, "--out", tmp_path / "o", "--slide-mpp", "1.0", "--patch-um", "128", "--quiet")
    assert ok.returncode == 0, ok.stderr


def test_output_dir_not_writable(cmu_svs, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert_refused(uga("segment", cmu_svs, "--out", blocker / "sub"), "not writable")
    assert_refused(uga("segment", cmu_svs, "--out", blocker), "not a directory")


def test_bad_option_values(cmu_svs, tmp_path):
    for option, value in (("--mpp", "-1"), ("--mpp", "inf"), ("--mpp", "nan"), ("--patch-um", "inf")):
        proc = uga("segment", cmu_svs, "--out", tmp_path / "o", option, value)
        assert proc.returncode == 2 and "must be a finite number > 0" in proc.stderr, (option, value, proc.stderr)
        assert "Traceback" not in proc.stderr
    assert_refused(uga("segment", cmu_svs, "--out", tmp_path / "o", "--queue", "0"), "--queue")
    assert_refused(uga("segment", cmu_svs, "--out", tmp_path / "o", "--mpp", "1e-300"), "mpp")  # 10^300 px a side
    assert_refused(uga("segment", cmu_svs, "--out", tmp_path / "o", "--patch-um", "1e9"), "patch_um")


def test_the_service_work_limit_holds_on_the_command_line(cmu_svs, tmp_path):
    env = {"UGA_MAX_JOB_TILES": "2"}
    assert_refused(uga("segment", cmu_svs, "--out", tmp_path / "o", env=env), "UGA_MAX_JOB_TILES")
    assert not (tmp_path / "o").exists()


def test_a_store_that_is_not_a_database_is_one_line(tmp_path):
    (tmp_path / "uga.sqlite").write_text("garbage")
    assert_refused(uga("tokens", "list", env={"UGA_DATA_DIR": str(tmp_path)}), "cannot be read")


MISTAKES = [  # (arguments, environment, what the one line must say); cwd is an empty directory with a file f
    ([], {}, "required: command"),
    (["frob"], {}, "invalid choice"),
    (["segment", "x.svs"], {}, "required: --out"),
    (["segment", "x.svs", "--out", "o", "--frobnicate"], {}, "unrecognized arguments"),
    (["segment", "x.svs", "--out", "o", "--queue", "1.5"], {}, "invalid int value"),
    (["serve", "--port", "99999"], {}, "not a port"),
    (["serve", "--workers", "0"], {}, "number of workers"),
    (["serve", "--host", "no such host"], {}, "not an IP address"),
    (["serve", "--host", "0.0.0.0"], {"UGA_AUTH_DISABLED": "true"}, "serve on 127.0.0.1, not 0.0.0.0"),
    (["make-slides", "--out", "o", "--seed", "-1"], {}, "not a seed"),
    (["make-slides", "--out", "o", "--count", "201"], {}, "1 to 200 slides per centre"),
    (["make-slides", "--out", "o", "--count", "0"], {}, "1 to 200 slides per centre"),
    (["demo", "--queue", "0", "--quiet"], {}, "--queue"),  # before the demo slide is built
    (["demo", "--out", "f", "--quiet"], {}, "not a directory"),
    (["tokens", "list"], {"UGA_DATA_DIR": "f"}, "is a file"),
    (["serve"], {"UGA_SLIDE_ROOT": "f"}, "is a file"),
    (["serve"], {"UGA_BASELINE_DIR": "nowhere"}, "no model card in nowhere"),
    (["runner", "--once"], {"UGA_DATA_DIR": "typo"}, "no store in typo"),
    (["tokens", "list"], {"UGA_DATABASE_URL": "postgresql://u:secret@[bad"}, "not a valid postgresql:// URL"),
    (["tokens", "list"], {"UGA_DATABASE_URL": "postgresql://u:secret@h:five/db"}, "port 'five' is not a number"),
    (["tokens", "add", "al", "--role", "viewer"], {"UGA_DATA_DIR": ""}, "is empty"),
    (["tokens", "list"], {"UGA_MIN_FREE_MB": "inf"}, "finite number"),
    (["tokens", "list"], {"UGA_FINETUNE_PATCH": "100"}, "multiple of 8"),
    pytest.param(  # the pool waits 10 s for a database before it gives up
        ["tokens", "list"],
        {"UGA_DATABASE_URL": "postgresql://u:p@127.0.0.1:1/db"},
        "cannot connect",
        marks=pytest.mark.slow,
    ),
]


@pytest.mark.parametrize("args, env, needle", MISTAKES)
def test_every_mistake_is_one_line_and_changes_nothing(tmp_path, args, env, needle):
    (tmp_path / "f").write_text("a file")
    assert_refused(uga(*args, cwd=tmp_path, env={"UGA_DATABASE_TIMEOUT_S": "1", **env}), needle)
    assert [p.name for p in tmp_path.iterdir()] == ["f"]  # no store, data directory or output made


def test_the_help_says_what_each_exit_status_means_and_the_commands_keep_to_it(tmp_path):
    proc = uga("--help")
    assert proc.returncode == 0
    meanings = dict(re.findall(r"^  (\d+) +(\S.*)$", proc.stdout.split("exit status:")[1], flags=re.M))
    assert sorted(meanings) == ["0", "1", "130", "2"] and "refused" in meanings["2"]
    assert uga("make-slides", "--out", tmp_path, "--count", "0").returncode == 2  # refused
    assert uga("runner", "--check", cwd=tmp_path, env={"UGA_DATA_DIR": "x"}).returncode == 1  # unhealthy


def test_serve_on_a_port_in_use_is_one_line_and_makes_nothing(tmp_path):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = uga("serve", "--port", port, cwd=tmp_path, env={"UGA_DATA_DIR": "data", "UGA_SLIDE_ROOT": "slides"})
    assert_refused(proc, f"port {port} on 127.0.0.1 is in use")
    assert list(tmp_path.iterdir()) == []  # no store, no users, no token file


def test_the_runner_check_never_makes_a_store_where_there_is_none(tmp_path):
    proc = uga("runner", "--check", cwd=tmp_path, env={"UGA_DATA_DIR": "typo"})
    assert proc.returncode == 1 and proc.stderr.strip().splitlines() == [
        "uga: error: runner unhealthy: no store in typo (is UGA_DATA_DIR the deployment's data directory?)"
    ]
    assert list(tmp_path.iterdir()) == []


def test_unknown_centre_for_make_slides(tmp_path):
    assert_refused(uga("make-slides", "--out", tmp_path, "--centre", "mars"), "unknown centre")


@pytest.mark.slow
def test_make_slides_builds_pyramid_with_mask(tmp_path):
    proc = uga("make-slides", "--out", tmp_path, "--centre", "source", "blur", "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert {p.name for p in tmp_path.glob("*.tif")} == {
        "source-00.tif",
        "source-00.mask.tif",
        "blur-00.tif",
        "blur-00.mask.tif",
    }


def test_demo_with_an_unknown_centre_is_one_line(tmp_path):
    proc = uga("demo", "--centre", "bogus", "--quiet")
    assert_refused(proc, "unknown centre")
