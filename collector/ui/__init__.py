"""The web console: a small server-rendered app the collector serves (docs/console.md).

app.py     the aiohttp application, access control (the gRPC API's mTLS roles), pages
data.py    what each page reads from the collector's stores, as plain dicts and lists
svg.py     charts and the service map as SVG, drawn on the server (no script, no CDN)
templates/ Jinja2 pages; static/ the style sheet and the live stream's small script
"""
