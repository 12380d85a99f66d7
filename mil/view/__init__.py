"""`mil view`: a run's predictions and attention on the full-resolution slides, in a browser.

A small read-only web server (Starlette + uvicorn) meant to run where the slides and the run
live, reached over an SSH tunnel: a cohort page (one row per bag: label, fold, predicted
probability, called class, links to its slides) and a slide page (OpenSeadragon over Deep
Zoom tiles from the slide file, the attention overlay and the tissue mask, hover read-out,
top/bottom tile gallery). OpenSeadragon ships in ``static/openseadragon`` with its licence.
This package is command layer: the core of ``mil`` never imports it.
"""

from mil.view.data import NotFound, SlideView, ViewerData
from mil.view.server import Viewer, ViewerStartError, open_viewer

__all__ = ["NotFound", "SlideView", "Viewer", "ViewerData", "ViewerStartError", "open_viewer"]
