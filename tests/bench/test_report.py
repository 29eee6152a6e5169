"""leaderboard.md and report.html: hand-checked averages and order, escaping, no network
resources, determinism, and a headless-Chromium render (not blank, no sideways scrolling)."""

from __future__ import annotations

import os
import random
import re
import shutil
import struct
import subprocess
import zlib
from pathlib import Path
from typing import NoReturn

import pytest

from bench.sample_results import sample_results
from mergeforge.bench.board import build_board
from mergeforge.bench.records import FORMAT, Candidate, RunRecord
from mergeforge.bench.report import write_leaderboard, write_report
from mergeforge.bench.report_html import sensitivity
from mergeforge.errors import MergeforgeError, OutputError

# --- a tiny results dict, checked by hand ------------------------------------------------------
# fine-tuned: a 0.80, b 0.50 | pretrained: 0.40, 0.30 | A: 0.60, 0.45 | B: 0.72, 0.30
TINY = {
    "fine_tuned": (0.80, 0.50),
    "pretrained": (0.40, 0.30),
    "A": (0.60, 0.45),
    "B": (0.72, 0.30),
}


def tiny_results(names: tuple[str, str] = ("a", "b"), rename: dict | None = None) -> dict:
    rename = rename or {}
    records = []
    for method, values in TINY.items():
        for task, v, ft in zip(names, values, TINY["fine_tuned"], strict=True):
            grid = (Candidate({"lambda": 0.5}, 0.6), Candidate({"lambda": 1.0}, 0.7))
            records.append(
                RunRecord(
                    method=rename.get(method, method),
                    task=task,
                    metric="accuracy",
                    value=v,
                    normalized=v / ft,
                    val_value=v,
                    params={"lambda": 1.0} if method == "A" else {},
                    selection=grid if method == "A" else (),
                    wall_s=2.0,
                    peak_rss_bytes=2**30,
                    data_used="validation labels" if method == "A" else "",
                ).to_json()
            )
    tasks = [{"name": t, "num_classes": 3, "sizes": {"test": 10}, "source": "x"} for t in names]
    return {
        "format": FORMAT,
        "pool": {"name": "tiny", "fingerprint": "abc123", "tasks": tasks},
        "run_info": {"git_sha": "deadbeef", "versions": {"torch": "2.13.0"}, "seed": 7},
        "records": records,
    }


def table_rows(md: str) -> list[list[str]]:
    """The leaderboard table's body rows (the block starting with ``| # |``), split into cells."""
    block = next(b for b in md.split("\n\n") if b.startswith("| # |"))
    return [[c.strip() for c in ln.strip("|").split(" | ")] for ln in block.splitlines()[2:]]


def test_leaderboard_hand_checked(tmp_path: Path) -> None:
    text = write_leaderboard(tiny_results(), tmp_path / "leaderboard.md")
    assert text == (tmp_path / "leaderboard.md").read_text()
    rows = table_rows(text)
    # avg: fine_tuned (80+50)/2 = 65.0; B (72+30)/2 = 51.0; A (60+45)/2 = 52.5; pretrained 35.0.
    # norm. avg: A (0.6/0.8 + 0.45/0.5)/2 = (0.75 + 0.9)/2 = 82.5 %; B (0.9 + 0.6)/2 = 75.0 %;
    # pretrained (0.5 + 0.6)/2 = 55.0 %.
    assert [r[1] for r in rows] == [
        "*fine_tuned* (baseline)",
        "A",
        "B",
        "*pretrained* (baseline)",
    ]
    assert rows[0][2:] == ["80.0", "50.0", "65.0", "100.0"]
    assert rows[1] == ["1", "A", "60.0", "**45.0**", "52.5", "82.5"]
    assert rows[2] == ["2", "B", "**72.0**", "30.0", "51.0", "75.0"]
    assert rows[3] == ["—", "*pretrained* (baseline)", "40.0", "30.0", "35.0", "55.0"]
    assert "abc123" in text and "tiny" in text
    assert "lambda=1" in text and "validation labels" in text
    assert "- git_sha: deadbeef" in text and "versions.torch: 2.13.0" in text


def test_board_sorts_ties_by_name_and_marks_missing_tasks(tmp_path: Path) -> None:
    results = tiny_results()
    results["records"] = [
        r for r in results["records"] if not (r["method"] == "B" and r["task"] == "b")
    ]
    board = build_board(results)
    assert [r.method for r in board.rows] == ["B", "fine_tuned", "A", "pretrained"]  # B: 72 alone
    text = write_leaderboard(results, tmp_path / "lb.md")
    b_row = next(r for r in table_rows(text) if r[1] == "B")
    assert b_row[2:] == ["**72.0**", "—", "72.0*", "90.0"]
    assert "some are missing" in text


