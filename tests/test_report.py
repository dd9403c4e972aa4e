"""`repro report` / ``repro_core.report``: one self-contained HTML file about runs.

One store is built for the module (two training runs sharing a dataset, one with NaN losses
and hardware samples; a TTRL run with checkpoints and a NaN reward; an empty run; a run left
RUNNING); every test reads it. The browser test opens real reports in headless Chromium
(Debian's ``chromium``, driven by Playwright with no browser download): it fails instead of
skipping when ``REPRO_REQUIRE_BROWSER=1`` (CI) and the browser or Playwright is missing.
"""

from __future__ import annotations

import base64
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

from repro_core import ArtifactManager, ExperimentContext, report
from repro_core.cli import main
from repro_core.errors import ArtifactNotFoundError, InvalidArgumentError
from repro_core.reporting import render_report
from repro_core.reporting.downsample import gap_markers, minmax_downsample
from repro_core.ttrl import TTRLContext

# -- the store ----------------------------------------------------------------------------------


def _train(root: Path, name: str, lr: float, *, nan_at: range = range(0),
           monitor: bool = False, uses: str | None = None) -> tuple[str, str]:
    """A training run: train/loss and val/acc over 200 steps, a model logged from its
    dataset. Returns (run id, dataset key)."""
    with ExperimentContext(config={"lr": lr, "optimizer": {"name": "adam"}}, name=name,
                           root=root, monitor_hardware=monitor, monitor_interval=0.05,
                           capture_level=1) as ctx:
        if uses is None:
            dataset = ctx.log_artifact("dataset", "dataset", data={"rows": [1, 2, 3]})
        else:
            dataset = ctx.manager.use_artifact(uses)
        for step in range(200):
            loss = math.nan if step in nan_at else math.exp(-step * lr)
            ctx.log_metrics({"train/loss": loss, "val/acc": 1 - math.exp(-step * lr)},
                            step=step)
        if monitor:
            time.sleep(0.3)  # a few hardware samples
        ctx.log_artifact("model", "model", data={"w": [lr] * 8}, parent_artifacts=[dataset.key])
    assert ctx.run is not None and ctx.run.id is not None
    return ctx.run.id, dataset.key


def _ttrl(root: Path, weights: Path) -> str:
    """30 updates, checkpoints after updates 10 and 20, update 15's reward NaN."""
    with TTRLContext(name="ttrl-run", root=root, monitor_hardware=False,
                     capture_level=1) as ctx:
        for i in range(30):
            if i in (10, 20):
                path = weights / f"policy-{i}.bin"
                path.write_bytes(bytes([i]) * 100)
                ctx.log_model_checkpoint(path, step=i)
            reward = math.nan if i == 15 else math.sin(i / 5)
            ctx.log_online_update(f"e{i}", reward=reward, confidence=0.5 + i / 100,
                                  kl_divergence=i / 1000)
    assert ctx.run is not None and ctx.run.id is not None
    return ctx.run.id


_HOSTILE = 'empty-run <script>alert("x")</script> & <a href="https://example.com">'


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    base = tmp_path_factory.mktemp("report")
    root = base / "store"
    ArtifactManager.reset_instance().set_root(root)
    try:
        a, dataset = _train(root, "train-a", 0.05, nan_at=range(50, 53), monitor=True)
        b, _ = _train(root, "train-b", 0.02, uses=dataset)
        ttrl = _ttrl(root, base)
        manager = ArtifactManager.reset_instance()
        empty = manager.init_run(_HOSTILE, root=root, config={"note": "</script><b>x"})
        manager.finalize_run()
        running = ArtifactManager.reset_instance().init_run("still-going", root=root)
        running_id = running.id
        ArtifactManager.reset_instance()  # abandoned: RUNNING while this process lives
        yield {"root": root, "a": a, "b": b, "ttrl": ttrl, "empty": empty.id,
               "running": running_id, "dir": base}
    finally:
        ArtifactManager.reset_instance()


@pytest.fixture(scope="module")
def two_runs(store: dict[str, Any]) -> str:
    return render_report([store["a"], store["b"]], root=store["root"])


@pytest.fixture(scope="module")
def ttrl_page(store: dict[str, Any]) -> str:
    return render_report(store["ttrl"], root=store["root"])


# -- reading the page back ---------------------------------------------------------------------

_VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source",
         "track", "wbr"}
_RESOURCE_ATTRS = {"src", "href", "xlink:href", "srcset", "poster", "data", "action",
                   "formaction", "background", "manifest", "ping", "cite"}
