"""``slidechat serve``: a local web app to look at slides and chat about them.

A FastAPI app (:mod:`.app`) serves the slide list, OpenSlide DeepZoom tiles (:mod:`.tiles`), overlay
layers (:mod:`.layers`: tissue contour, patch grid, screening scores, evidence heatmaps), the page
(``static/``) with OpenSeadragon, and the chat routes (:mod:`.chat_routes` over :mod:`.sessions`).
Only files under the configured roots are ever served (:mod:`.security`).
"""
