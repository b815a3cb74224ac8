"""`nodemesh ui`: a live service map (workloads, services, request/error/drop rates, flows).

`server` serves the page and its JSON API, `collector` follows every agent's flows into a rolling
window, `graph` turns that window into the map's nodes and edges; the page is in `static/`.
"""
