r"""A trained run as a local HTTP server with a web page.

  python -m affect_jax.serve --workdir=runs/demo [--which=best] [--host=127.0.0.1] [--port=8000]

``app.py`` is the HTTP API and the page, ``batcher.py`` shares model calls between concurrent
requests, ``upload.py`` checks what a request sends, ``scorer.py`` holds the run (the only use
of ``affect_jax.predict``), ``cli.py`` the command line; ``static/`` is the page.
"""