_CSS_URL = re.compile(r"url\(\s*['\"]?(?!#)([^)'\"]*)", re.IGNORECASE)


class _StrictPage(HTMLParser):
    """Every element closed in order (we write every end tag), and every reference the
    page could load collected: attributes that fetch, ``url()`` in CSS."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.open: list[str] = []
        self.errors: list[str] = []
        self.references: list[str] = []
        self.tags: dict[str, int] = {}
        self._in: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self._look(tag, attrs)
        if tag not in _VOID:
            self.open.append(tag)
        self._in = tag

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self._look(tag, attrs)

    def handle_endtag(self, tag: str) -> None:
        if tag in _VOID:
            return
        if not self.open or self.open[-1] != tag:
            self.errors.append(f"</{tag}> closes <{self.open[-1] if self.open else None}>")
            return
        self.open.pop()

    def handle_data(self, data: str) -> None:
        if self.open and self.open[-1] == "style":
            self.references += _CSS_URL.findall(data)

    def _look(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags[tag] = self.tags.get(tag, 0) + 1
        for name, value in attrs:
            value = value or ""
            if name in _RESOURCE_ATTRS and not value.startswith("#"):
                self.references.append(f"<{tag} {name}={value!r}>")
            if name == "style":
                self.references += _CSS_URL.findall(value)
            if re.match(r"\s*(https?:)?//", value) and name != "xmlns" \
                    and not name.startswith("xmlns:"):
                self.references.append(f"<{tag} {name}={value!r}>")


def _parse(page: str) -> _StrictPage:
    parser = _StrictPage()
    parser.feed(page)
    parser.close()
    return parser


def _figures(page: str) -> list[dict[str, Any]]:
    match = re.search(r'<script type="application/json" id="repro-figures">(.*?)</script>',
                      page, re.DOTALL)
    assert match is not None
    return json.loads(match[1])  # type: ignore[no-any-return]


def _decode(array: Any) -> np.ndarray:
    if isinstance(array, dict):
        dtype = {"f8": "<f8", "i4": "<i4"}[array["dtype"]]
        return np.frombuffer(base64.b64decode(array["bdata"]), dtype=dtype)
    return np.asarray(array, dtype=float)


def _titled(page: str, title: str) -> dict[str, Any]:
    found = [f for f in _figures(page) if f["layout"]["title"]["text"] == title]
    assert len(found) == 1, [f["layout"]["title"]["text"] for f in _figures(page)]
    return found[0]


# -- downsampling -----------------------------------------------------------------------------


def test_downsample_keeps_every_spike_and_gap() -> None:
    n = 1_000_000
    x = np.arange(n, dtype=np.int64)
    y = np.sin(x / 5000.0)
    y[123_457] = 50.0  # one spike in a million: every-nth sampling would drop it
    y[654_321] = -40.0
    y[800_000] = math.nan
    y[900_001] = math.inf
    dx, dy = minmax_downsample(x, y, 3000)
    assert len(dx) <= 3000 and np.all(np.diff(dx) > 0)
    assert np.nanmax(dy) == 50.0 and np.nanmin(dy) == -40.0
    gaps = dx[np.isnan(dy)]
    assert 800_000 in gaps and 900_001 in gaps and not np.isinf(dy).any()
    assert set(dx[np.isfinite(dy)]) <= set(x[np.isfinite(y)])  # real points, not averages


def test_downsample_leaves_a_short_series_whole() -> None:
    x, y = np.arange(5), np.array([1.0, math.inf, 3.0, math.nan, 5.0])
    dx, dy = minmax_downsample(x, y)
    assert dx.tolist() == [0, 1, 2, 3, 4]
    assert dy[0] == 1.0 and math.isnan(dy[1]) and math.isnan(dy[3])  # inf: a gap too
    with pytest.raises(ValueError, match="at least 3"):
        minmax_downsample(x, y, 2)


def test_gap_markers_sit_where_the_line_breaks() -> None:
    x = np.arange(6)
    gx, gy = gap_markers(x, np.array([math.nan, 2.0, 3.0, math.nan, math.nan, 6.0]))
    assert gx.tolist() == [0, 3, 4] and gy.tolist() == [2.0, 3.0, 3.0]
    assert len(gap_markers(x, np.ones(6))[0]) == 0
    assert gap_markers(x, np.full(6, math.nan))[1].tolist() == [0.0] * 6


# -- the page ---------------------------------------------------------------------------------


def test_page_is_valid_html_and_self_contained(two_runs: str, ttrl_page: str) -> None:
    for page in (two_runs, ttrl_page):
        parsed = _parse(page)
        assert parsed.errors == [] and parsed.open == []
        assert parsed.references == []  # nothing to fetch: no src, no http(s), no url()
        assert "link" not in parsed.tags and "iframe" not in parsed.tags
        assert page.startswith("<!DOCTYPE html>") and parsed.tags["svg"] >= 1
    # the checker itself sees what it must refuse
    bad = _parse('<div style="background:url(https://cdn.test/a.png)"><img src="a.png">'
                 '<a href="#top">in page</a><script src="//cdn.test/x.js"></script></div>')
    assert len(bad.references) == 4 and bad.errors == []


def test_two_runs_are_overlaid_by_step_and_diffed(store: dict[str, Any], two_runs: str) -> None:
    loss = _titled(two_runs, "train/loss")
    lines = [t for t in loss["data"] if t["mode"].startswith("lines")]
    assert [t["name"][:7] for t in lines] == ["train-a", "train-b"]
    assert all(_decode(t["x"]).tolist() == list(range(200)) for t in lines)
    assert lines[0]["line"]["color"] != lines[1]["line"]["color"]
    for run in ("a", "b"):
        assert store[run] in two_runs
    diff = two_runs.split('id="diff"')[1].split("</section>")[0]
    assert "lr" in diff and "0.05" in diff and "0.02" in diff  # the config change, both sides
    # the shared dataset is one box in one lineage picture
    lineage = two_runs.split('id="lineage"')[1].split("</section>")[0]
    assert lineage.count("<title>default/dataset:v1</title>") == 1
    assert "default/model:v1" in lineage and "default/model:v2" in lineage


def test_nan_values_are_gaps_with_markers(two_runs: str) -> None:
    loss = _titled(two_runs, "train/loss")
    line = next(t for t in loss["data"] if t["name"].startswith("train-a"))
    values = _decode(line["y"])
    assert np.isnan(values[50:53]).all() and np.isfinite(values[:50]).all()
    assert line["connectgaps"] is False
    markers = next(t for t in loss["data"] if t["name"].endswith("NaN/inf"))
    assert _decode(markers["x"]).tolist() == [50, 51, 52]
    assert "3 NaN/inf value(s)" in two_runs


def test_ttrl_run_marks_its_checkpoints(store: dict[str, Any], ttrl_page: str) -> None:
    reward = _titled(ttrl_page, "online reward")
    marks = next(t for t in reward["data"] if t["name"].endswith("checkpoints"))
    keys = marks["customdata"]
    assert keys == ["default/checkpoint:v1", "default/checkpoint:v2"]
    assert marks["x"] == [10.5, 20.5]  # logged after update 10 and after update 20
    assert [s["x0"] for s in reward["layout"]["shapes"]] == [10.5, 20.5]
    assert np.isnan(_decode(reward["data"][0]["y"])[15])
    section = ttrl_page.split('id="ttrl"')[1].split("</section>")[0]
    rows = re.findall(r"<tr>(.*?)</tr>", section)
    cells = [re.findall(r"<td>(.*?)</td>", r) for r in rows if "<td>" in r]
    assert [c[1] for c in cells] == ["10", "10", "10"]  # v1 <- 1..10, v2 <- 11..20, then 10
    assert f"{store['ttrl']}-u11" in cells[1][2] and "nothing produced yet" in cells[2][0]


def test_hardware_samples_are_plotted_over_time(two_runs: str) -> None:
    cpu = _titled(two_runs, "cpu_percent")
    assert cpu["layout"]["xaxis"]["title"]["text"] == "seconds since the run started"
    seconds = _decode(cpu["data"][0]["x"])
    assert len(seconds) >= 2 and np.all(seconds >= 0) and np.all(np.diff(seconds) >= 0)
    assert any(f["layout"]["title"]["text"] == "process_rss (MiB)" for f in _figures(two_runs))


def test_gpus_share_a_figure_and_bytes_read_as_mib() -> None:
    from repro_core.registry import RunRow
    from repro_core.reporting.figures import hardware_figures, trace_points
    from repro_core.reporting.records import RunData, Series

    t = np.arange(4, dtype=np.float64)
    row = RunRow(id="0123456789ab", name="gpu <b>run</b>", project="default", state="completed",
                 tags=[], config={}, created_at="2026-01-01T00:00:00+00:00", ended_at=None,
                 host=None, pid=None, world_size=None)
    data = RunData(run=row, states=[], environment=None, metrics={}, ttrl=None, artifacts=[],
                   hardware={"gpu0/power_watts": Series(t, t * 10),
                             "gpu1/power_watts": Series(t, t * 20),
                             "gpu0/memory_used_bytes": Series(t, t * 2**20)})
    figures = {f.title: f for f in hardware_figures([data])}
    assert set(figures) == {"gpu power_watts", "gpu memory_used (MiB)"}
    power: Any = figures["gpu power_watts"].spec["data"]
    names = [trace["name"] for trace in power]
    # names as entities: Plotly would read "<b>" in a label as markup
    assert names == [f"gpu &lt;b&gt;run&lt;/b&gt; (01234567) gpu{i}" for i in (0, 1)]
    memory: Any = figures["gpu memory_used (MiB)"].spec["data"]
    assert _decode(memory[0]["y"]).tolist() == [0.0, 1.0, 2.0, 3.0]
    assert trace_points(10) == 3000 and trace_points(100_000) == 300  # a page stays small


def test_header_and_artifacts(store: dict[str, Any], two_runs: str) -> None:
    card = two_runs.split('id="run-0"')[1].split("</section>")[0]
    for text in (store["a"], "train-a", "default", "COMPLETED", "RUNNING", "state history"):
        assert text in card
    assert re.search(r"<th>git</th><td>(<code>[0-9a-f]{12}</code>|<span class=\"muted\">)",
                     card)
    artifacts = two_runs.split('id="artifacts"')[1].split("</section>")[0]
    assert "default/model:v1" in artifacts and "latest" in artifacts and "blake3:" in artifacts


def test_running_and_empty_runs_say_so(store: dict[str, Any]) -> None:
    page = render_report([store["running"], store["empty"]], root=store["root"])
    assert "still-going" in page and "is still RUNNING" in page and "so far (running)" in page
    assert "has logged nothing yet" in page
    # a name from the store is text, never markup or a link, wherever it is shown
    assert _HOSTILE not in page and "empty-run &lt;script&gt;alert(&quot;x&quot;)" in page
    assert "&lt;/script&gt;&lt;b&gt;x" in page  # the config, in its <details>
    parsed = _parse(page)
    assert parsed.errors == [] and parsed.references == []  # the <a href> stayed text


def test_missing_blob_is_listed_and_the_rest_renders(store: dict[str, Any],
                                                     tmp_path: Path) -> None:
    copy = tmp_path / "store"
    shutil.copytree(store["root"], copy)
    manager = ArtifactManager.reset_instance()
    manager.set_root(copy)
    model = next(m for m in manager.list_artifacts("model") if m.run_id == store["b"])
    environment = next(m for m in manager.list_artifacts("environment"))
    ArtifactManager.reset_instance()
    for meta in (model, environment):
        algorithm, hexdigest = meta.hash.split(":")
        (copy / "blobs" / algorithm / hexdigest[:2] / hexdigest[2:]).unlink()
    page = render_report([store["a"], store["b"]], root=copy)
    assert "blob(s) missing from the store" in page and model.hash in page
    assert "BLOB MISSING" in page  # on its lineage box
    diff = page.split('id="diff"')[1].split("</section>")[0]
    assert "diff not available" in diff and environment.hash in diff  # said, not raised
    assert f"could not read environment (default/environment:{environment.version})" in page
    assert _titled(page, "train/loss") and _parse(page).errors == []


def test_unknown_run_and_bad_arguments(store: dict[str, Any], tmp_path: Path) -> None:
    with pytest.raises(ArtifactNotFoundError):
        render_report("0123456789ab", root=store["root"])
    with pytest.raises(InvalidArgumentError):
        render_report([], root=store["root"])
    with pytest.raises(InvalidArgumentError, match="inside the store"):
        report(store["a"], store["root"] / "r.html", root=store["root"])
    out = report(store["a"], tmp_path / "r.html", root=store["root"])
    assert out.stat().st_size > 1_000_000 and oct(out.stat().st_mode)[-3:] == "644"


def test_cli_writes_the_report_and_errors_are_one_line(store: dict[str, Any],
                                                       tmp_path: Path) -> None:
    root = ["--root", str(store["root"])]
    out = tmp_path / "two.html"
    done = CliRunner().invoke(main, ["report", store["a"][:6], store["b"], "-o", str(out),
                                     *root])
    assert done.exit_code == 0, done.output
    assert out.is_file() and "wrote" in done.stderr
    for args in (["report", "0123456789ab", *root, "-o", str(tmp_path / "x.html")],
                 ["report", store["a"], *root, "-o", str(store["root"] / "x.html")],
                 ["report", store["a"], "--root", str(tmp_path / "none"), "-o",
                  str(tmp_path / "y.html")]):
        failed = CliRunner().invoke(main, args)
        assert failed.exit_code == 2 and failed.stderr.startswith("repro: error: ")
        assert len(failed.stderr.strip().splitlines()) == 1, failed.stderr
    assert not (tmp_path / "x.html").exists() and not (tmp_path / "none").exists()


def test_missing_plotly_says_how_to_install(store: dict[str, Any],
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from repro_core.reporting import plotly_js

    monkeypatch.setitem(sys.modules, "plotly.offline", None)  # import fails
    plotly_js.plotly_bundle.cache_clear()
    try:
        with pytest.raises(ModuleNotFoundError, match=r"repro-lightning\[report\]"):
            render_report(store["a"], root=store["root"])
        failed = CliRunner().invoke(main, ["report", store["a"], "--root",
                                           str(store["root"])])
        assert failed.exit_code == 2 and "pip install" in failed.stderr
    finally:
        plotly_js.plotly_bundle.cache_clear()


def test_import_repro_core_does_not_import_plotly() -> None:
    code = ("import sys, repro_core, repro_core.reporting; "
            "print(sorted(m for m in ('plotly', 'matplotlib', 'numpy') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True)
    assert done.stdout.strip() == "[]"


# -- a real browser -----------------------------------------------------------------------------


def _browser_or_skip() -> str:
    """Chromium's path; a skip (or, with REPRO_REQUIRE_BROWSER=1, a failure) without it."""
    required = os.environ.get("REPRO_REQUIRE_BROWSER") == "1"
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    missing = []
    if chromium is None:
        missing.append("chromium (apt-get install chromium)")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        missing.append("playwright (pip install playwright; no browser download needed)")
    if missing:
        message = f"the browser test needs {' and '.join(missing)}"
        if required:
            pytest.fail(f"{message}; REPRO_REQUIRE_BROWSER=1 forbids skipping it")
        pytest.skip(message)
    assert chromium is not None
    return chromium