def test_markdown_cells_escape_pipes_and_markup(tmp_path: Path) -> None:
    results = tiny_results(names=("a|b", "<i>x</i>"), rename={"A": "m*1_"})
    text = write_leaderboard(results, tmp_path / "lb.md")
    header = next(ln for ln in text.splitlines() if ln.startswith("| # |"))
    assert header.count(" | ") == 5  # 6 columns: #, method, 2 tasks, avg, norm. avg
    assert "a\\|b" in header and "\\<i\\>x\\</i\\>" in header
    assert "m\\*1\\_" in text


def test_html_escapes_names(tmp_path: Path) -> None:
    results = tiny_results(names=("t<b>&1", 'q"uote'), rename={"A": "<script>x&y"})
    write_report(results, tmp_path / "report.html")
    html = (tmp_path / "report.html").read_text()
    assert "<script" not in html and "<b>&1" not in html
    assert "&lt;script&gt;x&amp;y" in html and "t&lt;b&gt;&amp;1" in html
    assert 'q"uote' not in html and "q&quot;uote" in html


def test_html_has_no_external_resources(tmp_path: Path) -> None:
    write_report(sample_results(), tmp_path / "report.html")
    html = (tmp_path / "report.html").read_text()
    for bad in ("<script", "<link", "<img", "<iframe", "@import", "url(", " src="):
        assert bad not in html, bad
    # The only absolute URLs are paper links the reader may click; nothing is loaded.
    anchors = re.findall(r'<a href="([^"]*)">', html)
    assert any(a.startswith("https://arxiv.org/") for a in anchors)
    without_links = re.sub(r'<a href="https?://[^"]*">', "<a>", html)
    assert "http://" not in without_links and "https://" not in without_links
    assert all(a.startswith(("#", "https://")) for a in anchors)


def test_html_sections_and_charts(tmp_path: Path) -> None:
    write_report(sample_results(), tmp_path / "report.html")
    html = (tmp_path / "report.html").read_text()
    for sid in ("leaderboard", "per-task", "normalized", "cost", "sensitivity", "run-info"):
        assert f'<section id="{sid}">' in html
    assert (
        html.count("<svg ") == 3 + 1 + 3
    )  # dot plot, normalized, time, memory; λ, weight, density
    assert "ties (best over density)" in html and "max-width:100%" in html
    assert "0123456789abcdef0123456789abcdef01234567" in html


def test_sensitivity_curves() -> None:
    board = build_board(sample_results())
    rows = {r.method: r for r in board.rows}
    key, curve = sensitivity(rows["task_arithmetic"])
    assert key == "lambda" and curve.name == "task_arithmetic" and curve.mark == 0.5
    assert [x for x, _ in curve.points] == [0.1, 0.2, 0.3, 0.4, 0.5, 0.7, 1.0]
    key, curve = sensitivity(rows["ties"])  # λ × density grid: best over density at each λ
    best_at = {}
    for c in rows["ties"].selection:
        best_at[c.params["lambda"]] = max(best_at.get(c.params["lambda"], 0.0), c.val_avg)
    assert key == "lambda" and dict(curve.points) == best_at
    assert sensitivity(rows["linear"])[0] == "weight"
    assert sensitivity(rows["model_stock"]) is None and sensitivity(rows["breadcrumbs"]) is None


def test_no_grid_skips_sensitivity_gracefully(tmp_path: Path) -> None:
    write_report(sample_results(methods=["model_stock", "other"]), tmp_path / "r.html")
    html = (tmp_path / "r.html").read_text()
    assert "nothing to plot" in html and html.count("<svg ") == 4


def test_deterministic_and_independent_of_record_order(tmp_path: Path) -> None:
    results = sample_results()
    write_report(results, tmp_path / "a.html")
    shuffled = dict(results, records=list(results["records"]))
    random.Random(3).shuffle(shuffled["records"])
    write_report(shuffled, tmp_path / "b.html")
    assert (tmp_path / "a.html").read_bytes() == (tmp_path / "b.html").read_bytes()
    assert write_leaderboard(results, tmp_path / "a.md") == write_leaderboard(
        shuffled, tmp_path / "b.md"
    )


def test_bad_inputs(tmp_path: Path) -> None:
    with pytest.raises(MergeforgeError, match="no 'records' list"):
        write_leaderboard({"format": FORMAT}, tmp_path / "lb.md")
    with pytest.raises(OutputError, match="is a directory"):
        write_report(tiny_results(), tmp_path)


# --- headless Chromium ------------------------------------------------------------------------


