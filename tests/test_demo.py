"""The Gradio demo: its endpoint, the real app over HTTP with gradio_client, concurrent users, and a
real browser (Playwright driving Debian's Chromium). Skipped only where gradio / playwright /
chromium are not installed; CI installs them (.ci/run)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

REQUIRE = os.environ.get("TOKENPRUNE_REQUIRE_BROWSER") == "1"   # CI: fail instead of skipping
if REQUIRE:
    import gradio as gr  # noqa: F401
else:
    gr = pytest.importorskip("gradio")

from tokenprune.demo import compare, parse_params  # noqa: E402
from tokenprune.runner import DEFAULT_IMAGE, Runner, open_image  # noqa: E402

QUESTION = "what color is the cross"
OFFLINE = {"GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}


@pytest.fixture(scope="module")
def runner():
    return Runner()


def test_endpoint_answers_and_reports_bad_input(runner):
    image = open_image(DEFAULT_IMAGE)
    full, pruned, overlay, tokens, timing, msg = compare(runner, image, QUESTION, "hiprune", 0.25, "alpha=0.2")
    assert (full, pruned, msg) == ("blue", "blue", "") and tokens.startswith("64 / 256")
    assert overlay.size == image.size and "speedup" in timing
    for args, expected in [((None, QUESTION, "hiprune", 0.25, ""), "upload an image"),
                           ((image, QUESTION, "hiprune", 0.25, "alpha"), "key=value"),
                           ((image, QUESTION, "hiprune", 0.25, "keep=2"), "keep must be"),
                           ((image, QUESTION, "bogus", 0.25, ""), "unknown strategy"),
                           ((image, "", "hiprune", 0.25, ""), "no question")]:
        out = compare(runner, *args)
        assert out[:5] == ("", "", None, "", "") and expected in out[5], (args, out)
    assert parse_params("a=1; b=x") == {"a": 1, "b": "x"}
    tokens = compare(runner, image, QUESTION, "random", 0.5, "budget=10")[3]
    assert tokens.startswith("10 / 256")                    # a budget parameter overrides the slider
    from tokenprune.errors import TokenPruneWarning

    with pytest.warns(TokenPruneWarning):                   # words the tokenizer does not know: said in the UI
        out = compare(runner, image, "What color is the cross?", "hiprune", 0.25, "")
    assert out[3].startswith("64 / 256") and out[5].startswith("**Warning:** the tokenizer does not know 'What', 'cross?'")
    assert "examples.json" in out[5]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("demo")
    port_file = tmp / "port"
    env = {**os.environ, **OFFLINE, "GRADIO_TEMP_DIR": str(tmp / "gradio")}
    proc = subprocess.Popen([sys.executable, "-m", "tokenprune.cli", "demo", "--port", "0", "--port-file",
                             str(port_file)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 120
        url = None
        while time.time() < deadline and proc.poll() is None:
            if port_file.exists() and port_file.read_text():
                url = f"http://127.0.0.1:{port_file.read_text()}/"
                try:
                    urllib.request.urlopen(url, timeout=2)
                    break
                except OSError:
                    pass
            time.sleep(0.5)
        else:
            out = proc.stdout.read().decode() if proc.poll() is not None else ""
            pytest.fail(f"demo server did not start: {out[-2000:]}")
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _client(url):
    os.environ.update(OFFLINE)
    from gradio_client import Client

    return Client(url, verbose=False)


def test_gradio_client_calls_the_endpoint(server):
    from gradio_client import handle_file
    from PIL import Image

    client = _client(server)
    assert "/compare" in client.view_api(return_format="dict")["named_endpoints"]
    full, pruned, overlay, tokens, timing, msg = client.predict(
        handle_file(str(DEFAULT_IMAGE)), QUESTION, "visionzip", 0.3, "", None, api_name="/compare")
    assert (full, pruned, msg) == ("blue", "blue", "") and tokens.startswith("77 / 256")
    with Image.open(overlay) as im:
        assert im.format == "PNG" and im.size == (224, 224)


def test_app_refuses_an_image_bomb_before_decoding_it(server, tmp_path):
    """A 13000 x 13000 PNG is a few KB on disk and 0.5 GB decoded: the app answers with a message."""
    from gradio_client import handle_file
    from PIL import Image

    bomb = tmp_path / "bomb.png"
    Image.new("1", (13000, 13000)).save(bomb)
    assert bomb.stat().st_size < 200_000
    out = _client(server).predict(handle_file(str(bomb)), QUESTION, "hiprune", 0.25, "", None, api_name="/compare")
    assert out[0] == "" and out[-1].startswith("**Error:**") and "13000 x 13000 pixels" in out[-1]


def test_two_concurrent_users_get_what_each_gets_alone(server):
    from gradio_client import handle_file
    from PIL import Image, ImageChops

    client = _client(server)
    jobs = [("random", 0.05), ("fopru", 0.5)]

    def call(job):
        return client.predict(handle_file(str(DEFAULT_IMAGE)), QUESTION, job[0], job[1], "", None,
                              api_name="/compare")
    alone = [call(j) for j in jobs]
    with ThreadPoolExecutor(2) as ex:
        together = list(ex.map(call, jobs))
    for a, b in zip(alone, together):
        assert a[0] == b[0] and a[1] == b[1] and a[3] == b[3]
        with Image.open(a[2]) as ia, Image.open(b[2]) as ib:
            assert ImageChops.difference(ia.convert("RGB"), ib.convert("RGB")).getbbox() is None
    assert alone[0][3].startswith("13 / 256") and alone[1][3].startswith("128 / 256")


@pytest.mark.slow
def test_browser_upload_slider_strategy_submit(server, tmp_path):
    if REQUIRE:
        import playwright.sync_api as sync_api
    else:
        sync_api = pytest.importorskip("playwright.sync_api")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        if REQUIRE:
            pytest.fail("TOKENPRUNE_REQUIRE_BROWSER=1 but Debian's chromium is not installed")
        pytest.skip("Debian's chromium is not installed")
    with sync_api.sync_playwright() as p:
        ctx = p.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=chromium, headless=True,
            args=["--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"])
        external = []

        def route(r):
            host = r.request.url.split("/")[2].split(":")[0] if "://" in r.request.url else ""
            if host in ("127.0.0.1", "localhost") or r.request.url.startswith(("data:", "blob:")):
                return r.continue_()
            external.append(r.request.url)
            return r.abort()
        ctx.route("**/*", route)
        page = ctx.new_page()
        page.goto(server)
        page.locator("#image input[type=file]").set_input_files(str(DEFAULT_IMAGE))
        number = page.locator("#keep input[type=number]")
        number.fill("0.5")
        number.press("Enter")
        page.locator("#strategy input").click()
        page.get_by_role("option", name="visionzip").click()
        page.locator("#submit").click()
        sync_api.expect(page.locator("#answer_pruned textarea")).to_have_value("blue", timeout=60_000)
        sync_api.expect(page.locator("#answer_full textarea")).to_have_value("blue")
        sync_api.expect(page.locator("#tokens textarea")).to_have_value("128 / 256 visual tokens kept")
        sync_api.expect(page.locator("#overlay img")).to_be_visible()
        assert "speedup" in page.locator("#timing textarea").input_value()
        page.screenshot(path=str(Path(tmp_path) / "demo.png"), full_page=True)
        ctx.close()
    assert external == []


def test_endpoint_on_a_video_model(tmp_path):
    """The same endpoint with a video upload on a tiny Qwen2-VL (saved with its real processor):
    both answers, counts and a frames overlay; the embedded image-only model says it takes no video."""
    from PIL import Image

    from tokenprune.eval.tiny import build_qwen, build_qwen_processor

    build_qwen("qwen2_vl").save_pretrained(tmp_path / "m")
    build_qwen_processor("qwen2_vl").save_pretrained(tmp_path / "m")
    frames = [Image.new("RGB", (80, 64), (30 * i, 90, 200 - 20 * i)) for i in range(8)]
    gif = tmp_path / "clip.gif"
    frames[0].save(gif, save_all=True, append_images=frames[1:], duration=100)
    runner = Runner(str(tmp_path / "m"))
    full, pruned, overlay, tokens, timing, msg = compare(runner, None, "what is this", "hiprune", 0.25, "", str(gif))
    assert msg == "" and isinstance(full, str) and isinstance(pruned, str)   # a random model may say nothing
    assert overlay is not None and overlay.width > 256
    n = int(tokens.split("/")[1].split()[0])
    assert tokens.startswith(f"{round(0.25 * n)} / {n}")
    out = compare(Runner(), None, QUESTION, "hiprune", 0.25, "", str(gif))
    assert out[:5] == ("", "", None, "", "") and "no video" in out[5]


@pytest.mark.parametrize("family", ["qwen3_5", "internvl", "gemma3"])
def test_endpoint_on_the_new_families(tmp_path, family):
    """The endpoint on a tiny Qwen3.5 / InternVL / Gemma 3 (saved with the real processor): both
    answers, the exact kept count of the slider's fraction, an overlay of the upload's size drawn from
    the family's own geometry (InternVL: tiles + thumbnail; Gemma 3: the pooled grid); InternVL's
    video upload goes in as frames."""
    import importlib

    from PIL import Image

    pytest.importorskip(f"transformers.models.{family}", reason=f"this transformers has no {family} classes")
    importlib.import_module(f"eval.tiny_{family}").save(tmp_path / "m")
    runner = Runner(str(tmp_path / "m"))
    image = Image.new("RGB", (160, 120), (200, 40, 40))
    image.paste((20, 60, 220), (40, 30, 100, 90))
    full, pruned, overlay, tokens, timing, msg = compare(runner, image, "what is this", "hiprune", 0.25, "")
    assert msg == "" and isinstance(full, str) and isinstance(pruned, str)
    n = int(tokens.split("/")[1].split()[0])
    assert tokens.startswith(f"{round(0.25 * n)} / {n}") and n > 0
    assert overlay is not None and "speedup" in timing
    if family != "internvl":
        assert overlay.size == image.size
    else:                                   # two panels: the tiles and the thumbnail, each the upload's size
        assert overlay.width >= 2 * image.width and overlay.height >= image.height
        frames = [Image.new("RGB", (80, 64), (30 * i, 90, 200 - 20 * i)) for i in range(4)]
        gif = tmp_path / "clip.gif"
        frames[0].save(gif, save_all=True, append_images=frames[1:], duration=100)
        full, pruned, overlay, tokens, _, msg = compare(runner, None, "what is this", "hiprune", 0.25, "", str(gif))
        assert msg == "" and overlay is not None
        n = int(tokens.split("/")[1].split()[0])
        assert tokens.startswith(f"{round(0.25 * n)} / {n}")
