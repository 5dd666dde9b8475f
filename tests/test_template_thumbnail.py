"""The bundled template's thumbnail: ComfyUI's frontend (comfyui_frontend_package 1.27) asks for
`/api/workflow_templates/<pack folder>/<template>.jpg` for every JSON that `/workflow_templates`
lists (the pack's `workflows/*.json`) and shows it in a 256 x 256 CSS-pixel box."""

import glob
import importlib.util
import json
import os

from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEMPLATES = sorted(glob.glob(os.path.join(ROOT, "workflows", "*.json")))
FRONTEND_BOX = 256  # w-64 h-64 in the frontend's BaseThumbnail
MAX_BYTES = 60_000


def test_every_template_has_a_same_named_jpeg_thumbnail():
    assert TEMPLATES, "no templates in workflows/"
    for template in TEMPLATES:
        thumbnail = os.path.splitext(template)[0] + ".jpg"
        assert os.path.isfile(thumbnail), f"{thumbnail} missing: the frontend's template card shows a 404"
        with Image.open(thumbnail) as image:
            assert image.format == "JPEG"
            width, height = image.size
        assert width == height >= FRONTEND_BOX, image.size
        assert os.path.getsize(thumbnail) < MAX_BYTES


def test_thumbnails_ship_in_the_wheel():
    from setuptools.config.pyprojecttoml import read_configuration  # the reader the build uses

    package_data = read_configuration(os.path.join(ROOT, "pyproject.toml"))["tool"]["setuptools"]["package-data"]
    assert "*.jpg" in package_data["mochi_xdit.workflows"]


def test_thumbnail_renderer_draws_every_node_of_the_workflow():
    spec = importlib.util.spec_from_file_location("make_template_thumbnail",
                                                  os.path.join(ROOT, "tools", "make_template_thumbnail.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for template in TEMPLATES:
        with open(template, encoding="utf-8") as f:
            workflow = json.load(f)
        image = module.render(workflow)  # raises when the workflow's nodes and the layout differ
        assert image.size == (module.SIZE, module.SIZE)
        with Image.open(os.path.splitext(template)[0] + ".jpg") as shipped:
            assert shipped.size == image.size
