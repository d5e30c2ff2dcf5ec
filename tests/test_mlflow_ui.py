"""Integration: what a user sees in the MLflow UI, in headless Chromium (Debian's ``chromium``,
driven by Playwright) against a real ``mlflow server`` on a local port.

Two runs of different K are recorded by the project's own code (the params ``train`` logs, the
best-so-far metrics, the scene artifacts ``record_final_artifacts`` writes from a checkpoint);
the runs page lists both, the compare view shows K and the best EMA mAP side by side, and a
scene heatmap opens as an image from the run's artifacts.
"""

from __future__ import annotations

import json
import shutil
import sys

import pytest

from tests._servers import free_port, start_server, stop_server
from tests._tiny_checkpoint import write_tiny_checkpoint

pytestmark = pytest.mark.integration
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# As root, in a closed network: no sandbox, and none of Chromium's own calls home.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
TIMEOUT_MS = 60_000


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        pytest.skip("Chromium is not installed (Debian: apt-get install chromium); .ci/run installs it")
    playwright = pytest.importorskip("playwright.sync_api", reason="playwright is a dev dependency")
    with playwright.sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str, dict[int, str]]:
    """(server URI, experiment id, {K: run id}) for two finished runs recorded as ``salgl train`` records them."""
    from jobs.tracking import MlflowLogger, end_run, ensure_experiment, start_run
    from jobs.training.final_artifacts import record_final_artifacts
    from jobs.training.outcome import TrainOutcome
    from salgl.config import preset, short_params, to_flat

    root = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    server = start_server([
        sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
        "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination", str(root / "artifacts"),
    ], uri + "/health", name="mlflow server")
    runs = {}
    for k, best in ((1, 61.25), (4, 67.5)):
        cfg = preset("tiny", {"model.head.num_scenes": k, "run.experiment": "ui-check"})
        flat = to_flat(cfg)
        run_id = start_run(uri, cfg.run.experiment, run_name=f"ui-K{k}", params={**flat, **short_params(flat)})
        MlflowLogger(uri, run_id).log_metrics({"ema_mAP": best - 1, "best_ema_mAP": best, "best_epoch": 2}, step=2)
        checkpoint = write_tiny_checkpoint(root / f"run-K{k}" / "checkpoint_000001", ["cat", "dog", "car"],
                                           overrides={"model.head.num_scenes": k})
        metrics = {"ema_mAP": best, "epoch": 2}
        outcome = TrainOutcome(f"ui-K{k}", str(checkpoint.parent), metrics, str(checkpoint), metrics, str(checkpoint), run_id, uri)
        record_final_artifacts(outcome, cfg, log_model=False)
        end_run(uri, run_id, "FINISHED")
        runs[k] = run_id
    yield uri, ensure_experiment(uri, "ui-check"), runs
    stop_server(server)


@pytest.mark.timeout(600)
def test_the_runs_page_and_the_compare_view_show_k_and_the_best_map(browser, two_runs) -> None:
    from jobs.tracking import TRAINING_VIEW

    uri, experiment, runs = two_runs
    page = browser.new_page(viewport={"width": 1600, "height": 1000})
    page.set_default_timeout(TIMEOUT_MS)

    page.goto(f"{uri}/#/experiments/{experiment}/runs?{TRAINING_VIEW}")
    page.get_by_text("ui-K1", exact=True).first.wait_for()
    page.get_by_text("ui-K4", exact=True).first.wait_for()

    ids = json.dumps(list(runs.values()))
    page.goto(f"{uri}/#/compare-runs?runs={ids}&experiments={json.dumps([experiment])}&{TRAINING_VIEW}")
    page.get_by_text("best_ema_mAP").first.wait_for()
    text = page.inner_text("body")
    params = text[text.index("Parameters\n"):]
    assert "K\t1\t4" in params, params[:500]
    metrics = text[text.rindex("best_ema_mAP"):]
    assert "61.25" in metrics and "67.5" in metrics, metrics[:300]
    page.close()


@pytest.mark.timeout(600)
def test_a_scene_heatmap_opens_as_an_image_from_the_runs_artifacts(browser, two_runs) -> None:
    from jobs.tracking import TRAINING_VIEW

    uri, experiment, runs = two_runs
    page = browser.new_page(viewport={"width": 1600, "height": 1000})
    page.set_default_timeout(TIMEOUT_MS)
    path = "scenes/scene_3_cooccurrence.png"  # K = 4: scenes 0..3
    page.goto(f"{uri}/#/experiments/{experiment}/runs/{runs[4]}/artifacts/{path}?{TRAINING_VIEW}")
    page.get_by_text(f"Path: mlflow-artifacts:/{experiment}/{runs[4]}/artifacts/{path}").wait_for()
    # The UI fetches the artifact and shows it from a blob: URL once the browser has decoded it.
    image = page.locator("img[src^='blob:']").first
    image.wait_for()
    page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=image.element_handle())
    head = page.evaluate("async src => Array.from(new Uint8Array(await (await fetch(src)).arrayBuffer()).slice(0, 8))",
                         image.get_attribute("src"))
    assert bytes(head) == b"\x89PNG\r\n\x1a\n"
    page.close()
