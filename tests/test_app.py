"""``iedp serve``: the Gradio app started on 127.0.0.1 on a free port, called with gradio_client on tiny
checkpoints, then driven by a real headless Chromium (Debian's ``chromium`` + ``chromium-driver``) through
selenium. Without Gradio (``pip install "iedp[app]"``) or without the browser, these tests are skipped with the
reason printed (``-rs`` in pytest's options)."""

import os
import shutil
import socket
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
gradio = pytest.importorskip("gradio", reason='the web app needs Gradio: pip install "iedp[app]"')
gradio_client = pytest.importorskip(
    "gradio_client", reason='the app tests need gradio_client: pip install "iedp[app]"'
)

from iedp.api import Pipeline  # noqa: E402
from iedp.app import depth_scale_bar, serve  # noqa: E402
from iedp.config import Config, EvalConfig, ModelConfig  # noqa: E402
from iedp.data.images import read_depth_png, write_depth_png  # noqa: E402
from iedp.data.synthetic import render_scene  # noqa: E402
from iedp.model_files import save_model  # noqa: E402
from iedp.models.build import build_model  # noqa: E402
from iedp.pointcloud import read_ply  # noqa: E402

SMALL_EVAL = EvalConfig(short_side=64, window=64, stride=48, depth_window=64, depth_stride=48, batch_size=4)
HEIGHT, WIDTH = 67, 101
# Where to keep the browser's screenshots (docs/ for the README's app_seg.png and app_depth.png), and, for
# those pictures, trained checkpoints to serve instead of the random tiny ones ("SEG_DIR:DEPTH_DIR").
SCREENSHOTS = os.environ.get("IEDP_APP_SCREENSHOTS")
CHECKPOINTS = os.environ.get("IEDP_APP_CHECKPOINTS")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("app")
    torch.manual_seed(0)
    seg = ModelConfig(task="seg", method="iedp", classes="synthetic", neck_channels=16, head_channels=16)
    depth = ModelConfig(
        task="depth", method="iedp", classes="nyu_scenes", depth_fuse_channels=32, depth_head_channels=16
    )
    for name, cfg in (("seg", seg), ("depth", depth)):
        model = build_model(cfg, with_text=False)
        # a random head gives one class everywhere; spread it so the pictures show classes
        with torch.no_grad():
            for parameter in model.head.parameters():
                parameter.mul_(30.0) if parameter.ndim > 1 else None
        save_model(model, Config(model=cfg, eval=SMALL_EVAL), root / name)
    if CHECKPOINTS:
        for name, folder in zip(("seg", "depth"), CHECKPOINTS.split(":"), strict=True):
            shutil.rmtree(root / name)
            shutil.copytree(folder, root / name)
    y, x = np.mgrid[0:HEIGHT, 0:WIDTH]
    image = np.stack([x * 255 // WIDTH, y * 255 // HEIGHT, (x * y) % 256], -1).astype(np.uint8)
    Image.fromarray(image).save(root / "room.png")
    scene = render_scene(seed=7, height=144, width=192)  # for the browser
    Image.fromarray(scene.rgb).save(root / "scene.png")
    (root / "notes.png").write_text("this is not an image")
    port = free_port()
    blocks = serve([root / "seg", root / "depth"], port=port, block=False, device="cpu")
    try:
        yield {"url": f"http://127.0.0.1:{port}/", "root": root}
    finally:
        blocks.close()


def test_app_segmentation_through_gradio_client(server):
    client = gradio_client.Client(server["url"], verbose=False)
    image = server["root"] / "room.png"
    result, areas, attention, classes, cloud, downloads, summary = client.predict(
        "seg", gradio_client.handle_file(image), None, None, api_name="/predict"
    )
    expected = Pipeline.from_pretrained(server["root"] / "seg", device="cpu")(image)
    picture = np.asarray(Image.open(result).convert("RGB"))
    legend = expected.overlay_with_legend()
    assert picture.shape == (legend.height, legend.width, 3)
    np.testing.assert_array_equal(
        picture[:HEIGHT, :WIDTH], np.asarray(expected.overlay)
    )  # the overlay itself
    shares = {c["label"]: c["confidence"] for c in areas["confidences"]}
    assert shares == pytest.approx(expected.areas())
    assert classes["value"] == next(iter(expected.areas()))  # the largest class's attention map is shown
    assert Image.open(attention).size == (WIDTH, HEIGHT)
    assert cloud is None and summary.startswith(f"{WIDTH}×{HEIGHT}")
    (labels_file,) = downloads
    np.testing.assert_array_equal(np.asarray(Image.open(labels_file)), expected.labels)
    # another class's attention map, on request
    other = client.predict("seg", gradio_client.handle_file(image), "floor", api_name="/attention")
    assert Image.open(other).size == (WIDTH, HEIGHT)


def test_app_depth_through_gradio_client(server):
    client = gradio_client.Client(server["url"], verbose=False)
    image = server["root"] / "room.png"
    result, areas, attention, _, cloud, downloads, summary = client.predict(
        "depth", gradio_client.handle_file(image), 100.0, None, api_name="/predict"
    )
    expected = Pipeline.from_pretrained(server["root"] / "depth", device="cpu")(image)
    picture = np.asarray(Image.open(result).convert("RGB"))
    bar = depth_scale_bar(0.0, expected.max_depth, HEIGHT)  # the model's fixed scale, as iedp predict
    assert picture.shape == (max(HEIGHT, bar.height), WIDTH + bar.width, 3)
    np.testing.assert_array_equal(picture[:HEIGHT, :WIDTH], np.asarray(expected.color))
    assert attention is None and "focal 100 px" in summary
    depth_file, ply_file = sorted(downloads, key=lambda p: Path(p).suffix)[::-1]
    assert Path(depth_file).suffix == ".png" and Path(ply_file).suffix == ".ply"
    millimetres = read_depth_png(depth_file)
    write_depth_png(Path(depth_file).with_name("api.png"), np.maximum(expected.depth, 1e-3))
    np.testing.assert_array_equal(millimetres, read_depth_png(Path(depth_file).with_name("api.png")))
    points, colours = read_ply(ply_file)
    assert points.shape == (HEIGHT * WIDTH, 3) and colours.shape == (HEIGHT * WIDTH, 3)
    np.testing.assert_allclose(-points[:, 2], expected.depth.reshape(-1), rtol=1e-6)
    assert Path(cloud).suffix == ".ply"


def test_app_bad_uploads_are_one_message_and_the_server_keeps_serving(server):
    client = gradio_client.Client(server["url"], verbose=False)
    with pytest.raises(gradio_client.exceptions.AppError, match="notes.png: not an image file"):
        client.predict(
            "seg", gradio_client.handle_file(server["root"] / "notes.png"), None, None, api_name="/predict"
        )
    with pytest.raises(gradio_client.exceptions.AppError, match="upload an image first"):
        client.predict("seg", None, None, None, api_name="/predict")
    result = client.predict(
        "seg", gradio_client.handle_file(server["root"] / "room.png"), None, None, api_name="/predict"
    )
    assert Image.open(result[0]).width > WIDTH


def chromium_driver():
    """A headless Chromium through selenium and the system chromedriver, or a skip naming what is missing."""
    webdriver = pytest.importorskip("selenium.webdriver", reason="the browser test needs selenium (.[app])")
    from selenium.webdriver.chrome.service import Service

    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not browser or not driver:
        pytest.skip(
            "the browser test needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)"
        )
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1300"):
        options.add_argument(flag)
    try:
        return webdriver.Chrome(service=Service(driver), options=options)
    except Exception as error:  # a machine without the libraries Chromium needs: say so, do not fail silently
        pytest.skip(f"headless Chromium did not start: {str(error).splitlines()[0]}")


@pytest.mark.parametrize("task", ["seg", "depth"])
def test_app_in_a_real_browser(server, tmp_path, task):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    driver = chromium_driver()
    try:
        driver.get(server["url"])
        wait = WebDriverWait(driver, 60)
        if task == "depth":  # pick the depth checkpoint from the list
            wait.until(
                expected_conditions.element_to_be_clickable((By.CSS_SELECTOR, "#checkpoint input"))
            ).click()
            option = wait.until(
                lambda d: [
                    o for o in d.find_elements(By.CSS_SELECTOR, "[role=option]") if o.text.strip() == "depth"
                ]
            )
            option[0].click()
            wait.until(expected_conditions.text_to_be_present_in_element((By.ID, "info"), "depth"))
        upload = wait.until(
            expected_conditions.presence_of_element_located((By.CSS_SELECTOR, "#upload input[type=file]"))
        )
        upload.send_keys(str(server["root"] / "scene.png"))
        # uploaded: the file component lists the name and size ("scene", ".png", "... KB")
        wait.until(lambda d: "scene" in (text := d.find_element(By.ID, "upload").text) and "KB" in text)
        driver.find_element(By.CSS_SELECTOR, "#run").click()
        shown = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#result img[src]"))
        wait.until(
            lambda d: d.execute_script("return arguments[0].complete && arguments[0].naturalWidth", shown[0])
        )
        wait.until(
            expected_conditions.text_to_be_present_in_element(
                (By.ID, "summary"), "classes" if task == "seg" else "m,"
            )
        )
        natural = driver.execute_script(
            "return [arguments[0].naturalWidth, arguments[0].naturalHeight]", shown[0]
        )
        result = Pipeline.from_pretrained(server["root"] / task, device="cpu")(server["root"] / "scene.png")
        if task == "seg":
            expected = result.overlay_with_legend().size
        else:  # the colour map and its scale bar; the point cloud drawn in the 3D view's canvas
            expected = (
                result.color.width + depth_scale_bar(0.0, result.max_depth, result.color.height).width,
                144,
            )
            wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#cloud canvas"))
        assert natural == list(expected)  # the result picture is shown, at its size
        time.sleep(2.0)  # let the attention map / 3D view finish drawing for the picture
        path = tmp_path / f"app_{task}.png"
        driver.save_screenshot(str(path))
        assert Image.open(path).size[0] > 0
        if SCREENSHOTS:
            shutil.copyfile(path, Path(SCREENSHOTS) / path.name)
    finally:
        driver.quit()


def test_app_refuses_too_large_uploads_in_one_line(server):
    from iedp.app import App
    from iedp.errors import InputError

    app = App([server["root"] / "depth"], device="cpu", max_pixels=1000)
    with pytest.raises(
        InputError, match=r"room.png: 101×67 = 6,767 pixels is above this app's limit of 1,000"
    ):
        app.read_upload(str(server["root"] / "room.png"))
    with pytest.raises(InputError, match="focal length"):
        App([server["root"] / "depth"], device="cpu").run(
            "depth", str(server["root"] / "room.png"), -5.0, None
        )


def test_app_holds_its_models_in_the_inference_precision(server):
    """The app loads through the API, which holds the weights in the precision it runs, as `iedp predict` does
    (half the memory in bf16; the UNet in channels_last on a CPU in bf16)."""
    from iedp.app import App

    app = App([server["root"] / "seg"], device="cpu", dtype="bf16")
    model = app.pipeline("seg").model
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