def _plot_pixels(png: bytes) -> np.ndarray:
    from io import BytesIO

    from PIL import Image

    return np.asarray(Image.open(BytesIO(png)).convert("RGB"), dtype=np.int16)


def test_reports_render_in_a_real_browser(store: dict[str, Any], tmp_path: Path) -> None:
    chromium = _browser_or_skip()
    from playwright.sync_api import sync_playwright

    pages = {"two": report([store["a"], store["b"]], tmp_path / "two.html", root=store["root"]),
             "ttrl": report(store["ttrl"], tmp_path / "ttrl.html", root=store["root"])}
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium,
                                    args=["--no-sandbox", "--disable-gpu",
                                          "--disable-dev-shm-usage"])
        try:
            for name, path in pages.items():
                _check_in_browser(browser, path, store, ttrl=name == "ttrl")
        finally:
            browser.close()


def _check_in_browser(browser: Any, path: Path, store: dict[str, Any], *, ttrl: bool) -> None:
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    requests: list[str] = []
    problems: list[str] = []
    page.on("request", lambda r: requests.append(r.url))
    page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}")
            if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    page.goto(path.as_uri(), wait_until="load")
    page.evaluate("window.reproDrawAll()")
    areas = page.locator(".plot-area")
    page.wait_for_function("n => document.querySelectorAll('.plot-area .main-svg').length"
                           " >= n", arg=areas.count() * 2, timeout=30_000)
    assert problems == []
    assert requests == [path.as_uri()]  # the page itself, nothing else
    first = areas.first
    first.scroll_into_view_if_needed()
    pixels = _plot_pixels(first.screenshot())
    assert pixels.std() > 10  # not a blank area
    trace = np.abs(pixels - np.array([0x1F, 0x77, 0xB4])).sum(axis=2) < 60  # run 1's blue
    assert trace.sum() > 100, "no line of the first run's colour in the first plot"
    text = page.inner_text("body")
    ids = [store["ttrl"]] if ttrl else [store["a"], store["b"]]
    names = ["online reward", "default/checkpoint:v2"] if ttrl else \
        ["train/loss", "val/acc", "cpu_percent", "default/dataset:v1", "default/model:v2"]
    for expected in ids + names:
        assert expected in text, expected
    page.close()