def chromium_missing(why: str) -> NoReturn:
    """No chromium: skip on a developer machine, fail when MERGEFORGE_REQUIRE_CHROMIUM=1."""
    if os.environ.get("MERGEFORGE_REQUIRE_CHROMIUM") == "1":
        pytest.fail(why)
    pytest.skip(why)


def chromium() -> str:
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    chromium_missing(
        "chromium not found: install Debian's package (`apt-get install -y "
        "--no-install-recommends chromium`) to render report.html headless"
    )


def run_chromium(*args: str) -> str:
    proc = subprocess.run(
        [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--window-size=1280,1600",
         *args],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def read_png(path: Path) -> tuple[int, int, list[bytes]]:
    """(width, height, rows of RGB(A) bytes) of an 8-bit RGB/RGBA PNG (zlib only, no Pillow)."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, header = 8, b"", b""
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        header = body if kind == b"IHDR" else header
        idat += body if kind == b"IDAT" else b""
        pos += 12 + length
    width, height, depth, ctype = struct.unpack(">IIBB", header[:10])
    assert depth == 8 and ctype in (2, 6), (depth, ctype)
    bpp = 3 if ctype == 2 else 4
    raw, stride, rows = zlib.decompress(idat), width * bpp, []
    prev = bytearray(stride)
    for y in range(height):
        ftype, line = (
            raw[y * (stride + 1)],
            bytearray(raw[y * (stride + 1) + 1 : (y + 1) * (stride + 1)]),
        )
        for i in range(stride):
            a, b = line[i - bpp] if i >= bpp else 0, prev[i]
            c = prev[i - bpp] if i >= bpp else 0
            if ftype == 1:
                line[i] = (line[i] + a) & 255
            elif ftype == 2:
                line[i] = (line[i] + b) & 255
            elif ftype == 3:
                line[i] = (line[i] + (a + b) // 2) & 255
            elif ftype == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                pred = a if pa <= pb and pa <= pc else b if pb <= pc else c
                line[i] = (line[i] + pred) & 255
        rows.append(bytes(line))
        prev = line
    return width, height, [bytes(r[i : i + 3]) for r in rows for i in range(0, stride, bpp)]


def stress_results() -> dict:
    """Long unbreakable task names, many tasks, long method names: the page must still fit."""
    tasks = [f"task{i}_" + "x" * (40 + i) for i in range(12)]
    long_method = "a_method_with_a_really_long_name_" + "y" * 40
    return sample_results(tasks=tasks, methods=["task_arithmetic", long_method, "ties"])


@pytest.mark.slow
@pytest.mark.parametrize("make", [sample_results, stress_results], ids=["sample", "stress"])
def test_chromium_renders_report_without_sideways_scroll(tmp_path: Path, make) -> None:
    report = tmp_path / "report.html"
    write_report(make(), report)
    shot = tmp_path / "out.png"
    run_chromium(f"--screenshot={shot}", report.as_uri())
    width, height, pixels = read_png(shot)
    assert (width, height) == (1280, 1600)
    non_white = sum(p != b"\xff\xff\xff" for p in pixels)
    assert non_white > 0.03 * len(pixels), f"screenshot nearly blank: {non_white} non-white"
    assert len(set(pixels)) > 50, "screenshot has too few colours to hold the tables and charts"
    # A test copy reports whether the page is wider than the viewport (scrollbar excluded).
    probe = tmp_path / "probe.html"
    script = (
        "<script>var d=document.documentElement;document.body.setAttribute('data-fit',"
        "d.scrollWidth+'/'+d.clientWidth)</script></body>"
    )
    probe.write_text(report.read_text().replace("</body>", script))
    dom = run_chromium("--dump-dom", probe.as_uri())
    found = re.search(r'data-fit="(\d+)/(\d+)"', dom)
    assert found, dom[-500:]
    scroll, client = map(int, found.groups())
    assert 1200 <= client <= 1280 and scroll <= client, f"page scrolls sideways: {scroll}/{client}"


@pytest.mark.slow
def test_chromium_probe_detects_a_page_too_wide(tmp_path: Path) -> None:
    """Negative control for the probe above: a 2000-px-wide block must be reported as too wide."""
    page = tmp_path / "wide.html"
    page.write_text(
        '<!DOCTYPE html><html><body><div style="width:2000px">x</div><script>var d=document.'
        "documentElement;document.body.setAttribute('data-fit',d.scrollWidth+'/'+d.clientWidth)"
        "</script></body></html>"
    )
    found = re.search(r'data-fit="(\d+)/(\d+)"', run_chromium("--dump-dom", page.as_uri()))
    assert found and int(found[1]) > int(found[2])
