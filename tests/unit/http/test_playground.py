"""The playground stays public when API keys are on, and the package holds every file the
page names."""

import re

from serve_app.http.access import PUBLIC_PATHS, PUBLIC_PREFIXES
from serve_app.http.playground import STATIC_DIR, STATIC_PREFIX


def _assets() -> list[str]:
    html = (STATIC_DIR / "index.html").read_text()
    return re.findall(r'(?:src|href)="(/static/[^"]+)"', html)


def test_every_asset_the_page_names_ships_in_the_package():
    assert sorted(_assets()) == ["/static/playground.css", "/static/playground.js"]
    for path in _assets():
        assert (STATIC_DIR / path.removeprefix(STATIC_PREFIX + "/")).is_file()


def test_the_page_and_its_assets_need_no_key():
    assert "/" in PUBLIC_PATHS
    assert all(path.startswith(PUBLIC_PREFIXES) for path in _assets())
