"""``cheapnet-serve``: the detector behind HTTP, for a production line.

`inspector` runs batches on the devices, `batching` groups concurrent requests into them, `app`
is the FastAPI service (routes, limits, authentication, metrics, the page at ``/``). The
command line is `cheapnet_jax.cli.serve` (``cheapnet-serve``, ``python -m cheapnet_jax.serve``).
Needs the ``serve`` extra (FastAPI, uvicorn, python-multipart, prometheus-client).
"""
