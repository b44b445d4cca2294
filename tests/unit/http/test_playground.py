"""Which paths are the playground's (public even when API keys are on), and that the package
holds every file the page names."""

import re

import pytest

from serve_app.http.playground import STATIC_DIR, is_playground_path


@pytest.mark.parametrize("path", ["/", "/static/playground.js", "/static/playground.css"])
def test_the_page_and_its_assets_are_playground_paths(path):
    assert is_playground_path(path)


@pytest.mark.parametrize("path", ["/generate", "/history", "/v1/models", "/staticx", "//", ""])
def test_api_routes_are_not(path):
    assert not is_playground_path(path)


def test_every_asset_the_page_names_ships_in_the_package():
    html = (STATIC_DIR / "index.html").read_text()
    assets = re.findall(r'(?:src|href)="/static/([^"]+)"', html)
    assert sorted(assets) == ["playground.css", "playground.js"]
    assert all((STATIC_DIR / name).is_file() for name in assets)
